"""mHC mixing weights from the projected streams (v4-architecture.md §5): the reference.

From `mix` [N, hc*(2+hc)] (the linear projection of the normalised streams) it gives
    pre  = sigmoid(mix[:, :hc] * scale[0] + base[:hc]) + eps               (collapse weights)
    post = 2 * sigmoid(mix[:, hc:2hc] * scale[1] + base[hc:2hc])           (expand weights)
    comb = Sinkhorn(softmax_k(mix[:, 2hc:] * scale[2] + base[2hc:]) + eps)  (stream mixing)
where Sinkhorn first normalises columns (sum over j of comb[j, k]), then alternates rows and
columns for iters - 1 more rounds, each sum + eps. All in float32; each row on its own.
"""

from __future__ import annotations

import torch

from .numerics import pointwise


def hc_mix(mix: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int, iters: int,
           hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns pre [N, hc], post [N, hc], comb [N, hc, hc] (comb[j, k]: from stream j to k)."""
    N = mix.shape[0]
    pre = pointwise(torch.sigmoid, mix[:, :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2 * pointwise(torch.sigmoid, mix[:, hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    comb = mix[:, 2 * hc :].view(N, hc, hc) * scale[2] + base[2 * hc :].view(hc, hc)
    comb = torch.softmax(comb, dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=1, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=2, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=1, keepdim=True) + hc_eps)
    return pre, post, comb
