"""Reference sparse MQA in pure torch (v4-architecture.md §2 step 5, §5): every query over its own
key list [window slots | compressed slots], one softmax with a per-head sink.

The model's reference path (workers/attention.py) calls these, and they are the reference of the
attention kernels (sparse_decode.py, hca_decode.py, prefill_attention.py).
"""

from __future__ import annotations

import torch

from .geometry import CSA, HCA, SWA

QUERY_BLOCK = 256  # queries per attention call: bounds the per-query key gather [G, keys, D]


def attend_window_and_entries(q: torch.Tensor, pos: torch.Tensor, win_keys: torch.Tensor, win_valid: torch.Tensor,
                              entries: torch.Tensor | None, picked: torch.Tensor | None, ratio: int,
                              sink: torch.Tensor) -> torch.Tensor:
    """Reference attention of a query block: q [G, H, D] at positions pos [G] over its window slots
    win_keys [G, W, D] (valid [G, W]) and compressed entries [n, D]: for CSA the picked indices
    [G, K] (-1 none), for HCA every entry w with 128w+127 <= t, for SWA none."""
    if ratio == SWA:
        return attend(q, win_keys, win_valid, sink)
    if ratio == CSA:
        if entries.shape[0] == 0:  # nothing to pick yet; every compressed slot is masked anyway
            entries = entries.new_zeros(1, entries.shape[1])
        keys = torch.cat([win_keys, entries[picked.clamp(min=0)]], dim=1)
        return attend(q, keys, torch.cat([win_valid, picked >= 0], dim=1), sink)
    # HCA: queries that see the same count share a call.
    visible = (pos + 1) // HCA
    out = torch.empty_like(q)
    for n in visible.unique().tolist():
        sel = (visible == n).nonzero().squeeze(1)
        g = sel.shape[0]
        keys = torch.cat([win_keys[sel], entries[:n].expand(g, n, -1)], dim=1)
        valid = torch.cat([win_valid[sel], win_valid.new_ones(g, n)], dim=1)
        out[sel] = attend(q[sel], keys, valid, sink)
    return out


def attend(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Reference sparse MQA: q [G, H, D], per-query keys [G, N, D] (K = V), valid [G, N], sink [H].

    o = sum_j exp(s_j) k_j / (sum_j exp(s_j) + exp(sink)),  s_j = q.k_j / sqrt(D).
    Scores and softmax in float32 (as the reference); probabilities back in the key dtype for PV.
    """
    G, H, D = q.shape
    s = torch.bmm(q.float(), keys.float().transpose(1, 2)) * D**-0.5
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    logits = torch.cat([s, sink.float().view(1, H, 1).expand(G, H, 1)], dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)
    p = torch.softmax(logits, dim=-1)[..., :-1]
    return torch.bmm(p.to(keys.dtype), keys).to(q.dtype)
