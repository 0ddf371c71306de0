"""mHC's collapse and expand of the residual streams (v4-architecture.md §5, "mHC"), the reference.

    collapse:  x = sum_j pre_j x_j                                  (float32, then the dtype)
    expand:    stream_k <- post_k * out + sum_j comb[j, k] x_j      (in the streams' dtype)
The sums over the hc streams run left to right (numerics.seq_sum), so their order is fixed.
"""

from __future__ import annotations

import torch

from .numerics import seq_sum


def collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """streams [N, hc, d], pre [N, hc] (float32) -> sum_j pre_j x_j [N, d] in the streams' dtype."""
    return seq_sum(pre[:, :, None] * streams.float(), 1).to(streams.dtype)


def expand(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams [N, hc, d]: post_k * out + sum_j comb[j, k] * x_j (post [N, hc], comb [N, hc, hc]
    float32; out [N, d])."""
    dtype = streams.dtype
    mixed = seq_sum(comb.to(dtype)[:, :, :, None] * streams[:, :, None, :], 1)
    return post.to(dtype)[:, :, None] * out[:, None, :] + mixed
