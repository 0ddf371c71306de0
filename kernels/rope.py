"""Rotary rotation in one kernel (reference: rope_ref.py).

The reference is a dozen torch operations per call (slice, upcast, two strided views, four
products, stack, cast, cat), and the model rotates queries, keys, compressed entries, indexer
queries and the attention output of every layer each forward. Here one launch reads x once and
writes the rotated copy: a program takes BLOCK rows of x viewed as [rows, D] (every leading dim
but the first folds into rows; a row's angles are those of its first-dim index).

Bit-exact with the reference: the same float32 products and differences, with floating-point
contraction off (a fused multiply-add would round once where the reference rounds twice), and
the same round-to-nearest-even cast back to BF16, done on the bits (as quantize.py does) so the
interpreter gives it too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import rows_per_program, use_triton
from .quantize import load_f32, store_f32
from .rope_ref import rotate as reference

BLOCK = 16  # rows of x per program on a GPU
INTERPRETER_BLOCK = 256  # in the interpreter (dispatch.rows_per_program): 79 ms a tiny-model call, 759 at 16


@triton.jit
def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, per_token, D, cs_stride, sign,
                   HALF: tl.constexpr, NOPE_P: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < n_rows
    base = r.to(tl.int64) * D
    nope = D - 2 * HALF
    j = tl.arange(0, NOPE_P)  # the dims that pass unchanged (copied as raw elements)
    keep = ok[:, None] & (j < nope)[None, :]
    tl.store(out_ptr + base[:, None] + j[None, :], tl.load(x_ptr + base[:, None] + j[None, :], mask=keep), mask=keep)
    i = tl.arange(0, HALF)
    even = base[:, None] + nope + 2 * i[None, :]
    x0 = load_f32(x_ptr + even, ok[:, None], BF16)
    x1 = load_f32(x_ptr + even + 1, ok[:, None], BF16)
    token = (r // per_token).to(tl.int64) * cs_stride
    c = tl.load(cos_ptr + token[:, None] + i[None, :], mask=ok[:, None])
    s = tl.load(sin_ptr + token[:, None] + i[None, :], mask=ok[:, None]) * sign
    store_f32(out_ptr + even, x0 * c - x1 * s, ok[:, None], BF16)
    store_f32(out_ptr + even + 1, x1 * c + x0 * s, ok[:, None], BF16)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """As rope_ref.rotate: the kernel where it runs (r a power of two; float32 or BF16 x), the
    reference otherwise."""
    half = cos.shape[-1]
    if x.dim() < 2 or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != x.shape[0]:
        raise ValueError(f"rotate: x {list(x.shape)} needs cos/sin [{x.shape[0] if x.dim() else '?'}, r], "
                         f"got {list(cos.shape)} and {list(sin.shape)}")
    if 2 * half > x.shape[-1]:
        raise ValueError(f"rotate: {2 * half} rotary dims do not fit in the last dim {x.shape[-1]}")
    if not use_triton(x) or half & (half - 1) or x.dtype not in (torch.float32, torch.bfloat16):
        return reference(x, cos, sin, inverse)
    x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty_like(x)
    D = x.shape[-1]
    n_rows = x.numel() // D
    if n_rows:
        bf16 = x.dtype == torch.bfloat16  # handed over as int16 bits (see load_f32)
        xs, outs = (x.view(torch.int16), out.view(torch.int16)) if bf16 else (x, out)
        block = rows_per_program(x, BLOCK, INTERPRETER_BLOCK)
        _rotate_kernel[(triton.cdiv(n_rows, block),)](
            xs, cos, sin, outs, n_rows, n_rows // x.shape[0], D, cos.stride(0), -1.0 if inverse else 1.0,
            HALF=half, NOPE_P=triton.next_power_of_2(max(1, D - 2 * half)), BLOCK=block, BF16=bf16,
            enable_fp_fusion=False)
    return out
