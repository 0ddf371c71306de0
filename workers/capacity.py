"""Per-request state accounting in the compact cache layout (v4-architecture.md §6).

Notation: D = head_dim, r = qk_rope_head_dim, Di = index_head_dim, W = sliding_window.

Entry sizes (bytes):
  main entry (a window key or a compressed entry), FlashMLA's FP8 layout:
      (D - r) FP8 nope dims + 2r (BF16 RoPE dims) + (D - r)/64 UE8M0 scales, padded up to a
      multiple of 8                                                      = 584 at D=512, r=64
  indexer entry, MXFP4: Di/2 (packed FP4) + Di/32 (UE8M0 scales)        = 68 at Di=128

Growing state per token, whole model (an entry appears every m tokens, so it costs entry/m):
  csa_main    = n_CSA * main / 4
  csa_indexer = n_CSA * indexer / 4
  hca_main    = n_HCA * main / 128
  (SWA-only layers hold no growing state.)  Flash 3514.25, Pro 5031.4375 B/token.

Fixed state per request:
  swa_ring         = n_layers * W * main            (every layer keeps its last W keys)
  compressor_state = float32 kv + score (x 2 x 4 bytes) of the not yet compressed tokens:
      per CSA layer: main compressor open window [4, 2D] + overlap [4, D],
                     indexer compressor open window [4, 2Di] + overlap [4, Di]
      per HCA layer: open window [128, D]

Under a memory budget of B bytes (budget_capacity), with L layers, at context T:
  tokens_per_family[f] = floor(B / per-token bytes of f) for csa_main, csa_indexer, hca_main (null
      if the model has no such layer), and swa_window_full_store = floor(B / (L * main)): the raw
      window key of every layer kept for every token, as the full_store prefix policy does
  concurrent_requests  = floor(B / (bytes_per_token * T + fixed_bytes_per_request))

Cached-prefix bytes per token under each prefix-cache policy (design.md "Prefix reuse", §8.3):
  recompute   = bytes_per_token                          (compressed state only)
  full_store  = bytes_per_token + L * main                (plus every layer's raw window key)
  checkpoint  = bytes_per_token + checkpoint_bytes / (N * 256), one checkpoint every N blocks:
      checkpoint_bytes = L * W * main (the window tail of every layer)
                       + n_CSA * 2 * 4 * 4 * (D + Di)     (float32 CSA compressor overlap, kv + score,
                                                           [4, D] main and [4, Di] indexer)
      At a 256-aligned boundary no compressor window is open, so nothing else is needed. The extra
      checkpoints at each prompt's end (design.md) depend on the workload and are not counted.
  prefix_tokens_per_gib[p] = 2**30 / bytes[p];  ratio_to_full_store[p] = bytes[full_store] / bytes[p]
  The ratio of recompute, (bytes_per_token + L * main) / bytes_per_token, is the ceiling of what
  dropping window state can buy (about 8x for Flash-like schedules).
"""

from __future__ import annotations

import math
from typing import Any

from kernels.kv_layout import index_row_bytes, main_row_bytes

from .config import CSA, HCA, LAYER_KIND_NAMES, ModelConfig

F32 = 4
KV_AND_SCORE = 2  # the compressor keeps a kv row and a score row per token
GIB = 2**30
BLOCK_TOKENS = 256  # one logical cache block (design.md "State and pools")
DEFAULT_CONTEXT = 32768
DEFAULT_CHECKPOINT_INTERVAL = 16  # blocks of 256 tokens between prefix checkpoints


def main_entry_bytes(cfg: ModelConfig) -> int:
    return main_row_bytes(cfg.head_dim, cfg.nope_head_dim)


def indexer_entry_bytes(cfg: ModelConfig) -> int:
    return index_row_bytes(cfg.index_head_dim)


def compressor_state_bytes(cfg: ModelConfig, ratio: int) -> int:
    """Fixed float32 compressor state of one layer with the given compress ratio."""
    if ratio == CSA:
        # open window [4, 2w] + overlap [4, w], for the main (w = D) and indexer (w = Di) compressors
        return sum(KV_AND_SCORE * F32 * (CSA * 2 * w + CSA * w) for w in (cfg.head_dim, cfg.index_head_dim))
    if ratio == HCA:
        return KV_AND_SCORE * F32 * HCA * cfg.head_dim
    return 0


