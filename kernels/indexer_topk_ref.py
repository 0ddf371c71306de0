"""The lightning indexer's scores and top-k selection in pure torch (v4-architecture.md §4): the
model's indexer (workers/indexer.py) runs these, and indexer_topk.py's kernel is checked against
them. Per query t and entry w,  I[t, w] = sum_h weight[t, h] * ReLU(q[t, h] . K[w]) * Di**-0.5.

Scores are computed against fixed blocks of KEY_BLOCK entries so a query's scores do not depend
on how many entries exist beyond the ones it may see (chunked == one-shot, bit for bit); ties
are broken by entry index (stable sort) for the same reason.
"""

from __future__ import annotations

import torch

from .geometry import CSA
from .numerics import linear

KEY_BLOCK = 64


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """I[t, j] for queries q [S, Hi, Di], head weights w [S, Hi] and keys [n, Di] -> [S, n] float32."""
    S, H, D = q.shape
    n = keys.shape[0]
    out = []
    flat_q = q.reshape(S * H, D)
    for b0 in range(0, n, KEY_BLOCK):
        block = keys[b0 : b0 + KEY_BLOCK].float()
        if block.shape[0] < KEY_BLOCK:
            block = torch.cat([block, block.new_zeros(KEY_BLOCK - block.shape[0], D)])
        qk = linear(flat_q, block).view(S, H, KEY_BLOCK).relu() * D**-0.5
        out.append(torch.bmm(w[:, None, :], qk)[:, 0])
    if not out:
        return q.new_empty(S, 0)
    return torch.cat(out, dim=1)[:, :n]


def select_topk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                topk: int) -> torch.Tensor:
    """Top-k visible entries per query (entry w is visible at position t when 4w+3 <= t) by
    descending score, ties to the lower index: [S, topk] entry indices, -1 where fewer are visible."""
    S = q.shape[0]
    scores = index_scores(q, w, keys)
    visible = torch.arange(keys.shape[0], device=q.device)[None, :] < ((positions + 1) // CSA)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    k = min(topk, keys.shape[0])
    idx = torch.where(torch.isfinite(order.values[:, :k]), order.indices[:, :k], -1)
    if k < topk:
        idx = torch.cat([idx, idx.new_full((S, topk - k), -1)], dim=1)
    return idx
