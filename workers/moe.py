"""Mixture of experts (v4-architecture.md §5, "MoE").

Router scores are sqrt(softplus(x W^T)). Hash layers take their experts from a frozen
token-id -> experts table; the other layers take the top-k of scores + bias (bias only
selects). Weights are the selected scores normalised to sum 1, times routed_scaling_factor.
Experts and the shared expert are SwiGLU with gate <= limit and |up| <= limit.
A token's expert outputs are added in expert-index order, whatever else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import moe_elementwise_ref
from kernels.dispatch import use_triton
from kernels.numerics import linear, pointwise, seq_sum

from .config import ModelConfig
from .modules import Proj, f32_param

# Without the kernels (kernels/picked_experts.py), a graphed decode step runs every expert on every
# row (MoE._routed_dense), which reads every expert's weights: only for presets of this many.
DENSE_MAX_EXPERTS = 16
# Up to this many rows, an eager forward on the kernel path keeps the picks on the device too.
DEVICE_MAX_ROWS = 128


def routes_on_device(cfg: ModelConfig, t: torch.Tensor) -> bool:
    """Can a step on t's device route without reading the picks on the host (so be graphed)?
    The dense torch path takes a few experts; the picked experts' kernels any count, with a
    shared expert as wide as the routed ones (they run it as one more group) and the picks of
    DEVICE_MAX_ROWS rows (the largest decode bucket) within what their one grouping program sorts."""
    if cfg.n_routed_experts <= DENSE_MAX_EXPERTS:
        return True
    if not use_triton(t) or cfg.n_shared_experts != 1:
        return False
    from kernels.picked_experts import MAX_PAIRS

    return cfg.num_experts_per_tok * DEVICE_MAX_ROWS <= MAX_PAIRS


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """kernels/moe_elementwise_ref.py's SwiGLU; one launch on the kernel path (same bits on a GPU)."""
    if use_triton(gate):
        from kernels.moe_elementwise import swiglu as swiglu_kernel

        return swiglu_kernel(gate, up, limit)
    return moe_elementwise_ref.swiglu(gate, up, limit)


