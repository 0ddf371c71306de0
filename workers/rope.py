"""Rotary embeddings, per layer kind.

V4 rotates the *trailing* `qk_rope_head_dim` dims of a vector as interleaved pairs (x0,x1),
(x2,x3), ... SWA-only layers use theta=rope_theta with no scaling; CSA/HCA layers use
theta=compress_rope_theta with YaRN frequencies and no attention (mscale) factor. The same
rotation serves queries, window keys, compressed entries (at position m*w), indexer queries and
keys, and, with the angle negated, the attention output.
"""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton
from kernels.numerics import pointwise
from kernels.rope_ref import rotate

from .config import ModelConfig, yarn_inv_freq_params


def inv_freq(cfg: ModelConfig, compressed_layer: bool) -> torch.Tensor:
    """[rope_dim/2] float32 inverse frequencies of a layer kind."""
    dim = cfg.qk_rope_head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    if not compressed_layer:
        return 1.0 / (cfg.rope_theta**exponents)
    pos_freqs = cfg.compress_rope_theta**exponents
    extrapolation = 1.0 / pos_freqs
    if cfg.yarn is None:
        return extrapolation
    interpolation = 1.0 / (cfg.yarn.factor * pos_freqs)
    low, high = yarn_inv_freq_params(cfg)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = high-frequency pairs kept as-is, 0 = fully interpolated
    return interpolation * (1 - keep) + extrapolation * keep


def cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, rope_dim/2] (float32) for integer positions [N]."""
    angles = positions.to(torch.float32)[:, None] * freqs.to(positions.device)[None, :]
    return pointwise(torch.cos, angles), pointwise(torch.sin, angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing 2*cos.shape[-1] dims of x [N, ..., D] by per-row angles cos/sin [N, r/2]
    (kernels/rope_ref.py; on the kernel path one launch, kernels/rope.py, with the same bits)."""
    if use_triton(x):
        from kernels.rope import rotate as rotate_kernel

        return rotate_kernel(x, cos, sin, inverse)
    return rotate(x, cos, sin, inverse)
