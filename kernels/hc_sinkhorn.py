"""mHC mixing weights in one kernel (reference: hc_sinkhorn_ref.py).

The reference is about 6 * iters small torch operations per call (120 at the released 20
iterations), and the model calls it twice per layer for every forward: at decode, where each
operation touches a few hundred bytes, that is launch overhead and nothing else. Here a program
takes BLOCK_R token rows and does the sigmoids, the softmax and every Sinkhorn round in
registers (hc x hc values per row).

Numerics: float32 throughout, divisions rounded to nearest (`div_rn`, as torch divides), sums over
hc in tl.sum's order, exp through Triton's exp. Within a few float32 ulps of the reference, and a
row's result does not depend on the other rows of the call (rows never mix).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import rows_per_program, use_triton
from .hc_sinkhorn_ref import hc_mix as reference

BLOCK_R = 16  # token rows per program on a GPU (more in the interpreter: dispatch.rows_per_program)


@triton.jit
def _sigmoid(x):
    return tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + tl.exp(-x))


@triton.jit
def _hc_mix_kernel(mix_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, N, mix_stride, hc_eps,
                   HC: tl.constexpr, ITERS: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < N
    row = mix_ptr + r.to(tl.int64) * mix_stride
    i = tl.arange(0, HC)
    s0, s1, s2 = tl.load(scale_ptr), tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)

    pre = _sigmoid(tl.load(row[:, None] + i[None, :], mask=ok[:, None], other=0.0) * s0
                   + tl.load(base_ptr + i)[None, :]) + hc_eps
    post = 2.0 * _sigmoid(tl.load(row[:, None] + HC + i[None, :], mask=ok[:, None], other=0.0) * s1
                          + tl.load(base_ptr + HC + i)[None, :])
    out2 = r.to(tl.int64)[:, None] * HC + i[None, :]
    tl.store(pre_ptr + out2, pre, mask=ok[:, None])
    tl.store(post_ptr + out2, post, mask=ok[:, None])

    jk = i[:, None] * HC + i[None, :]  # [HC, HC]: comb[j, k]
    comb = (tl.load(row[:, None, None] + 2 * HC + jk[None, :, :], mask=ok[:, None, None], other=0.0) * s2
            + tl.load(base_ptr + 2 * HC + jk)[None, :, :])
    e = tl.exp(comb - tl.max(comb, axis=2)[:, :, None])
    comb = tl.math.div_rn(e, tl.broadcast_to(tl.sum(e, axis=2)[:, :, None], e.shape)) + hc_eps
    comb = tl.math.div_rn(comb, tl.broadcast_to(tl.sum(comb, axis=1)[:, None, :] + hc_eps, comb.shape))
    for _ in tl.static_range(ITERS - 1):
        comb = tl.math.div_rn(comb, tl.broadcast_to(tl.sum(comb, axis=2)[:, :, None] + hc_eps, comb.shape))
        comb = tl.math.div_rn(comb, tl.broadcast_to(tl.sum(comb, axis=1)[:, None, :] + hc_eps, comb.shape))
    out3 = r.to(tl.int64)[:, None, None] * (HC * HC) + jk[None, :, :]
    tl.store(comb_ptr + out3, comb, mask=ok[:, None, None])


def hc_mix(mix: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int, iters: int,
           hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pre [N, hc], post [N, hc], comb [N, hc, hc] from mix [N, hc*(2+hc)] float32 (see the
    reference); the kernel where it runs and hc is a power of two, the reference otherwise."""
    if mix.dim() != 2 or mix.shape[1] != hc * (2 + hc):
        raise ValueError(f"mix has shape {list(mix.shape)}, expected [N, {hc * (2 + hc)}]")
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if not use_triton(mix) or hc & (hc - 1):
        return reference(mix, base, scale, hc, iters, hc_eps)
    mix = mix.float()
    if mix.stride(1) != 1:
        mix = mix.contiguous()
    N = mix.shape[0]
    pre = torch.empty(N, hc, dtype=torch.float32, device=mix.device)
    post = torch.empty_like(pre)
    comb = torch.empty(N, hc, hc, dtype=torch.float32, device=mix.device)
    if N:
        rows = rows_per_program(mix, BLOCK_R)
        _hc_mix_kernel[(triton.cdiv(N, rows),)](
            mix, base.float().contiguous(), scale.float().contiguous(), pre, post, comb, N, mix.stride(0),
            float(hc_eps), HC=hc, ITERS=iters, BLOCK_R=rows)
    return pre, post, comb
