"""Rotary rotation of the trailing dims of a vector, as interleaved pairs: the reference.

The trailing 2*r dims of x hold r pairs (x0, x1); pair i turns by angle a_i of its row:
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)
in float32, the result cast back to x's dtype; `inverse` turns by -a. The other dims pass
unchanged. (workers/rope.py makes the angles per layer kind.)
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing 2*cos.shape[-1] dims of x [N, ..., D] by per-row angles cos/sin [N, r]."""
    half = cos.shape[-1]
    rot = x[..., -2 * half :].float()
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    c, s = cos.reshape(shape), sin.reshape(shape)
    if inverse:
        s = -s
    x0, x1 = rot[..., 0::2], rot[..., 1::2]
    out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    return torch.cat([x[..., : -2 * half], out.to(x.dtype)], dim=-1)
