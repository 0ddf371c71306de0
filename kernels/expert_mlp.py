"""Experts' SwiGLU MLPs in two launches: every expert's up-projection, then every expert's
down-projection (reference: the per-expert matmuls of workers/moe.py and moe_elementwise_ref.py).

An expert through cuBLAS was 3 split-K GEMMs with their reductions for weights of 2 MB each
(kernels/RESULTS.md). Here:
  * `expert_up` computes h[e] = swiglu(x W1[e]^T, x W3[e]^T) for every expert e, both products
    rounded to the dtype before the SwiGLU, as a matmul's output is;
  * `expert_down` computes y[e] = h[e] W2[e]^T rounded to the dtype.
`dot_rows`, the products, is also what picked_experts.py (a decode step's MoE) runs. Each output
row depends on its own input row only, so an expert run on the rows that picked it gives them
the bits they get in any other batch. On a GPU the BF16 tiles follow the row
count (decode rows and prefill chunks want different shapes) without moving a bit: every
product's sum runs over the reduction in one order, accumulated in place through the tensor
cores whatever the tile (checked for 1 to 2,048 rows and every tile swept on an H100; the GPU
test compares rows computed under both tile sets). Against cuBLAS the sums are
ordered differently: within float32 rounding, not bit-exact. Float32 operands multiply in IEEE
float32 (no TF32), as torch's default matmul does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import use_triton
from .moe_elementwise import swiglu_f32
from .quantize import as_operand, load_f32, round_f32, store_f32

# Tiles (rows, reduction, columns) of the up and down kernels. BF16 on a GPU, from sweeps of the
# preset's shapes under a CUDA graph (H100, 8 experts x 256 x 4096, kernels/RESULTS.md), up + down:
# up to FEW_ROWS rows 15.9 + 11.1 us at 16 rows, 16.8 + 15.3 at 32 with 16 x 256 x 32 up and
# 16 x 128 x 32 down tiles (16 x 256 x 16 up, 16 x 256 x 32 down: 23.5 + 16.6 and 33.7 + 20.1;
# 4 warps, 3 stages; 8 warps, other stages and 512-wide reductions no faster); 2,048 rows 0.30 +
# 0.33 ms with 64 x 64 up and 32 x 128 x 64 down tiles (32 x 128: 0.86 + 0.40). Float32 (tests and
# debugging) keeps one shape. (The down timings are from when it looped over the experts in one
# program per tile and added the picks; picked_experts.py does that now.) The interpreter takes
# wide tiles, its cost being per program and per loop step, as large as _mma's [rows, columns,
# reduction] product may be (2**20 elements, Triton's largest tensor); its sums' order follows
# the reduction tile, so its tiles stay fixed (picked_experts.py takes the same).
FEW_ROWS = 32
GPU_TILES_FEW = ((16, 256, 32), (16, 128, 32))
GPU_TILES_MANY = ((64, 64, 32), (32, 128, 64))
GPU_TILES_F32 = ((32, 128, 16), (32, 128, 32))
# Row and expert counts are not specialised on (Triton would compile a variant for counts of 1
# and multiples of 16): a prefill's per-expert row counts vary from call to call.
INTERPRETER_TILES = ((64, 256, 64), (32, 256, 128))
# Whether these kernels run in Triton's interpreter (TRITON_INTERPRET, which Triton reads as it
# decorates them, at import). Its tl.dot is numpy's matmul, and a BLAS may sum a row of it in an
# order that depends on the row's place in the tile: OpenBLAS's Haswell kernel (AVX2 machines) gives
# rows that sit other than 16 apart different last bits, so an expert's rows would not keep their
# bits alone and among others. There _mma sums the products with tl.sum instead, one order for
# every row (the GPU's dot keeps one order already)
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))


def tiles(t: torch.Tensor, rows: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(up, down) tiles for `rows` rows of t's dtype and device."""
    if not t.is_cuda:
        return INTERPRETER_TILES
    if t.dtype != torch.bfloat16:
        return GPU_TILES_F32
    return GPU_TILES_FEW if rows <= FEW_ROWS else GPU_TILES_MANY


@triton.jit
def _mma(acc, a, b, MMA_BF16: tl.constexpr):
    """acc + a @ b^T, accumulated in place (a product's sum order over K is the same for any tile
    of K or of the other dims, while the instruction stays the same)."""
    if MMA_BF16:
        return tl.dot(a.to(tl.bfloat16), tl.trans(b.to(tl.bfloat16)), acc)
    elif _INTERPRETED:  # float32 products (BF16 operands widened exactly), each row summed alike
        return acc + tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    else:  # float32 on the GPU: exact products
        return tl.dot(a, tl.trans(b), acc, input_precision="ieee")


@triton.jit
def _operand(ptr, mask, BF16: tl.constexpr, MMA_BF16: tl.constexpr):
    """A tile of an operand. On the GPU's BF16 path its int16 bits taken as BF16 as they load:
    nothing stands between the load and the product, so the loop's loads can be issued ahead
    through shared memory. Elsewhere widened to float32 (quantize.load_f32), exactly."""
    if MMA_BF16:
        v = tl.load(ptr, mask=mask, other=0).to(tl.bfloat16, bitcast=True)
    else:
        v = load_f32(ptr, mask, BF16)
    return v


