"""RMSNorm in one launch (reference: numerics.rms_norm).

The reference is seven or eight torch operations per call (upcast, square, mean, add, rsqrt, two
products, cast), and the model normalises 30 times per decode step of the flash-attn preset (two
sub-layer norms, the query's low-rank and per-head norms, the key norm and two mHC norms per
layer, the compressors' entries, the head): about 220 kernels of a batch-1 step. Here a program
takes one row (more in the interpreter: dispatch.rows_per_program), sums its squares in float32
over BLOCK-wide pieces and writes the normalised row.

Row-invariant like the reference: a row's sum runs in an order fixed by its width alone, whatever
else shares the call. Not bit-exact with the reference (the sum is ordered differently, and
rsqrt is the GPU's): within a few float32 ulps, so BF16 outputs are equal or one step apart.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import rows_per_program, use_triton
from .numerics import rms_norm as reference
from .quantize import load_f32, store_f32

MAX_BLOCK = 4096  # elements of a row held at once; wider rows (mHC: 4 x 4096) loop


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, d, x_row_stride, out_row_stride, eps,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_W: tl.constexpr, BF16: tl.constexpr,
                     OUT_BF16: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = (r < n_rows)[:, None]
    r = r.to(tl.int64)
    x_rows, out_rows = x_ptr + r[:, None] * x_row_stride, out_ptr + r[:, None] * out_row_stride
    offs = tl.arange(0, BLOCK)[None, :]
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(0, d, BLOCK):
        x = load_f32(x_rows + start + offs, r_ok & (start + offs < d), BF16)
        acc += x * x
    rs = tl.math.rsqrt(tl.sum(acc, axis=1) / d + eps)[:, None]
    for start in range(0, d, BLOCK):
        ok = r_ok & (start + offs < d)
        y = load_f32(x_rows + start + offs, ok, BF16) * rs
        if HAS_W:
            y = tl.load(w_ptr + start + offs, mask=start + offs < d, other=0.0) * y
        store_f32(out_rows + start + offs, y, ok, OUT_BF16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """As numerics.rms_norm over the last dim of x.to(out_dtype) (float32 or BF16 x; weight
    float32 or None): one launch where the kernel runs, the reference otherwise. `out_dtype`
    float32 for BF16 x (mHC normalises its BF16 streams in float32) saves the upcast's launch:
    the kernel widens what it loads, exactly as the upcast would."""
    d = x.shape[-1]
    out_dtype = out_dtype or x.dtype
    if weight is not None and weight.shape != (d,):
        raise ValueError(f"rms_norm: weight {list(weight.shape)} does not match the last dim {d}")
    kinds = (torch.float32, torch.bfloat16)
    if not use_triton(x) or x.dtype not in kinds or out_dtype not in kinds or d == 0:
        return reference(x.to(out_dtype), weight, eps)
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0]:
        # BF16 is handed over as int16 bits (quantize.load_f32 / store_f32)
        bf16, out_bf16 = x.dtype == torch.bfloat16, out_dtype == torch.bfloat16
        xs = rows.view(torch.int16) if bf16 else rows
        outs = out.view(torch.int16) if out_bf16 else out
        w = weight.float().contiguous() if weight is not None else rows  # unread without HAS_W
        per = rows_per_program(x)
        _rms_norm_kernel[(triton.cdiv(rows.shape[0], per),)](
            xs, w, outs, rows.shape[0], d, rows.stride(0), out.stride(0), eps,
            ROWS=per, BLOCK=min(triton.next_power_of_2(d), MAX_BLOCK), HAS_W=weight is not None, BF16=bf16,
            OUT_BF16=out_bf16)
    return out.view(x.shape)
