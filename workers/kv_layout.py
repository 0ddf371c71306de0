"""The compact cache layouts of kernels/kv_layout.py (byte order, exactness) for one model: the
dims come from its ModelConfig. The pools encode and decode through these.
"""

from __future__ import annotations

import torch

from kernels import kv_layout

from .config import ModelConfig


def encode_main(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Main keys [..., D] (any float dtype) -> uint8 [..., main_entry_bytes(cfg)]."""
    return kv_layout.encode_main(x, cfg.head_dim, cfg.nope_head_dim)


def decode_main(b: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., main_entry_bytes(cfg)] -> keys [..., D] in `dtype`."""
    return kv_layout.decode_main(b, cfg.head_dim, cfg.nope_head_dim, dtype)


def encode_index(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Indexer keys [..., Di] -> uint8 [..., indexer_entry_bytes(cfg)]."""
    return kv_layout.encode_index(x, cfg.index_head_dim)


def decode_index(b: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., indexer_entry_bytes(cfg)] -> indexer keys [..., Di] in `dtype`."""
    return kv_layout.decode_index(b, cfg.index_head_dim, dtype)
