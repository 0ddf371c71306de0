"""Parameter holders named like the DeepSeek checkpoint (`wq_a.weight`, `norm.weight`, ...), so the
model's state_dict keys are the released tensor names and loading needs no renaming."""

from __future__ import annotations

import torch
from torch import nn

from kernels import numerics
from kernels.dispatch import use_triton
from kernels.numerics import linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """numerics.rms_norm of x.to(out_dtype); one launch on the kernel path (kernels/rms_norm.py),
    within float32 rounding of it (a decode step normalises 30 times, 7-8 kernels each in torch)."""
    if use_triton(x):
        from kernels.rms_norm import rms_norm as rms_norm_kernel

        return rms_norm_kernel(x, weight, eps, out_dtype)
    return numerics.rms_norm(x.to(out_dtype or x.dtype), weight, eps)


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """numerics.linear(x, weight); a decode step's float32 projections (compressors, mHC) through
    kernels/linear_f32.py on a GPU, where cuBLAS streams their weights at a sixth of the copy rate."""
    if weight.dtype == torch.float32 and use_triton(x):
        from kernels.linear_f32 import linear_f32, wanted

        if wanted(x, weight):
            return linear_f32(x, weight)
    return linear(x, weight)


class Proj(nn.Module):
    """A bias-free projection [out, in]; row-invariant (see numerics.linear)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x.to(self.weight.dtype), self.weight)


class Norm(nn.Module):
    """Weighted RMSNorm; the weight stays float32 like the reference's."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def f32_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=torch.float32), requires_grad=False)
