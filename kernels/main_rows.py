"""Compact main rows (kv_layout.py: FP8 E4M3 codes + BF16 RoPE dims + UE8M0 scales per
block of 64) decoded inside Triton kernels, so attention reads 584 bytes per key instead of 1024.

`load_main_chunk` is the piece the attention kernels call; `decode_rows` wraps it in a kernel of
its own so it can be tested against `kv_layout.decode_main`, its reference.

Precision: codes times scales are formed in float32 and the decoded keys handed back in the
query dtype (bf16 on GPU, then multiplied on tensor cores). The cast is exact: an E4M3 code has 3
mantissa bits, times a power of two it still fits bf16's 7 (bf16 has float32's exponent range),
and the RoPE dims are stored as bf16. So bf16 dots see exactly the values the reference
multiplies. (Multiplying in bf16 instead would save nothing measurable in registers and gives
wrong results in Triton's interpreter, whose bf16 arithmetic works on the raw bits.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import use_triton
from .kv_layout import MAIN_BLOCK, decode_main

DECODE_BLOCK_ROWS = 32  # rows per program of decode_rows


@triton.jit
def load_main_chunk(base, row_off, valid, c: tl.constexpr, OUT: tl.constexpr, NOPE: tl.constexpr,
                    ROPE: tl.constexpr):
    """Columns [64c, 64c + 64) of the rows at byte offsets row_off [N] (int64) from the uint8 pointer
    `base`, decoded to [N, 64] in OUT (float32 or bf16, both exact); rows with valid=False come
    back as zeros and are not read.

    A chunk is one scale block of FP8 codes (c < NOPE/64) or 64 of the BF16 RoPE dims, so each
    load is 64 contiguous bytes (codes) or 128 (RoPE) of one row, and nothing is read twice. The
    attention kernels take a key tile chunk by chunk: a whole [N, 512] tile decoded at once held
    its float32 intermediates in registers and spilled at 64 heads per program (sm90, 255
    registers and 736 bytes of stack).
    """
    col = tl.arange(0, 64)
    rows = base + row_off[:, None]
    mask = valid[:, None]  # row-level masks only: per-column masks cost registers on GPU
    if c * 64 < NOPE:
        codes = tl.load(rows + (c * 64) + col[None, :], mask=mask, other=0)
        scale_byte = tl.load(base + row_off + (NOPE + 2 * ROPE + c), mask=valid, other=127)
        # 2**(byte-127) built from its float32 bits: exact for bytes 1..254 (what the encoder
        # writes; byte 0 would be the subnormal 2**-127, which no scale above the amax floor reaches)
        scale = (scale_byte.to(tl.int32) << 23).to(tl.float32, bitcast=True)
        vals = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, None]
    else:
        rope = (rows + NOPE).to(tl.pointer_type(tl.bfloat16)) + (c * 64 - NOPE)
        vals = tl.load(rope + col[None, :], mask=mask, other=0.0)
    return vals.to(OUT)


@triton.jit
def _decode_rows_kernel(rows_ptr, stride_row, out_ptr, n_rows,
                        NOPE: tl.constexpr, ROPE: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = r < n_rows
    row_off = r.to(tl.int64) * stride_row
    out = out_ptr + r.to(tl.int64)[:, None] * (NOPE + ROPE) + tl.arange(0, 64)[None, :]
    for c in tl.static_range((NOPE + ROPE) // 64):
        tl.store(out + c * 64, load_main_chunk(rows_ptr, row_off, valid, c, out_ptr.dtype.element_ty, NOPE, ROPE),
                 mask=valid[:, None])


def check_dims(head_dim: int, nope_dim: int, row_bytes: int) -> None:
    """The kernels tile a row as head_dim (a power of two) columns in blocks of 64."""
    rope = head_dim - nope_dim
    if head_dim & (head_dim - 1) or nope_dim % MAIN_BLOCK or rope % MAIN_BLOCK or rope <= 0:
        raise ValueError(f"head_dim {head_dim} must be a power of two split into nope {nope_dim} and rope "
                         f"{rope}, both positive multiples of {MAIN_BLOCK}")
    if row_bytes < nope_dim + 2 * rope + nope_dim // MAIN_BLOCK or row_bytes % 2:
        raise ValueError(f"row of {row_bytes} bytes cannot hold a compact main entry of dims ({nope_dim}, {rope})")


def reference(rows: torch.Tensor, head_dim: int, nope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    return decode_main(rows, head_dim, nope_dim, dtype)


def decode_rows(rows: torch.Tensor, head_dim: int, nope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [N, row_bytes] compact main rows -> [N, head_dim] in `dtype`."""
    if not use_triton(rows):
        return reference(rows, head_dim, nope_dim, dtype)
    check_dims(head_dim, nope_dim, rows.shape[-1])
    if rows.stride(-1) != 1:
        raise ValueError(f"rows must be contiguous in the byte dim, got strides {rows.stride()}")
    out = torch.empty(rows.shape[0], head_dim, dtype=dtype, device=rows.device)
    if not rows.shape[0]:
        return out
    grid = (triton.cdiv(rows.shape[0], DECODE_BLOCK_ROWS),)
    _decode_rows_kernel[grid](rows, rows.stride(0), out, rows.shape[0],
                              NOPE=nope_dim, ROPE=head_dim - nope_dim, BLOCK_N=DECODE_BLOCK_ROWS)
    return out
