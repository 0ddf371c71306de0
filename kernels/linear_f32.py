"""float32 projections of a decode step's few rows: the compressors' wkv / wgate and mHC's fn.

The model keeps these weights in float32 (as the reference does): per flash-attn step about 114 MB
(CSA main 4 x 16.7, indexer 4 x 4.2, HCA 2 x 8.4, mHC 9 x 1.5). At 16 rows cuBLAS runs them on
SIMT and sm80 kernels with split-K reductions at 0.1-0.5 TB/s: 0.39 ms of a 2.56 ms batch-1 step
at 128K (kernels/RESULTS.md). Here a program streams a [BLOCK_N columns x K / splits] piece of the
weight once and multiplies it with 16 rows of x on tensor cores in three TF32 passes ("tf32x3":
each float32 operand split into a TF32 high part and a TF32 remainder, the products summed in
float32, only the remainders' product dropped), which keeps float32's accuracy where plain float32
FMA products ran at a third of the speed (an H100 sweep, kernels/RESULTS.md); when K is split, a
second launch sums the pieces in a fixed pairwise tree.

Row-invariant like numerics.linear: tiles and splits are chosen from (N, K) alone, and a row's
products are summed in the same order whatever else shares the call. Not bit-exact with cuBLAS's
float32 product (another rounding of the same sums): within float32 rounding of the exact one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import linear as reference

MAX_ROWS = 128  # decode buckets (workers/decode_graphs.py); more rows are a prefill, which cuBLAS runs well
BLOCK_M, BLOCK_K = 16, 32  # 16 rows per program: a decode bucket's smallest row count
TARGET_PROGRAMS = 256  # about two per SM of an H100 (the sweep: 256 or 512 within 2%)


@triton.jit
def _linear_kernel(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split, x_stride, w_stride, out_stride, split_stride,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * x_stride
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * w_stride
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_start = split * k_per_split
    for k in range(k_start, k_start + k_per_split, BK):
        k_ok = (k + rk < K)[None, :]
        x = tl.load(x_rows + k + rk[None, :], mask=m_ok[:, None] & k_ok, other=0.0)
        w = tl.load(w_rows + k + rk[None, :], mask=n_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="tf32x3")
    out = out_ptr + split * split_stride + rm.to(tl.int64)[:, None] * out_stride + rn[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, n, SPLITS: tl.constexpr, LEVELS: tl.constexpr, BLOCK: tl.constexpr):
    # all splits of BLOCK outputs at once (a loop adding one split at a time waited on each load
    # in turn: 15 us for 256 splits), summed in an explicit pairwise tree: split 2i + (2i+1),
    # then pairs of those. tl.sum over all splits would follow the register layout, which the
    # compiler picks from n's alignment, so a row's sum changed with the row count (an H100 test).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    split = tl.arange(0, SPLITS)
    parts = tl.load(part_ptr + split[:, None] * n + offs[None, :], mask=(offs < n)[None, :], other=0.0)
    for level in tl.static_range(LEVELS):
        parts = tl.sum(tl.reshape(parts, [SPLITS >> (level + 1), 2, BLOCK]), axis=1)  # a + b: no order
    tl.store(out_ptr + offs, tl.reshape(parts, [BLOCK]), mask=offs < n)


def block_n(n: int) -> int:
    """Output columns per program: 64, or the weight's own width rounded up (mHC's 24 and 4)."""
    return max(16, min(64, triton.next_power_of_2(n)))


def splits_for(n: int, k: int) -> int:
    """K splits for a [n, k] weight: enough programs to stream it at the copy rate (a function of
    the weight's shape alone, so a row's sum order never depends on the row count)."""
    col_blocks = triton.cdiv(n, block_n(n))
    chunks = triton.cdiv(k, BLOCK_K)
    splits = 1
    while col_blocks * splits * 2 <= TARGET_PROGRAMS and splits * 2 <= chunks:
        splits *= 2
    return splits


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Operands the kernel is for, on any device: float32, 2-D, 1 to MAX_ROWS rows (a decode
    step's; a prefill's stay with cuBLAS), weight rows contiguous."""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 2
            and 0 < x.shape[0] <= MAX_ROWS and weight.stride(-1) == 1)


def wanted(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Does the model run the kernel for these operands (`takes` them, on a GPU)?"""
    return x.is_cuda and takes(x, weight)


def linear_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T in float32 for M <= MAX_ROWS rows, row-invariant; callers check
    `wanted` first (numerics.linear is the reference)."""
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"linear_f32: x has {K} columns, weight {list(weight.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    splits = splits_for(N, K)
    # each split covers whole BLOCK_K chunks: the same chunks, in the same order, for every call
    k_per_split = triton.cdiv(triton.cdiv(K, BLOCK_K), splits) * BLOCK_K
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    part = out if splits == 1 else torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    bn = block_n(N)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, BLOCK_M), splits)
    _linear_kernel[grid](x, weight, part, M, N, K, k_per_split, x.stride(0), weight.stride(0), N, M * N,
                         BM=BLOCK_M, BN=bn, BK=BLOCK_K, num_warps=4, num_stages=3)
    if splits > 1:  # row r's outputs sit at r * N + column in any call: the same blocks, the same tree
        block = max(1, min(256, 4096 // splits))
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](part, out, M * N, SPLITS=splits,
                                                         LEVELS=splits.bit_length() - 1, BLOCK=block)
    return out


__all__ = ["linear_f32", "takes", "wanted", "splits_for", "reference", "MAX_ROWS"]
