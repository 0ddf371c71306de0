"""The lightning indexer of CSA layers (v4-architecture.md §4): picks, per query, the top-k
compressed entries by  I[t, w] = sum_h weight[t, h] * ReLU(q[t, h] . K[w]).

Its keys are made by its own CSA compressor (width index_head_dim) and cached per request. The
scores and the selection rule are kernels/indexer_topk_ref.py's (row-invariant, ties by index).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.indexer_topk_ref import select_topk

from .compressor import Compressor, round_index_key
from .config import CSA, ModelConfig
from .modules import Proj
from .rope import apply_rope


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
            q = round_index_key(q)
        w = self.weights_proj(x).float() * self.n_heads**-0.5
        return q, w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Top-k visible entries per query: [S, topk] entry indices, -1 where fewer are visible."""
        return select_topk(q, w, keys, positions, self.topk)
