"""mHC's collapse and expand in one launch each (reference: hc_streams_ref.py).

Every sub-layer collapses the hc residual streams before it and expands them after: in torch
six and eight small operations (upcast, products, three sums, cast; casts, products, sums), 28
kernels per layer of a decode step. Here a program takes BLOCK columns of one token's streams (of
more in the interpreter, whose cost is per program: dispatch.rows_per_program).

Bit-exact with the reference: the same products and left-to-right sums, each rounded where the
reference rounds (float32 for the collapse, the streams' dtype for the expand; BF16 on the bits,
as quantize.py does), with floating-point contraction off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import hc_streams_ref as ref
from .dispatch import rows_per_program, use_triton
from .quantize import as_operand, load_f32, round_f32, store_f32

BLOCK = 512  # columns per program


@triton.jit
def _tile(N, d, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tokens n [ROWS] (int64), which exist, columns c [BLOCK], and the 2-D mask."""
    n = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    n_ok = n < N
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return n.to(tl.int64), n_ok, c, n_ok[:, None] & (c < d)[None, :]


@triton.jit(do_not_specialize=["N"])
def _collapse_kernel(x_ptr, pre_ptr, out_ptr, N, d, HC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                     BF16: tl.constexpr):
    n, n_ok, c, ok = _tile(N, d, ROWS, BLOCK)
    row = x_ptr + (n * HC * d)[:, None] + c[None, :]
    acc = tl.load(pre_ptr + n * HC, mask=n_ok, other=0.0)[:, None] * load_f32(row, ok, BF16)
    for j in tl.static_range(1, HC):
        acc = acc + tl.load(pre_ptr + n * HC + j, mask=n_ok, other=0.0)[:, None] * load_f32(row + j * d, ok, BF16)
    store_f32(out_ptr + (n * d)[:, None] + c[None, :], acc, ok, BF16)


@triton.jit(do_not_specialize=["N"])
def _expand_kernel(x_ptr, o_ptr, post_ptr, comb_ptr, out_ptr, N, d, HC: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK: tl.constexpr, BF16: tl.constexpr):
    n, n_ok, c, ok = _tile(N, d, ROWS, BLOCK)
    row = x_ptr + (n * HC * d)[:, None] + c[None, :]
    o = load_f32(o_ptr + (n * d)[:, None] + c[None, :], ok, BF16)
    for k in tl.static_range(HC):
        w = round_f32(tl.load(comb_ptr + n * HC * HC + k, mask=n_ok, other=0.0), BF16)[:, None]  # comb[n, 0, k]
        mixed = round_f32(w * load_f32(row, ok, BF16), BF16)
        for j in tl.static_range(1, HC):
            w = round_f32(tl.load(comb_ptr + n * HC * HC + j * HC + k, mask=n_ok, other=0.0), BF16)[:, None]
            mixed = round_f32(mixed + round_f32(w * load_f32(row + j * d, ok, BF16), BF16), BF16)
        p = round_f32(tl.load(post_ptr + n * HC + k, mask=n_ok, other=0.0), BF16)[:, None]
        store_f32(out_ptr + ((n * HC + k) * d)[:, None] + c[None, :], round_f32(p * o, BF16) + mixed, ok, BF16)


def _runs(streams: torch.Tensor) -> bool:
    return use_triton(streams) and streams.dtype in (torch.float32, torch.bfloat16) and streams.numel() > 0


def collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """As hc_streams_ref.collapse: one launch where the kernel runs."""
    N, hc, d = streams.shape
    if pre.shape != (N, hc):
        raise ValueError(f"collapse: pre {list(pre.shape)} does not match streams {list(streams.shape)}")
    if not _runs(streams):
        return ref.collapse(streams, pre)
    out = torch.empty(N, d, dtype=streams.dtype, device=streams.device)
    bf16 = streams.dtype == torch.bfloat16
    rows = rows_per_program(streams)
    _collapse_kernel[(triton.cdiv(N, rows), triton.cdiv(d, BLOCK))](
        as_operand(streams), pre.float().contiguous(), as_operand(out), N, d,
        HC=hc, ROWS=rows, BLOCK=BLOCK, BF16=bf16, enable_fp_fusion=False)
    return out


def expand(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """As hc_streams_ref.expand: one launch where the kernel runs."""
    N, hc, d = streams.shape
    if out.shape != (N, d) or post.shape != (N, hc) or comb.shape != (N, hc, hc) or out.dtype != streams.dtype:
        raise ValueError(f"expand: out {list(out.shape)} {out.dtype}, post {list(post.shape)} and comb "
                         f"{list(comb.shape)} do not match streams {list(streams.shape)} {streams.dtype}")
    if not _runs(streams):
        return ref.expand(streams, out, post, comb)
    new = torch.empty_like(streams, memory_format=torch.contiguous_format)
    bf16 = streams.dtype == torch.bfloat16
    rows = rows_per_program(streams)
    _expand_kernel[(triton.cdiv(N, rows), triton.cdiv(d, BLOCK))](
        as_operand(streams), as_operand(out), post.float().contiguous(), comb.float().contiguous(), as_operand(new), N, d,
        HC=hc, ROWS=rows, BLOCK=BLOCK, BF16=bf16, enable_fp_fusion=False)
    return new
