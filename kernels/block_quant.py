"""Pure-torch FP8 / FP4 block numerics of the reference model (v4-architecture.md §2, §4, §6.1, §10).

Blocks of FP8 E4M3 or FP4 E2M1 codes along the last dim, one power-of-two (UE8M0) scale per
block, and the Hadamard rotation that precedes FP4 rounding. Used for
  * activation rounding (quantize-dequantize) exactly as the reference applies it to main keys
    (FP8 E4M3, blocks of 64) and indexer q/k (Hadamard, then FP4 E2M1, blocks of 32);
  * the codes the compact cache rows store (kv_layout.py) and the FP4 expert weights
    (workers/quant.py), both MXFP4: two codes per byte, one scale per 32.
All scales are powers of two, so scaling and unscaling are exact: the only rounding is the cast to
the narrow format.
"""

from __future__ import annotations

import functools

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
AMAX_FLOOR = 1e-4  # the reference clamps amax (not amax/qmax) before taking the scale (§14 item 7)
# E2M1 magnitudes indexed by code bits 0-2; bit 3 is the sign.
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_FP4_MIDPOINTS = (FP4_VALUES[1:] + FP4_VALUES[:-1]) / 2


@functools.cache
def _fp4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, midpoints) on `device`, copied once: a host-to-device copy per call would cost a
    transfer every time and cannot be recorded into a CUDA graph (workers/decode_graphs.py)."""
    return FP4_VALUES.to(device), _FP4_MIDPOINTS.to(device)


def pow2_ceil(v: torch.Tensor) -> torch.Tensor:
    """2**ceil(log2(v)) for v > 0, exactly: frexp gives v = m * 2**e with m in [0.5, 1), and v is a
    power of two iff m == 0.5. (torch.log2 can round v slightly above 2**k down to k.)"""
    m, e = torch.frexp(v)
    return torch.ldexp(torch.ones_like(v), e - (m == 0.5).to(e.dtype))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x in float32 viewed as [..., n/block, block]; the reference requires whole blocks."""
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the block size {block}")
    return x.float().unflatten(-1, (-1, block))


def _block_scale(xb: torch.Tensor, qmax: float) -> torch.Tensor:
    """Power-of-two scale per block (last dim) so that amax/scale <= qmax: [..., nblocks, 1]."""
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR)
    return pow2_ceil(amax / qmax)


# ---- FP8 E4M3 ---------------------------------------------------------------------------------

def fp8_e4m3_block_quant(x: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn shaped like x, float32 scales [..., n/block]); x ~= codes * scale."""
    xb = _blocks(x, block)
    scale = _block_scale(xb, FP8_MAX)
    # Clamp first: the cast does not saturate (448 < x/scale would become NaN).
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale.squeeze(-1)


def fp8_e4m3_block_qdq(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """The reference `act_quant(x, block, scale_fmt='ue8m0')` rounding, returned in x.dtype."""
    q, scale = fp8_e4m3_block_quant(x, block)
    return (q.float().unflatten(-1, (-1, block)) * scale.unsqueeze(-1)).flatten(-2).to(x.dtype)


# ---- FP4 E2M1 ---------------------------------------------------------------------------------

def _fp4_encode(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (uint8) of already-scaled values y, |y| saturating at 6.

    Ties go to the even code (even mantissa bit), as the hardware cvt.rn.satfinite.e2m1 does:
    bucketize puts a value equal to a midpoint in the lower bucket, and we move it up when that
    lower code is odd."""
    a = y.abs().clamp(max=FP4_MAX)
    mids = _fp4_tables(y.device)[1]
    code = torch.bucketize(a, mids)
    tie = a == mids[code.clamp(max=len(mids) - 1)]
    code = code + (tie & (code % 2 == 1)).long()
    return (code | ((y < 0).long() << 3)).to(torch.uint8)


def _fp4_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes (bit 3 sign, bits 0-2 magnitude index)."""
    codes = codes.long()
    mag = _fp4_tables(codes.device)[0][codes & 7]
    return torch.where(codes & 8 != 0, -mag, mag)


def fp4_e2m1_block_quant(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 in [0, 16) shaped like x, float32 scales [..., n/block]); x ~= value(codes) * scale."""
    xb = _blocks(x, block)
    scale = _block_scale(xb, FP4_MAX)
    return _fp4_encode(xb / scale).flatten(-2), scale.squeeze(-1)


def fp4_e2m1_block_qdq(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """The reference FP4 rounding of indexer q/k (power-of-two scale per block), in x.dtype."""
    codes, scale = fp4_e2m1_block_quant(x, block)
    vals = _fp4_decode(codes).unflatten(-1, (-1, block)) * scale.unsqueeze(-1)
    return vals.flatten(-2).to(x.dtype)


def fp4_e2m1_block_dequant(codes: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """float32 values of E2M1 codes [..., n] (uint8, as fp4_e2m1_block_quant gives or unpack_fp4
    returns) with one scale per block of `block` [..., n/block]."""
    return _fp4_decode(codes) * scale.float().repeat_interleave(block, -1)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim: element 2i in the low nibble, 2i+1 in the high one
    (the released checkpoints' layout). Returned as int8, the dtype the checkpoints use."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({codes.shape[-1]}) of FP4 codes")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_fp4: uint8 codes, last dim doubled."""
    p = packed.view(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)


# ---- Hadamard ---------------------------------------------------------------------------------

def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform (Sylvester order) over the last dim, in float32.

    Iterative butterfly: at stride h, each pair (a, b) of elements h apart becomes (a+b, a-b);
    log2(n) stages give H_n x, and the n**-0.5 factor makes it orthonormal and self-inverse."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    y, h = x.float(), 1
    while h < n:
        y = y.unflatten(-1, (-1, 2, h))
        a, b = y.unbind(-2)
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return (y * n**-0.5).to(x.dtype)
