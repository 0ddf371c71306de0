"""Manifold-constrained hyper-connections (v4-architecture.md §5, "mHC").

The residual is hc_mult streams per token [N, hc, d]. Before a sub-layer, a projection of the
normalised streams gives `pre` (collapse weights), `post` (expand weights) and `comb` (stream
mixing, made doubly stochastic by Sinkhorn iterations). After it:
    stream_k <- post_k * f(sum_j pre_j x_j) + sum_j comb[j, k] x_j
All of this runs in float32; the small sums over streams run in a fixed order (numerics.seq_sum).
"""

from __future__ import annotations

import torch

from kernels import hc_streams_ref
from kernels.dispatch import use_triton
from kernels.hc_sinkhorn_ref import hc_mix
from kernels.numerics import pointwise

from .modules import project, rms_norm


def hc_weights(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
               iters: int, hc_eps: float, norm_eps: float):
    """Returns pre [N, hc], post [N, hc], comb [N, hc, hc] (comb[j, k]: from stream j to k)."""
    N, hc, d = streams.shape
    mix = project(rms_norm(streams.reshape(N, hc * d), None, norm_eps, torch.float32), fn.float())
    if use_triton(mix):  # one launch instead of ~6 * iters small operations (kernels/hc_sinkhorn.py)
        from kernels.hc_sinkhorn import hc_mix as hc_mix_kernel

        return hc_mix_kernel(mix, base, scale, hc, iters, hc_eps)
    return hc_mix(mix, base, scale, hc, iters, hc_eps)


def collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_j pre_j x_j -> [N, d] (kernels/hc_streams_ref.py; one launch on the kernel path)."""
    if use_triton(streams):
        from kernels.hc_streams import collapse as collapse_kernel

        return collapse_kernel(streams, pre)
    return hc_streams_ref.collapse(streams, pre)


def expand(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams: post_k * out + sum_j comb[j, k] * x_j  -> [N, hc, d] (one launch on the kernel path)."""
    if use_triton(streams):
        from kernels.hc_streams import expand as expand_kernel

        return expand_kernel(streams, out, post, comb)
    return hc_streams_ref.expand(streams, out, post, comb)


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse of the streams before the output norm."""
    N, hc, d = streams.shape
    mix = project(rms_norm(streams.reshape(N, hc * d), None, norm_eps, torch.float32), fn.float())
    pre = pointwise(torch.sigmoid, mix * scale.float() + base.float()) + hc_eps
    return collapse(streams, pre)
