"""Compact byte layouts of cached attention state (v4-architecture.md §6.1, design.md "State and pools").

Pure torch and vectorised over rows: every function takes `[..., width]` and treats the leading
dims as rows, and the dims as plain numbers (workers/kv_layout.py reads them from a ModelConfig).
These are the reference of the Triton codecs in quantize.py and of main_rows.py.

Main entry (a sliding-window key or a compressed CSA/HCA entry), `main_row_bytes(D, D-r)` bytes
per row (584 at D=512, r=64), in this order:

    [ D-r  FP8 E4M3 codes       ]  the "nope" dims, one byte each
    [ 2r   BF16 RoPE dims       ]  the last r dims, 2 bytes each, little-endian
    [ (D-r)/64 UE8M0 scales     ]  one per block of 64 FP8 codes: byte e means 2**(e-127)
    [ zero padding              ]  up to the entry size (a multiple of 8)

This is one self-contained row per token. FlashMLA's MODEL1_FP8Sparse page stores all rows'
576 code bytes first and all scale bytes after them per page (§6.1, §14 item 6); that layout
belongs with the kernel and is not this one.

Indexer key, `index_row_bytes(Di)` bytes per row (68 at Di=128): Di/2 bytes of FP4 E2M1
codes packed two per byte (element 2i in the low nibble, as `block_quant.pack_fp4`), then
Di/32 UE8M0 scales, one per block of 32.

Exactness: the model already rounds keys to these grids before caching them (FP8 blocks of 64,
FP4 blocks of 32, power-of-two scales), so encoding what the model produced must lose nothing.
Re-quantizing an on-grid block may pick a different scale than the one that produced it, yet
returns the same values:

  * The block is x = q * s, s a power of two, every |q| <= qmax (448 for E4M3, 6 for E2M1) and
    s >= the scale floor (s came from the same clamped formula). So max(amax, floor)/qmax <= s,
    and the recomputed power-of-two ceiling s' satisfies s' <= s: s' = s / 2**j, j >= 0. The
    scale can shrink (e.g. a block whose amax was rounded down onto a power of two) but never
    grow.
  * x / s' = q * 2**j is an exact float32 product, and |q * 2**j| = |x| / s' <= qmax by the
    choice of s'. Doubling a representable value keeps it representable while it stays within
    qmax: E4M3 keeps its 3 mantissa bits (a subnormal k * 2**-9, k < 8, has at most 3 significant
    bits and so becomes a subnormal or normal); doubling one of E2M1's magnitudes
    {0.5, 1, 1.5, 2, 3, 4, 6} gives another one while the result is <= 6. So the narrow cast
    rounds nothing.
  * Decoding multiplies back by s': q * 2**j * s' = q * s = x, again exact (powers of two, far
    from float32's range limits for any scale these formulas produce).
Signed zeros survive too (both formats have a sign bit; see encode_index for FP4). The RoPE
dims are cast to BF16, exact for values that are already BF16. Off-grid input is rounded once,
to what `fp8_e4m3_block_qdq` / `fp4_e2m1_block_qdq` give: the encoders use the same quantizers.
"""

from __future__ import annotations

import math

import torch

from .block_quant import fp4_e2m1_block_dequant, fp4_e2m1_block_quant, fp8_e4m3_block_quant, pack_fp4, unpack_fp4

MAIN_BLOCK = 64  # FP8 scale block of main keys (the reference's act_quant block)
INDEX_BLOCK = 32  # FP4 scale block of indexer keys (MXFP4)
UE8M0_BIAS = 127


