"""Per-request state accounting in the compact cache layout (v4-architecture.md §6).

Entry sizes:
  main entry (window key or compressed entry) = (D - r) FP8 bytes + 2r BF16 bytes
      + one UE8M0 scale byte per 64 FP8 dims, padded to a multiple of 8      (584 B at D=512, r=64)
  indexer key = Di/2 bytes of packed FP4 + Di/32 UE8M0 scales                (68 B at Di=128)
Growing bytes per token: CSA layer main/4 + indexer/4, HCA layer main/128, SWA-only 0.
Fixed bytes per request: every layer's sliding window (W main entries), plus float32 compressor
state as v4serve stores it: per CSA layer the main compressor's open window [4, 2D] and overlap
[4, D] (kv and score each) and the same for the indexer compressor at Di; per HCA layer the open
window [128, D] (kv and score).
"""

from __future__ import annotations

import math

from .config import CSA, HCA, SWA, ModelConfig

F32 = 4


def main_entry_bytes(cfg: ModelConfig) -> int:
    nope, rope = cfg.nope_head_dim, cfg.qk_rope_head_dim
    raw = nope + 2 * rope + nope // 64
    return math.ceil(raw / 8) * 8


def indexer_entry_bytes(cfg: ModelConfig) -> int:
    return cfg.index_head_dim // 2 + cfg.index_head_dim // 32


def compressor_state_bytes(cfg: ModelConfig, ratio: int) -> int:
    """Fixed float32 compressor state of one layer of the given kind (kv + score)."""
    D, Di = cfg.head_dim, cfg.index_head_dim
    if ratio == CSA:
        per_width = lambda w: 2 * F32 * (CSA * 2 * w + CSA * w)  # open [4, 2w] + overlap [4, w]
        return per_width(D) + per_width(Di)
    if ratio == HCA:
        return 2 * F32 * HCA * D
    return 0


def state_bytes(cfg: ModelConfig) -> dict:
    main, idx = main_entry_bytes(cfg), indexer_entry_bytes(cfg)
    kinds = cfg.compress_ratios
    n_csa, n_hca, n_swa = kinds.count(CSA), kinds.count(HCA), kinds.count(SWA)
    per_token = {
        "csa_main": n_csa * main / CSA,
        "csa_indexer": n_csa * idx / CSA,
        "hca_main": n_hca * main / HCA,
    }
    fixed = {
        "swa_ring": len(kinds) * cfg.sliding_window * main,
        "compressor_state": sum(compressor_state_bytes(cfg, r) for r in kinds),
    }
    return {
        "model": cfg.name,
        "layer_types": cfg.layer_kinds,
        "layers": {"sliding_attention": n_swa, "compressed_sparse_attention": n_csa,
                   "heavily_compressed_attention": n_hca},
        "main_entry_bytes": main,
        "indexer_entry_bytes": idx,
        "bytes_per_token": sum(per_token.values()),
        "bytes_per_token_by_family": per_token,
        "fixed_bytes_per_request": sum(fixed.values()),
        "fixed_bytes_by_family": fixed,
    }