def state_bytes(cfg: ModelConfig) -> dict[str, Any]:
    main, idx = main_entry_bytes(cfg), indexer_entry_bytes(cfg)
    ratios = cfg.compress_ratios
    n_csa, n_hca = ratios.count(CSA), ratios.count(HCA)
    per_token = {"csa_main": n_csa * main / CSA, "csa_indexer": n_csa * idx / CSA, "hca_main": n_hca * main / HCA}
    fixed = {
        "swa_ring": len(ratios) * cfg.sliding_window * main,
        "compressor_state": sum(compressor_state_bytes(cfg, r) for r in ratios),
    }
    return {
        "model": cfg.name,
        "layer_types": cfg.layer_kinds,
        "layer_counts": {name: ratios.count(r) for r, name in LAYER_KIND_NAMES.items()},
        "main_entry_bytes": main,
        "indexer_entry_bytes": idx,
        "bytes_per_token": sum(per_token.values()),
        "bytes_per_token_by_family": per_token,
        "fixed_bytes_per_request": sum(fixed.values()),
        "fixed_bytes_by_family": fixed,
    }


def checkpoint_bytes(cfg: ModelConfig) -> int:
    """One prefix checkpoint at a 256-aligned boundary: every layer's window tail plus, per CSA
    layer, the float32 overlap (kv + score) of the main and the indexer compressor."""
    window = len(cfg.compress_ratios) * cfg.sliding_window * main_entry_bytes(cfg)
    overlap = KV_AND_SCORE * F32 * CSA * (cfg.head_dim + cfg.index_head_dim)
    return window + cfg.compress_ratios.count(CSA) * overlap


def prefix_bytes_per_token(cfg: ModelConfig, checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL) -> dict[str, float]:
    """Bytes one cached prefix token costs under each prefix-cache policy (module docstring)."""
    if checkpoint_interval < 1:
        raise ValueError(f"checkpoint interval must be at least 1 block, got {checkpoint_interval}")
    compressed = state_bytes(cfg)["bytes_per_token"]
    return {
        "full_store": compressed + len(cfg.compress_ratios) * main_entry_bytes(cfg),
        "checkpoint": compressed + checkpoint_bytes(cfg) / (checkpoint_interval * BLOCK_TOKENS),
        "recompute": compressed,
    }


def budget_capacity(cfg: ModelConfig, budget_bytes: int, context: int = DEFAULT_CONTEXT,
                    checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL) -> dict[str, Any]:
    """What fits in `budget_bytes` of state memory (formulas in the module docstring)."""
    if budget_bytes <= 0 or context <= 0:
        raise ValueError(f"budget and context must be positive, got {budget_bytes} B and {context} tokens")
    info = state_bytes(cfg)
    # A family the model does not have costs 0 B/token: any number of tokens fits, reported as null.
    fits_per = lambda total, per_token: total / per_token if per_token else None
    fits = lambda per_token: math.floor(budget_bytes / per_token) if per_token else None
    families = {f: fits(b) for f, b in info["bytes_per_token_by_family"].items()}
    families["swa_window_full_store"] = fits(len(cfg.compress_ratios) * main_entry_bytes(cfg))
    per_request = info["bytes_per_token"] * context + info["fixed_bytes_per_request"]
    prefix = prefix_bytes_per_token(cfg, checkpoint_interval)
    return {
        "budget_bytes": budget_bytes,
        "tokens_per_family": families,
        "context_tokens": context,
        "concurrent_requests": math.floor(budget_bytes / per_request),
        "checkpoint_interval_blocks": checkpoint_interval,
        "checkpoint_bytes": checkpoint_bytes(cfg),
        "prefix_bytes_per_token": prefix,
        "prefix_tokens_per_gib": {p: fits_per(GIB, b) for p, b in prefix.items()},
        "prefix_tokens_per_gib_ratio_to_full_store": {p: fits_per(prefix["full_store"], b) for p, b in prefix.items()},
    }
