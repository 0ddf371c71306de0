"""The released checkpoints' weight formats, in pure torch (v4-architecture.md §10): FP8 with one
power-of-two scale per 128x128 block, and FP4 experts packed two codes per byte with one
power-of-two scale per 32 inputs. Decoding serves the loader; encoding writes test checkpoints.
The block codes and scales themselves are kernels/block_quant.py's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.block_quant import (
    AMAX_FLOOR,
    FP8_MAX,
    fp4_e2m1_block_dequant,
    fp4_e2m1_block_quant,
    pack_fp4,
    pow2_ceil,
    unpack_fp4,
)

WEIGHT_BLOCK = 128  # FP8 weight scale block (both dims)
FP4_BLOCK = 32  # FP4 expert scale block (input dim)


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
    scale = pow2_ceil(amax / FP8_MAX)
    q = (w.float() / _expand_block_scale(scale, w.shape)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def dequant_fp4_weight(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed FP4 expert weight [..., out, in/2] (int8) with scales [..., out, in/32] -> float32."""
    codes = unpack_fp4(packed)
    if tuple(scale.shape) != (*codes.shape[:-1], codes.shape[-1] // FP4_BLOCK) or codes.shape[-1] % FP4_BLOCK:
        raise ValueError(f"FP4 scale shape {list(scale.shape)} does not match packed weight "
                         f"{list(packed.shape)} (expected {[*codes.shape[:-1], codes.shape[-1] // FP4_BLOCK]})")
    return fp4_e2m1_block_dequant(codes, scale, FP4_BLOCK)


def quant_fp4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of dequant_fp4_weight: (packed int8 [..., out, in/2], float8_e8m0fnu [..., out, in/32])."""
    codes, scale = fp4_e2m1_block_quant(w, FP4_BLOCK)
    return pack_fp4(codes), scale.to(torch.float8_e8m0fnu)
