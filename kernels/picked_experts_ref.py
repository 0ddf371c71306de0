"""Reference of picked_experts: how a batch's expert picks are grouped, and the routed sum.

A batch of M rows with k picks each is P = M k pairs (row, slot); pair p = row * k + slot. The
kernels run each picked expert once on the rows that picked it, so the pairs are put in the order
(expert, pair): `order[q]` is the pair at position q, group g (the g-th picked expert in
ascending order) holds positions start[g] .. start[g + 1] - 1 and reads expert[g]'s weights.
The MoE adds a row's expert outputs in expert order, then slot order (workers/moe.py), which is
the order of the row's positions: `by_row[r, j]` is the position of row r's j-th pick in it.
A pick outside [0, E) is in no group; its `by_row` entry is -1 and it adds nothing, as the
dense MoE's table weights such a pick nowhere.
"""

from __future__ import annotations

import torch


def group_picks(experts: torch.Tensor, weights: torch.Tensor, n_experts: int) -> dict[str, torch.Tensor]:
    """experts [M, k], weights [M, k] -> order [P], start [G + 1], expert [G], by_row [M, k]
    (int32) and w_by_row [M, k] (float32: the weight of by_row's pick, 0 for none), where
    G = min(E, P): groups past the picked experts' count are empty (start = the valid pairs'
    count) and read expert 0, so a launch of G programs needs no count from the device."""
    M, k = experts.shape
    P, G = M * k, min(n_experts, M * k)
    flat = experts.reshape(-1).long()
    valid = (flat >= 0) & (flat < n_experts)
    e = torch.where(valid, flat, n_experts)
    order = torch.argsort(e * P + torch.arange(P), stable=True)  # (expert, pair) order
    pos = torch.empty(P, dtype=torch.long)
    pos[order] = torch.arange(P)
    picked = torch.unique(e[valid])
    counts = torch.stack([(e == x).sum() for x in picked]) if len(picked) else torch.zeros(0, dtype=torch.long)
    start = torch.full((G + 1,), int(valid.sum()), dtype=torch.long)
    start[: len(picked)] = torch.cumsum(counts, 0) - counts
    expert = torch.zeros(G, dtype=torch.long)
    expert[: len(picked)] = picked
    by_row = torch.where(valid, pos, -1).reshape(M, k)
    # a row's picks in position order; the invalid ones (-1) last
    by_row, slot = torch.sort(torch.where(by_row < 0, P, by_row), dim=1)
    w_by_row = torch.where(by_row == P, 0.0, weights.float().gather(1, slot))
    by_row = torch.where(by_row == P, -1, by_row)
    return {"order": order.int(), "start": start.int(), "expert": expert.int(), "by_row": by_row.int(),
            "w_by_row": w_by_row}
