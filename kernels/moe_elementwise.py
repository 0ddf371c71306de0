"""The MoE's elementwise steps in one launch each (reference: moe_elementwise_ref.py).

Around each expert's three matmuls the reference spends four small operations on the SwiGLU (two
clamps, silu, product) and, per slot, four more on adding the weighted output (compare, select,
cast, product, sum): when a decode step ran every expert on every row, about 20 kernels per
expert, some 650 of the 1,700 a batch-1 step ran on the GPU (kernels/RESULTS.md). Here each is
one launch; `swiglu_f32` and `add_slot` are also the epilogues of the expert kernels
(expert_mlp.py, picked_experts.py).

Bit-exact with torch's CUDA operations (the GPU test checks it): the same float32 arithmetic
with floating-point contraction off, the same round-to-nearest-even casts (done on the bits, as
quantize.py does), silu as x / (1 + exp(-x)) with CUDA's expf and an IEEE division, as ATen's
kernel computes it. In Triton's interpreter exp is numpy's, which can differ from torch's CPU exp
in the last float32 bit: the CPU tests allow that one rounding step and nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import moe_elementwise_ref as ref
from .dispatch import use_triton
from .quantize import as_operand, load_f32, round_f32, store_f32

BLOCK = 1024  # elements per program


@triton.jit
def swiglu_f32(g, u, limit, BF16: tl.constexpr, CUDA_EXP: tl.constexpr):
    """The reference's SwiGLU of float32 gate and up values (already in the tensor dtype's grid):
    silu(min(g, limit)) rounded to the dtype, times u clamped to [-limit, limit], not yet rounded."""
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    if CUDA_EXP:
        e = libdevice.exp(-g)
    else:  # the interpreter has no libdevice
        e = tl.exp(-g)
    return round_f32(tl.math.div_rn(g, 1.0 + e), BF16) * u


@triton.jit
def add_slot(acc, y, w, BF16: tl.constexpr):
    """acc + y * w with the reference's roundings: w cast to the dtype, the product, the sum."""
    return round_f32(acc + round_f32(y * round_f32(w, BF16), BF16), BF16)


@triton.jit(do_not_specialize=["n"])
def _swiglu_kernel(g_ptr, u_ptr, out_ptr, n, limit, BLOCK: tl.constexpr, BF16: tl.constexpr,
                   CUDA_EXP: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    out = swiglu_f32(load_f32(g_ptr + i, ok, BF16), load_f32(u_ptr + i, ok, BF16), limit, BF16, CUDA_EXP)
    store_f32(out_ptr + i, out, ok, BF16)


@triton.jit(do_not_specialize=["n"])
def _add_weighted_kernel(acc_ptr, y_ptr, w_ptr, out_ptr, n, d, w_row_stride, w_slot_stride,
                         SLOTS: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    acc = load_f32(acc_ptr + i, ok, BF16)
    y = load_f32(y_ptr + i, ok, BF16)
    row = i // d
    for s in tl.static_range(SLOTS):
        acc = add_slot(acc, y, tl.load(w_ptr + row * w_row_stride + s * w_slot_stride, mask=ok, other=0.0), BF16)
    store_f32(out_ptr + i, acc, ok, BF16)


def _kernel_dtype(*ts: torch.Tensor) -> bool:
    dtype = ts[0].dtype
    return use_triton(ts[0]) and dtype in (torch.float32, torch.bfloat16) and all(t.dtype == dtype for t in ts)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """As moe_elementwise_ref.swiglu: one launch where the kernel runs (float32 or BF16)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {list(gate.shape)} and up {list(up.shape)} differ")
    if not _kernel_dtype(gate, up):
        return ref.swiglu(gate, up, limit)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        # the reference clamps against the limit in the tensor's dtype
        lim = float(torch.tensor(limit, dtype=gate.dtype))
        _swiglu_kernel[(triton.cdiv(n, BLOCK),)](
            as_operand(gate), as_operand(up), as_operand(out), n, lim,
            BLOCK=BLOCK, BF16=gate.dtype == torch.bfloat16, CUDA_EXP=gate.is_cuda, enable_fp_fusion=False)
    return out


def add_weighted(acc: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """As moe_elementwise_ref.add_weighted (acc, y [N, d]; w [N, k] float32, any strides): one
    launch where the kernel runs. Returns a new tensor."""
    if acc.shape != y.shape or acc.dim() != 2 or w.dim() != 2 or w.shape[0] != acc.shape[0]:
        raise ValueError(f"add_weighted: acc {list(acc.shape)}, y {list(y.shape)} and w {list(w.shape)} do not match")
    if not _kernel_dtype(acc, y) or w.dtype != torch.float32:
        return ref.add_weighted(acc, y, w)
    out = torch.empty(acc.shape, dtype=acc.dtype, device=acc.device)
    n = acc.numel()
    if n:
        _add_weighted_kernel[(triton.cdiv(n, BLOCK),)](
            as_operand(acc), as_operand(y), w, as_operand(out), n, acc.shape[1],
            w.stride(0), w.stride(1), SLOTS=w.shape[1], BLOCK=BLOCK, BF16=acc.dtype == torch.bfloat16,
            enable_fp_fusion=False)
    return out