def add_weighted(acc: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """acc + y * w[:, s] slot by slot (moe_elementwise_ref.py); one launch on the kernel path."""
    if use_triton(acc):
        from kernels.moe_elementwise import add_weighted as add_weighted_kernel

        return add_weighted_kernel(acc, y, w)
    return moe_elementwise_ref.add_weighted(acc, y, w)


class Expert(nn.Module):
    def __init__(self, d: int, inter: int, limit: float, dtype: torch.dtype):
        super().__init__()
        self.w1, self.w3 = Proj(d, inter, dtype), Proj(d, inter, dtype)
        self.w2 = Proj(inter, d, dtype)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = self.w1.weight, self.w3.weight, self.w2.weight
        if use_triton(x):
            from kernels import expert_mlp

            x = x.to(w1.dtype)
            if expert_mlp.runs(x, w1, w3, w2):  # the products picked_experts.py runs: its bits
                return expert_mlp.expert_down(expert_mlp.expert_up(x, w1[None], w3[None], self.limit), w2[None])[0]
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.hashed, self.k, self.scale = hashed, cfg.num_experts_per_tok, cfg.routed_scaling_factor
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.int64))
        else:
            self.bias = f32_param(cfg.n_routed_experts)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids [N, k] and their weights [N, k] (float32)."""
        scores = pointwise(F.softplus, linear(x, self.weight).float()).sqrt()
        if self.hashed:
            experts = self.tid2eid[token_ids]
        else:
            experts = torch.topk(scores + self.bias, self.k, dim=-1, sorted=False).indices
        picked = scores.gather(1, experts)
        weights = picked / (seq_sum(picked, 1)[:, None] + 1e-20) * self.scale
        return experts, weights


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype):
        super().__init__()
        d, inter, lim = cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit
        self.gate = Gate(cfg, cfg.is_hash_layer(layer), dtype)
        self.experts = nn.ModuleList(Expert(d, inter, lim, dtype) for _ in range(cfg.n_routed_experts))
        self.shared_experts = Expert(d, inter * cfg.n_shared_experts, lim, dtype)
        self._tie_experts()

    def _tie_experts(self) -> None:
        """Make the routed experts' w1, w3 and w2 views of one [E, ...] tensor each, so the picked
        experts' kernels (kernels/picked_experts.py) reach any expert from one base. The checkpoint
        names stay per expert, and loading copies into the views, hence into the stacks."""
        self._stacks = {}
        for name in ("w1", "w3", "w2"):
            params = [getattr(e, name).weight for e in self.experts]
            stack = torch.stack([p.data for p in params])
            for i, p in enumerate(params):
                p.data = stack[i]
            self._stacks[name] = stack

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() give each parameter new storage: stack and tie them again
        out = super()._apply(fn, *args, **kwargs)
        self._tie_experts()
        return out

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(w1, w3, w2) as [E, ...] tensors, or None if a parameter no longer views its stack
        (replaced rather than copied into): then the experts run one by one."""
        for name, stack in self._stacks.items():
            # expert i's slice by address arithmetic: indexing the stack would dispatch a view per
            # expert and weight on every eager call (192 of a flash-attn step's operations)
            base, step, shape = stack.data_ptr(), stack.stride(0) * stack.element_size(), stack.shape[1:]
            for i, e in enumerate(self.experts):
                w = getattr(e, name).weight
                if w.data_ptr() != base + i * step or w.shape != shape or w.dtype != stack.dtype:
                    return None
        return self._stacks["w1"], self._stacks["w3"], self._stacks["w2"]

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """`dense`: the picks stay on the device (a decode step captured in a CUDA graph, which
        cannot ask the host which experts were picked). On the kernel path so does an eager call
        of few rows (a decode batch beside a prefill chunk): no host sync, and four launches
        where the routed path takes two per expert. Same bits every way."""
        experts, weights = self.gate(x, token_ids)
        if use_triton(x) and (dense or x.shape[0] <= DEVICE_MAX_ROWS):
            from kernels import picked_experts

            stacks, shared = self._stacked(), self.shared_experts
            shared_weights = (shared.w1.weight, shared.w3.weight, shared.w2.weight)
            if stacks is not None and picked_experts.takes(x, stacks, shared_weights, experts):
                return picked_experts.moe(x, stacks, shared_weights, experts, weights, shared.limit)
        routed = self._routed_dense(x, experts, weights) if dense else self._routed(x, experts, weights)
        return routed + self.shared_experts(x)

    def _routed(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each picked expert runs on its tokens only; their outputs are added in expert order,
        then slot order. A hash layer can give a token one expert in two slots: those two adds go
        in separate index_add_ calls, since one call with a repeated index may sum the repeats
        before rounding (the CPU's BF16 kernel does) or in any order (CUDA's atomics)."""
        routed = torch.zeros_like(x)
        for e in experts.unique().tolist():
            tok, slot = (experts == e).nonzero(as_tuple=True)
            y = self.experts[e](x[tok]) * weights[tok, slot, None].to(x.dtype)
            if tok.unique().numel() == tok.numel():
                routed.index_add_(0, tok, y)
                continue
            for s in slot.unique().tolist():
                sel = slot == s
                routed.index_add_(0, tok[sel], y[sel])
        return routed

    def _routed_dense(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """_routed's bits without reading the picks on the host, where the picked experts'
        kernels do not run. A token's expert output does not depend on the other rows
        (numerics.linear), an unpicked expert adds y * 0 = 0 (outputs are finite: SwiGLU is
        clamped), and the picked ones are added in the same order (expert, then slot). Reads
        every expert's weights per step: for presets of at most DENSE_MAX_EXPERTS experts."""
        # per slot and expert, the slot's weight where it picked the expert, else 0: [N, k, E],
        # built once per call instead of a compare, select and cast per slot and expert
        ids = torch.arange(len(self.experts), device=x.device)
        table = torch.where(experts[:, :, None] == ids, weights[:, :, None], 0.0)
        routed = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            routed = add_weighted(routed, expert(x), table[:, :, e])
        return routed
