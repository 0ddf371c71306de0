"""The MoE's elementwise steps (v4-architecture.md §5, "MoE"), the reference.

An expert is SwiGLU with a clamp: silu(min(w1 x, limit)) * clamp(w3 x, -limit, limit), then w2.
A token's routed output adds each picked expert's output times its weight, in expert order and,
within an expert, slot by slot (a hash layer may give one token the same expert twice):
    acc <- acc + y * w[slot]   for each slot, each product and sum rounded to the dtype
(the MoE's `_routed` path does this with index_add, the dense path with weights of 0 where a
slot did not pick the expert: the same bits, since y * 0 adds nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .numerics import pointwise


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate clamped above at limit) * (up clamped to [-limit, limit]), in gate's dtype."""
    return pointwise(F.silu, gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def add_weighted(acc: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """acc [N, d] + y [N, d] * w[:, s] for each slot s of w [N, k] (float32), in acc's dtype."""
    for s in range(w.shape[1]):
        acc = acc + y * w[:, s, None].to(acc.dtype)
    return acc
