"""HCA decode attention (v4-architecture.md §5, §9): each query attends over its window plus every
visible HCA entry e < (t+1)/128, all heads in one softmax with the sink.

It is the split kernel of sparse_decode.py with the compressed slots numbered 0..visible-1 instead
of taken from a top-k list. The key list grows with the context (8,192 entries + 128 window keys
at 1M), so the fixed split size here is larger than CSA's: a split's partial output (H x D per
query) must stay small next to the key bytes it reads. On Hopper the split programs are a Gluon
kernel (split_attention_hopper.py, shared with CSA decode: its own split sizes, the same partials
and merge).
"""

from __future__ import annotations

import logging

import torch

from . import split_attention_hopper as hopper
from .dispatch import gluon_ran, use_triton
from .geometry import BLOCK, HCA
from .sparse_decode import dispatch_split_attention, gather_reference

log = logging.getLogger(__name__)

HCA_KEYS_PER_SPLIT = 512  # 299 KB of keys per split against 64 KB (bf16) of partial output
# Hopper GPUs take the split programs in Gluon (split_attention_hopper.py); False after a Gluon kernel
# failed to compile or launch here, or to run the Triton kernel there (benchmarks)
HOPPER_HCA = True


def reference(q, sink, swa, swa_table, positions, entries, block_table, window: int, nope_dim: int):
    ratio = BLOCK // entries.shape[1]
    ids = torch.arange(block_table.shape[1] * entries.shape[1], device=q.device).expand(q.shape[0], -1)
    visible = ids < ((positions.long() + 1) // ratio)[:, None]
    return gather_reference(q, sink, swa, swa_table, positions, entries, block_table, ids, visible,
                            window, nope_dim)


def hca_decode(q: torch.Tensor, sink: torch.Tensor, swa: torch.Tensor, swa_table: torch.Tensor,
               positions: torch.Tensor, entries: torch.Tensor, block_table: torch.Tensor,
               window: int, nope_dim: int) -> torch.Tensor:
    """HCA decode attention: q [B, H, D] at positions [B] over its window and all visible entries.

    As sparse_mqa_decode, but entries is pools.hca_main[:, slot] ([P_blk, 2, row_bytes]: a page
    holds the 2 entries of one 256-position block, so an entry covers 256/2 = 128 positions) and
    every entry e < (t+1)//128 is attended. block_table [B, n_blk] must cover them.
    """
    if not use_triton(q):
        return reference(q, sink, swa, swa_table, positions, entries, block_table, window, nope_dim)
    common = (q, sink, swa, swa_table, positions, entries, block_table, None, window, nope_dim, BLOCK // entries.shape[1])
    gluon_splits = dict(keys_per_split=hopper.KEYS_PER_SPLIT, short_query=(hopper.SHORT_QUERY_KEYS,
                                                                           hopper.SHORT_QUERY_SPLIT))
    return dispatch_split_attention(common, HOPPER_HCA, gluon_splits, _hopper_split, HCA_KEYS_PER_SPLIT)


def _hopper_split(args, consts, n_splits: int, batch: int) -> bool:
    """Run the Gluon split programs; False, and the Triton ones from then on, where this Triton
    cannot compile or launch them (dispatch.gluon_ran)."""
    global HOPPER_HCA
    HOPPER_HCA = gluon_ran(lambda: hopper.launch(args, consts, n_splits, batch), "HCA kernel", "kernel", log)
    return HOPPER_HCA


def decode_traffic(B: int, context: int, heads: int = 64, head_dim: int = 512, row_bytes: int = 584,
                   window: int = 128, ratio: int = HCA, q_bytes: int = 2) -> tuple[int, int]:
    """(bytes read and written, FLOPs) of one call for B queries at position context-1.

    Bytes: the window and every visible entry row once, q in and out in q's dtype (split partials
    are the kernel's overhead, not counted). FLOPs: QK and PV, 2*H*D each per key.
    """
    keys = window + context // ratio
    moved = B * (keys * row_bytes + 2 * heads * head_dim * q_bytes)
    return moved, B * 4 * heads * head_dim * keys
