"""The compressor's pooling step in pure torch (v4-architecture.md §3): the model's compressors
(workers/compressor.py) run these, and compressor_pool.py's kernels are checked against them.

Entry w pools, per channel, a softmax over its slots of kv weighted by score:
  HCA: the 128 tokens of window w;
  CSA: the A-halves of window w-1 (4 slots) then the B-halves of window w (4 slots); for w = 0
       the A slots are absent (kv 0, score -inf: zero weight, as in the reference).
"""

from __future__ import annotations

import torch

from .numerics import pointwise, seq_sum


def softmax_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Per-channel softmax over the slot dim of [n, slots, C]; sums in a fixed slot order."""
    mx = score.amax(dim=1, keepdim=True)
    e = pointwise(torch.exp, score - mx)
    return seq_sum(e * kv, 1) / seq_sum(e, 1)


def overlap_slots(kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None,
                  prev_score: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CSA windows kv, score [n, 4, 2C] (A-half | B-half per token) -> slots [n, 8, C]: the
    A-halves of the previous window, then the B-halves of this one.

    prev_kv, prev_score [4, C] are the A-halves of the window before the first one, or None when
    the first window is window 0 of the sequence."""
    C = kv.shape[-1] // 2
    a_kv, b_kv = kv[..., :C], kv[..., C:]
    a_sc, b_sc = score[..., :C], score[..., C:]
    if prev_kv is None:
        first_kv = torch.zeros_like(a_kv[:1])
        first_sc = torch.full_like(a_sc[:1], float("-inf"))
    else:
        first_kv, first_sc = prev_kv[None], prev_score[None]
    prev_kv = torch.cat([first_kv, a_kv[:-1]])
    prev_sc = torch.cat([first_sc, a_sc[:-1]])
    return torch.cat([prev_kv, b_kv], dim=1), torch.cat([prev_sc, b_sc], dim=1)