@triton.jit
def dot_rows(a_ptr, a_row_stride, b_ptr, b2_ptr, b_row_stride, rows, m_ok, cols, n_ok, K,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BF16: tl.constexpr,
              MMA_BF16: tl.constexpr, PAIR: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 sums over K of a[rows, :] * b[cols, :] (b holds weight rows), and
    with PAIR the same for b2 in the same loop (the up-projection's two weights: both loads in
    flight at once, and a loaded once; each sum keeps its own order)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + kk < K
        # BF16 operands come as int16 bits (quantize.as_operand)
        a = _operand(a_ptr + rows[:, None] * a_row_stride + (k0 + kk)[None, :], m_ok[:, None] & k_ok[None, :], BF16,
                     MMA_BF16)
        b_off = cols[:, None] * b_row_stride + (k0 + kk)[None, :]
        b_ok = n_ok[:, None] & k_ok[None, :]
        acc = _mma(acc, a, _operand(b_ptr + b_off, b_ok, BF16, MMA_BF16), MMA_BF16)
        if PAIR:
            acc2 = _mma(acc2, a, _operand(b2_ptr + b_off, b_ok, BF16, MMA_BF16), MMA_BF16)
    return acc, acc2


@triton.jit(do_not_specialize=["M"])
def _up_kernel(x_ptr, w1_ptr, w3_ptr, h_ptr, M, I, D, limit, x_row_stride,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BF16: tl.constexpr,
               MMA_BF16: tl.constexpr, CUDA_EXP: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n_ok = rows < M, cols < I
    w1 = w1_ptr + e * I * D
    w3 = w3_ptr + e * I * D
    g, u = dot_rows(x_ptr, x_row_stride, w1, w3, D, rows, m_ok, cols, n_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, BF16,
                     MMA_BF16, True)
    g, u = round_f32(g, BF16), round_f32(u, BF16)
    s = swiglu_f32(g, u, limit, BF16, CUDA_EXP)  # moe_elementwise's SwiGLU on the rounded products
    out = h_ptr + (e * M + rows[:, None]) * I + cols[None, :]
    store_f32(out, s, m_ok[:, None] & n_ok[None, :], BF16)


@triton.jit(do_not_specialize=["M"])
def _down_kernel(h_ptr, w2_ptr, out_ptr, M, I, D,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BF16: tl.constexpr,
                 MMA_BF16: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n_ok = rows < M, cols < D
    y = dot_rows(h_ptr + e * M * I, I, w2_ptr + e * D * I, w2_ptr, I, rows, m_ok, cols, n_ok, I,
                 BLOCK_M, BLOCK_N, BLOCK_K, BF16, MMA_BF16, False)[0]
    store_f32(out_ptr + (e * M + rows[:, None]) * D + cols[None, :], round_f32(y, BF16), m_ok[:, None] & n_ok[None, :],
              BF16)


def runs(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the kernels take these operands (float32 or BF16, one dtype, the kernel path)."""
    return (use_triton(x) and x.dtype in (torch.float32, torch.bfloat16)
            and all(w.dtype == x.dtype for w in weights) and x.shape[0] > 0)


def expert_up(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """h [E, M, I] = swiglu(x W1[e]^T, x W3[e]^T) for x [M, d], w1 / w3 [E, I, d]."""
    E, I, D = w1.shape
    if w3.shape != w1.shape or x.dim() != 2 or x.shape[1] != D:
        raise ValueError(f"expert_up: x {list(x.shape)}, w1 {list(w1.shape)}, w3 {list(w3.shape)} do not match")
    if not runs(x, w1, w3):
        raise ValueError("expert_up: needs the kernel path and float32 or BF16 operands of one dtype")
    x = x.contiguous()
    M = x.shape[0]
    h = torch.empty(E, M, I, dtype=x.dtype, device=x.device)
    lim = float(torch.tensor(limit, dtype=x.dtype))  # the reference clamps in the tensor's dtype
    (bm, bk, bn), _ = tiles(x, M)
    _up_kernel[(E, triton.cdiv(I, bn), triton.cdiv(M, bm))](
        as_operand(x), as_operand(w1), as_operand(w3), as_operand(h), M, I, D, lim, x.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BF16=x.dtype == torch.bfloat16,
        MMA_BF16=x.dtype == torch.bfloat16 and x.is_cuda, CUDA_EXP=x.is_cuda,
        enable_fp_fusion=False)
    return h


def expert_down(h: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """h [E, M, I], w2 [E, d, I] -> y [E, M, d] = h[e] W2[e]^T."""
    E, M, I = h.shape
    D = w2.shape[1]
    if w2.shape != (E, D, I):
        raise ValueError(f"expert_down: h {list(h.shape)} and w2 {list(w2.shape)} do not match")
    if not runs(h, w2):
        raise ValueError("expert_down: needs the kernel path and float32 or BF16 operands of one dtype")
    out = torch.empty(E, M, D, dtype=h.dtype, device=h.device)
    _, (bm, bk, bn) = tiles(h, M)
    _down_kernel[(E, triton.cdiv(D, bn), triton.cdiv(M, bm))](
        as_operand(h), as_operand(w2), as_operand(out), M, I, D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        BF16=h.dtype == torch.bfloat16, MMA_BF16=h.dtype == torch.bfloat16 and h.is_cuda, enable_fp_fusion=False)
    return out
