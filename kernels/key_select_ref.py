"""Reference of key_select.select_entries: torch.topk over the int64 score keys."""

from __future__ import annotations

import torch

SENTINEL = -(2**63)  # the key of an invisible column; its top 32 bits decode to NaN


def scores_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """int64 score keys -> float32 scores (NaN for invisible columns)."""
    top = (keys >> 32).to(torch.int32)
    return torch.where(top < 0, top ^ 0x7FFFFFFF, top).view(torch.float32)


def entries_of_keys(best: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Picked keys and their columns -> entries, -1 where the score is a sentinel's NaN or not finite."""
    return torch.where(torch.isfinite(scores_from_keys(best)), idx, -1).to(torch.int32)


def select_entries(keys: torch.Tensor, k: int) -> torch.Tensor:
    """[S, n] int64 keys -> [S, k] int32 entries of the k largest keys, descending."""
    best, idx = torch.topk(keys, k, dim=1, sorted=True)
    return entries_of_keys(best, idx)


def keys_of_scores(scores: torch.Tensor, n_visible: torch.Tensor) -> torch.Tensor:
    """The scan's keys (indexer_topk._keys_of) of float32 scores [S, n] with n_visible [S]
    visible columns per row (the rest hold the sentinel): for tests and benchmarks."""
    bits = scores.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    col = torch.arange(scores.shape[1], device=scores.device)
    keys = ordered * 4294967296 + (2147483647 - col)
    return torch.where(col < n_visible.to(scores.device)[:, None], keys, SENTINEL)
