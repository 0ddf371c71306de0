"""The lightning indexer of CSA layers (v4-architecture.md §4): picks, per query, the top-k
compressed entries by  I[t, w] = sum_h weight[t, h] * ReLU(q[t, h] . K[w]).

Its keys are made by its own CSA compressor (width index_head_dim) and cached per request.
Scores are computed against fixed blocks of KEY_BLOCK entries so a query's scores do not depend
on how many entries exist beyond the ones it may see (chunked == one-shot, bit for bit); ties
are broken by entry index (stable sort) for the same reason.
"""

from __future__ import annotations

import torch
from torch import nn

from .compressor import Compressor
from .config import CSA, ModelConfig
from .modules import Proj
from .numerics import linear
from .quant import fp4_e2m1_block_qdq, hadamard
from .rope import apply_rope

KEY_BLOCK = 64


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Proj(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, dtype)
        self.weights_proj = Proj(cfg.hidden_size, cfg.index_n_heads, dtype)
        self.compressor = Compressor(cfg.hidden_size, cfg.index_head_dim, CSA, cfg.rms_norm_eps)

    def queries(self, qr: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rounding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token indexer queries [N, Hi, Di] (float32) and head weights [N, Hi]."""
        q = self.wq_b(qr).view(qr.shape[0], self.n_heads, self.head_dim).float()
        q = apply_rope(q, cos, sin)
        if rounding:
            q = fp4_e2m1_block_qdq(hadamard(q), 32)
        w = self.weights_proj(x).float() * self.n_heads**-0.5
        return q, w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Top-k visible entries per query: [S, topk] entry indices, -1 where fewer are visible."""
        S = q.shape[0]
        scores = index_scores(q, w, keys)
        visible = torch.arange(keys.shape[0], device=q.device)[None, :] < ((positions + 1) // CSA)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        order = torch.sort(scores, dim=-1, descending=True, stable=True)
        k = min(self.topk, keys.shape[0])
        idx = torch.where(torch.isfinite(order.values[:, :k]), order.indices[:, :k], -1)
        if k < self.topk:
            idx = torch.cat([idx, idx.new_full((S, self.topk - k), -1)], dim=1)
        return idx


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
