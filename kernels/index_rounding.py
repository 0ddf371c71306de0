"""The indexer's query and key rounding in one launch: Hadamard rotation, then FP4 E2M1 with a
power-of-two scale per 32 (v4-architecture.md §4; reference: block_quant's
`fp4_e2m1_block_qdq(hadamard(x), 32)`).

The reference is some 45 torch operations per call (7 butterfly stages of unflatten, add,
subtract and stack; then amax, frexp/ldexp for the scale, bucketize and tie fixes for the codes,
a table lookup back), run on every CSA layer's indexer queries each decode step and on its keys
whenever a window closes. Here a program rounds BLOCK rows held in registers.

Bit-exact with the reference: the butterfly adds and subtracts the same pairs in the same order
(each stage pairs elements h apart within groups of 2h, Sylvester order), the orthonormal factor
is the same float32 product, and the scale and codes are quantize.py's integer programs
(tested against the same reference rules); contraction is off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_quant import fp4_e2m1_block_qdq, hadamard
from .dispatch import rows_per_program, use_triton
from .quantize import e2m1_code, e2m1_value, pow2_from_byte, ue8m0_scale_byte

BLOCK = 16  # rows per program on a GPU
INTERPRETER_BLOCK = 256  # in the interpreter (dispatch.rows_per_program): 113 ms a tiny-model call, 1,124 at 16
FP4_BLOCK = 32  # elements per scale


def reference(x: torch.Tensor) -> torch.Tensor:
    return fp4_e2m1_block_qdq(hadamard(x), FP4_BLOCK)


@triton.jit
def _butterfly(y, R: tl.constexpr, N: tl.constexpr, H: tl.constexpr):
    """One stage: in each group of 2H elements, pairs (a, b) H apart become (a + b, a - b)."""
    y = tl.permute(tl.reshape(y, [R, N // (2 * H), 2, H]), [0, 1, 3, 2])  # pair members last
    a, b = tl.split(y)
    y = tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2])
    return tl.reshape(y, [R, N])


@triton.jit(do_not_specialize=["n_rows"])
def _round_index_kernel(x_ptr, out_ptr, n_rows, x_row_stride, out_row_stride, scale,
                        N: tl.constexpr, LOG2_N: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = (r < n_rows)[:, None]
    r = r.to(tl.int64)
    j = tl.arange(0, N)
    y = tl.load(x_ptr + r[:, None] * x_row_stride + j[None, :], mask=ok, other=0.0)
    for s in tl.static_range(LOG2_N):
        y = _butterfly(y, BLOCK, N, 1 << s)
    y = y * scale
    yb = tl.reshape(y, [BLOCK, N // 32, 32])
    byte = ue8m0_scale_byte(tl.max(tl.abs(yb), axis=2), 2, 0x400000)  # qmax 6 = 1.5 * 2**2
    v = yb * pow2_from_byte(254 - byte)[:, :, None]
    # the reference's sign is v < 0 (so -0.0 encodes as +0), the magnitude its midpoint rule
    codes = e2m1_code(tl.abs(v)) | ((v < 0).to(tl.int32) << 3)
    q = tl.reshape(e2m1_value(codes) * pow2_from_byte(byte)[:, :, None], [BLOCK, N])
    tl.store(out_ptr + r[:, None] * out_row_stride + j[None, :], q, mask=ok)


def round_index(x: torch.Tensor) -> torch.Tensor:
    """fp4_e2m1_block_qdq(hadamard(x), 32) over the last dim (a power of two, at least 32): one
    launch where the kernel runs (float32 x), the reference otherwise."""
    n = x.shape[-1]
    if n < FP4_BLOCK or n & (n - 1):
        raise ValueError(f"round_index: last dim {n} is not a power of two of at least {FP4_BLOCK}")
    if not use_triton(x) or x.dtype != torch.float32:
        return reference(x)
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = rows_per_program(x, BLOCK, INTERPRETER_BLOCK)
        _round_index_kernel[(triton.cdiv(rows.shape[0], block),)](
            rows, out, rows.shape[0], rows.stride(0), out.stride(0), n**-0.5,
            N=n, LOG2_N=n.bit_length() - 1, BLOCK=block, enable_fp_fusion=False)
    return out.view(x.shape)
