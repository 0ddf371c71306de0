"""Pure-torch FP8 / FP4 numerics of the reference model (v4-architecture.md §2, §4, §6.1, §10).

Two uses:
  * activation rounding (quantize-dequantize) exactly as the reference applies it to main keys
    (FP8 E4M3, blocks of 64) and indexer q/k (Hadamard, then FP4 E2M1, blocks of 32);
  * decoding (and, for test checkpoints, encoding) the released weight formats: FP8 with one
    power-of-two scale per 128x128 block, and FP4 experts packed two codes per byte with one
    power-of-two scale per 32 inputs.
All scales are powers of two (UE8M0), so scaling and unscaling are exact: the only rounding is
the cast to the narrow format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0
FP4_MAX = 6.0
AMAX_FLOOR = 1e-4  # the reference clamps amax (not amax/qmax) before taking the scale (§14 item 7)
WEIGHT_BLOCK = 128  # FP8 weight scale block (both dims)
FP4_BLOCK = 32  # FP4 expert scale block (input dim)
# E2M1 magnitudes indexed by code bits 0-2; bit 3 is the sign.
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_FP4_MIDPOINTS = (FP4_VALUES[1:] + FP4_VALUES[:-1]) / 2


def _pow2_ceil(v: torch.Tensor) -> torch.Tensor:
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
    return _pow2_ceil(amax / qmax)


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
    mids = _FP4_MIDPOINTS.to(y.device)
    code = torch.bucketize(a, mids)
    tie = a == mids[code.clamp(max=len(mids) - 1)]
    code = code + (tie & (code % 2 == 1)).long()
    return (code | ((y < 0).long() << 3)).to(torch.uint8)


def _fp4_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes (bit 3 sign, bits 0-2 magnitude index)."""
    codes = codes.long()
    mag = FP4_VALUES.to(codes.device)[codes & 7]
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


# ---- checkpoint weights -----------------------------------------------------------------------

def _expand_block_scale(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per-128x128-block scales [..., ceil(out/128), ceil(in/128)] broadcast to the weight shape."""
    out, inn = shape[-2:]
    want = (-(-out // WEIGHT_BLOCK), -(-inn // WEIGHT_BLOCK))
    if tuple(scale.shape[-2:]) != want or scale.shape[:-2] != shape[:-2]:
        raise ValueError(f"FP8 scale shape {list(scale.shape)} does not match weight {list(shape)} "
                         f"(expected {[*shape[:-2], *want]})")
    s = scale.float().repeat_interleave(WEIGHT_BLOCK, -2).repeat_interleave(WEIGHT_BLOCK, -1)
    return s[..., :out, :inn]


def dequant_fp8_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W[i, j] = w[i, j] * scale[i // 128, j // 128] in float32 (scale is a multiplier, §10)."""
    return w.float() * _expand_block_scale(scale, w.shape)


def quant_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of dequant_fp8_weight: (float8_e4m3fn, float8_e8m0fnu scales per 128x128 block).
    Partial edge blocks are padded with zeros, which do not change the block amax."""
    out, inn = w.shape[-2:]
    padded = F.pad(w.float().abs(), (0, -inn % WEIGHT_BLOCK, 0, -out % WEIGHT_BLOCK))
    blocks = padded.unflatten(-1, (-1, WEIGHT_BLOCK)).unflatten(-3, (-1, WEIGHT_BLOCK))
    amax = blocks.amax(dim=(-3, -1)).clamp_min(AMAX_FLOOR)  # [..., out/128, in/128]
    scale = _pow2_ceil(amax / FP8_MAX)
    q = (w.float() / _expand_block_scale(scale, w.shape)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def dequant_fp4_weight(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed FP4 expert weight [..., out, in/2] (int8) with scales [..., out, in/32] -> float32."""
    codes = unpack_fp4(packed)
    if tuple(scale.shape) != (*codes.shape[:-1], codes.shape[-1] // FP4_BLOCK) or codes.shape[-1] % FP4_BLOCK:
        raise ValueError(f"FP4 scale shape {list(scale.shape)} does not match packed weight "
                         f"{list(packed.shape)} (expected {[*codes.shape[:-1], codes.shape[-1] // FP4_BLOCK]})")
    return _fp4_decode(codes) * scale.float().repeat_interleave(FP4_BLOCK, -1)


def quant_fp4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of dequant_fp4_weight: (packed int8 [..., out, in/2], float8_e8m0fnu [..., out, in/32])."""
    codes, scale = fp4_e2m1_block_quant(w, FP4_BLOCK)
    return pack_fp4(codes), scale.to(torch.float8_e8m0fnu)