def main_row_bytes(head_dim: int, nope_dim: int) -> int:
    """Bytes of one main row of keys [head_dim] whose first nope_dim dims are FP8 (layout above)."""
    if nope_dim % MAIN_BLOCK or not 0 < nope_dim < head_dim:
        raise ValueError(f"nope_dim={nope_dim} must be a positive multiple of {MAIN_BLOCK} below head_dim={head_dim}")
    rope = head_dim - nope_dim
    return math.ceil((nope_dim + 2 * rope + nope_dim // MAIN_BLOCK) / 8) * 8


def index_row_bytes(index_dim: int) -> int:
    """Bytes of one indexer row of keys [index_dim]: packed FP4 codes, then one scale per 32."""
    if index_dim % INDEX_BLOCK or index_dim <= 0:
        raise ValueError(f"index_dim={index_dim} must be a positive multiple of {INDEX_BLOCK}")
    return index_dim // 2 + index_dim // INDEX_BLOCK


def index_scales_as_words(index_rows: torch.Tensor, index_dim: int) -> bool:
    """Whether the scan kernels may read the scale bytes of these indexer rows (uint8 [P, 64,
    index_row_bytes]) 4 at a time as 32-bit words: whole groups of 4 scales per row (index_dim a
    multiple of 128) at 4-byte aligned addresses (the base, every page and every row; 68-byte rows
    at index_dim 128)."""
    return (index_dim % (4 * INDEX_BLOCK) == 0 and index_rows.data_ptr() % 4 == 0
            and index_rows.stride(0) % 4 == 0 and index_rows.stride(1) % 4 == 0)


def _ue8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales -> biased exponent bytes (frexp: 2**k = 0.5 * 2**(k+1))."""
    _, e = torch.frexp(scale)
    return (e - 1 + UE8M0_BIAS).to(torch.uint8)


def _ue8m0_decode(b: torch.Tensor) -> torch.Tensor:
    """Biased exponent bytes -> float32 2**(b - 127), built from the bits (exact on every device;
    ldexp multiplies by pow(2, e), which a device's pow need not compute exactly). Byte 0 is the
    subnormal 2**-127."""
    e = b.to(torch.int32)
    return torch.where(e == 0, torch.tensor(2.0**-127, device=b.device), (e << 23).view(torch.float32))


def _bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[..., n] -> uint8 [..., 2n], each BF16 as (low byte, high byte) whatever the host order."""
    bits = x.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.stack((bits & 0xFF, bits >> 8), dim=-1).flatten(-2).to(torch.uint8)


def _bf16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    pairs = b.unflatten(-1, (-1, 2)).to(torch.int32)
    bits = pairs[..., 0] | (pairs[..., 1] << 8)
    bits = bits - ((bits >= 0x8000).to(torch.int32) << 16)  # reinterpret as int16 without overflow
    return bits.to(torch.int16).view(torch.bfloat16)


def _check_width(t: torch.Tensor, width: int, what: str) -> None:
    if t.dim() == 0 or t.shape[-1] != width:
        raise ValueError(f"{what}: expected last dim {width}, got shape {list(t.shape)}")


# ---- main entries -----------------------------------------------------------------------------

def encode_main(x: torch.Tensor, head_dim: int, nope_dim: int) -> torch.Tensor:
    """Main keys [..., head_dim] (any float dtype) -> uint8 [..., main_row_bytes(head_dim, nope_dim)]."""
    _check_width(x, head_dim, "encode_main")
    row_bytes = main_row_bytes(head_dim, nope_dim)
    codes, scale = fp8_e4m3_block_quant(x[..., :nope_dim].float(), MAIN_BLOCK)
    parts = [codes.view(torch.uint8), _bf16_bytes(x[..., nope_dim:]), _ue8m0_encode(scale)]
    used = sum(p.shape[-1] for p in parts)
    pad = torch.zeros(*x.shape[:-1], row_bytes - used, dtype=torch.uint8, device=x.device)
    return torch.cat([*parts, pad], dim=-1)


def decode_main(b: torch.Tensor, head_dim: int, nope_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., main_row_bytes(head_dim, nope_dim)] -> keys [..., head_dim] in `dtype`."""
    _check_width(b, main_row_bytes(head_dim, nope_dim), "decode_main")
    n, r = nope_dim, head_dim - nope_dim
    codes = b[..., :n].contiguous().view(torch.float8_e4m3fn).float()
    rope = _bf16_from_bytes(b[..., n : n + 2 * r])
    scale = _ue8m0_decode(b[..., n + 2 * r : n + 2 * r + n // MAIN_BLOCK])
    nope = (codes.unflatten(-1, (-1, MAIN_BLOCK)) * scale.unsqueeze(-1)).flatten(-2)
    return torch.cat([nope, rope.float()], dim=-1).to(dtype)


# ---- indexer keys -----------------------------------------------------------------------------

def encode_index(x: torch.Tensor, index_dim: int) -> torch.Tensor:
    """Indexer keys [..., index_dim] -> uint8 [..., index_row_bytes(index_dim)]: packed FP4, then scales."""
    _check_width(x, index_dim, "encode_index")
    x = x.float()
    codes, scale = fp4_e2m1_block_quant(x, INDEX_BLOCK)
    # The quantizer sets the sign bit only for x < 0, so a stored -0.0 (which it does produce,
    # from small negatives) would come back as +0.0. Taking the sign from signbit keeps it.
    codes = codes | (torch.signbit(x).to(torch.uint8) << 3)
    return torch.cat([pack_fp4(codes).view(torch.uint8), _ue8m0_encode(scale)], dim=-1)


def decode_index(b: torch.Tensor, index_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., index_row_bytes(index_dim)] -> indexer keys [..., index_dim] in `dtype`."""
    _check_width(b, index_row_bytes(index_dim), "decode_index")
    half = index_dim // 2
    scale = _ue8m0_decode(b[..., half:])
    # Same MXFP4 format (codes packed low nibble first, one power-of-two scale per 32) as the FP4
    # expert weights, so their block decoder applies as is.
    return fp4_e2m1_block_dequant(unpack_fp4(b[..., :half]), scale, INDEX_BLOCK).to(dtype)
