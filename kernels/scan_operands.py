"""The indexer scan's query operands in one launch (reference: indexer_topk.operands_reference).

Per query s, from q [S, Hi, Di] float32 and w [S, Hi]:
  * FP8 codes q8 [S, Di/32, hp, 32] in the FP8 scan's K order, with q == codes * s_h for a
    power-of-two scale s_h per head (block_quant.fp8_e4m3_block_quant, one block per head);
  * the scaled head weights w8 [S, hp] = w * (s_h * 2**6 * Di**-0.5);
  * BF16 parts [S, 3, hp, Di] with q == part0 + part1 + part2 (the general scan's operand);
  * the scan the query takes, mode [S]: FP8 when every head is exactly its codes times s_h and
    on the FP4 grid (indexer_topk._on_fp4_grid), else the general scan;
  * the head weights zero-padded to hp, w_pad [S, hp].
Heads from Hi to hp are zeros everywhere.

Why a kernel: the torch version is some 60 operations per call, each a GPU kernel inside a decode
step's CUDA graph, twice per flash-attn step (one per CSA layer): a fifth of the step's kernels.
Every value is computed as the reference computes it, with the bit-level helpers the cache
encoder uses (quantize.py: the power-of-two scale, round-to-nearest-even E4M3 and BF16 in integer
arithmetic, which the interpreter's own conversions are not), so the outputs are the reference's
bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import rows_per_program
from .quantize import bf16_bits, e4m3_code, e4m3_value, pow2_from_byte, ue8m0_scale_byte

E2M1_TO_E4M3_SCALE = 2.0**6  # an E2M1 code moved into E4M3 bits is its value times 2**-6
# The move, 4 bytes (8 packed codes) in a 32-bit register at a time: $2 the packed bytes, $0 their
# 4 even codes and $1 their 4 odd ones as E4M3 bytes (magnitude bits << 2, sign to bit 7); the FP8
# scans' inline PTX (indexer_topk.py, indexer_scan_hopper.py)
E2M1_TO_E4M3_PTX = tl.constexpr("""{
    .reg .b32 a, b;
    shl.b32 a, $2, 2;
    and.b32 a, a, 0x1C1C1C1C;
    shl.b32 b, $2, 4;
    and.b32 b, b, 0x80808080;
    or.b32 $0, a, b;
    shr.b32 a, $2, 2;
    and.b32 a, a, 0x1C1C1C1C;
    and.b32 b, $2, 0x80808080;
    or.b32 $1, a, b;
    }""")
MODE_FP8, MODE_GENERAL = 0, 1  # the scan each query takes (indexer_topk)
GENERAL_PARTS = tl.constexpr(3)  # BF16 parts of a query in the general scan: exact for any float32


@triton.jit
def _operands_kernel(q_ptr, w_ptr, q8_ptr, w8_ptr, parts_ptr, mode_ptr, w_pad_ptr, Hi, w_scale, S,
                     q_stride_s, q_stride_h, w_stride_s,
                     HP: tl.constexpr, DI: tl.constexpr, FP8: tl.constexpr, GENERAL: tl.constexpr,
                     QS: tl.constexpr):
    """QS queries a program (quantize.rows_per_program), each query's math on its own."""
    s = tl.program_id(0).to(tl.int64) * QS + tl.arange(0, QS)
    s_ok = s < S
    h = tl.arange(0, HP)
    d = tl.arange(0, DI)
    head_ok = s_ok[:, None] & (h < Hi)[None, :]  # [QS, HP]
    ok = head_ok[:, :, None] & (d >= 0)[None, None, :]  # [QS, HP, DI]
    q = tl.load(q_ptr + s[:, None, None] * q_stride_s + h[None, :, None] * q_stride_h + d[None, None, :], mask=ok,
                other=0.0)
    w = tl.load(w_ptr + s[:, None] * w_stride_s + h[None, :], mask=head_ok, other=0.0)

    # power-of-two scale per head, as block_quant.fp8_e4m3_block_quant with one block per head
    byte = ue8m0_scale_byte(tl.max(tl.abs(q), axis=2), 8, 0x600000)  # qmax 448 = 1.75 * 2**8
    scale = pow2_from_byte(byte)
    code = e4m3_code(q * pow2_from_byte(254 - byte)[:, :, None])  # exact: a power of two

    # FP8 mode: every element exactly code * scale, every 32-block on the FP4 grid
    mag = code & 0x7F
    mant = mag & 7
    field = mag >> 3
    top = tl.max(tl.reshape(field, (QS, HP, DI // 32, 32)), axis=3)
    top = tl.reshape(tl.broadcast_to(top[:, :, :, None], (QS, HP, DI // 32, 32)), (QS, HP, DI))
    below = top - field
    grid = ((mant & 3) == 0) & ((below < 3) | ((below == 3) & (mant == 0)))
    exact = ((mag == 0) | grid) & (e4m3_value(code) * scale[:, :, None] == q)
    misses = tl.sum(tl.sum((ok & ~exact).to(tl.int32), axis=2), axis=1)
    tl.store(mode_ptr + s, tl.where(misses == 0, FP8, GENERAL), mask=s_ok)

    # codes in the scan's K order: element 8i + 2b + t of a 32-block goes to 8i + 4t + b
    r = d % 32
    r_scan = (r // 8) * 8 + (r % 2) * 4 + (r % 8) // 2
    q8_off = (s[:, None, None] * (DI * HP) + ((d // 32) * (HP * 32) + r_scan)[None, None, :]
              + h[None, :, None] * 32)
    # a store broadcasts its mask to the pointers' shape: every head of a query that exists
    tl.store(q8_ptr + q8_off, code.to(tl.uint8), mask=s_ok[:, None, None])
    tl.store(w8_ptr + s[:, None] * HP + h[None, :], tl.where(head_ok, w * (scale * w_scale), 0.0), mask=s_ok[:, None])
    tl.store(w_pad_ptr + s[:, None] * HP + h[None, :], w, mask=s_ok[:, None])

    # BF16 parts: each the rounding of what the parts before it leave
    rest = q
    off = s[:, None, None] * (GENERAL_PARTS * HP * DI) + h[None, :, None] * DI + d[None, None, :]
    for k in tl.static_range(GENERAL_PARTS):
        p = bf16_bits(rest)
        tl.store(parts_ptr + off + k * (HP * DI), p.to(tl.int16), mask=s_ok[:, None, None])
        rest = rest - (p << 16).to(tl.float32, bitcast=True)


def scan_operands(q: torch.Tensor, w: torch.Tensor, hp: int) -> tuple[torch.Tensor, ...]:
    """(q8, w8, parts, mode, w_pad) of q [S, Hi, Di] float32 and w [S, Hi] float32, heads padded
    to hp (a power of two >= Hi): what indexer_topk.operands_reference returns, bit for bit."""
    S, Hi, Di = q.shape
    if q.dtype != torch.float32 or w.dtype != torch.float32 or w.shape != (S, Hi):
        raise ValueError(f"scan_operands: q {list(q.shape)} {q.dtype}, w {list(w.shape)} {w.dtype}")
    if hp < Hi or hp & (hp - 1) or Di % 32 or Di & (Di - 1) or q.stride(2) != 1:
        raise ValueError(f"scan_operands: heads {Hi} padded to {hp}, dim {Di}, strides {q.stride()}")
    w = w.contiguous()
    dev = q.device
    q8 = torch.empty(S, Di // 32, hp, 32, dtype=torch.float8_e4m3fn, device=dev)
    w8 = torch.empty(S, hp, dtype=torch.float32, device=dev)
    parts = torch.empty(S, GENERAL_PARTS, hp, Di, dtype=torch.bfloat16, device=dev)
    mode = torch.empty(S, dtype=torch.int32, device=dev)
    w_pad = torch.empty(S, hp, dtype=torch.float32, device=dev)
    if S:
        qs = rows_per_program(q)
        _operands_kernel[(triton.cdiv(S, qs),)](
            q, w, q8.view(torch.uint8), w8, parts.view(torch.int16), mode, w_pad, Hi, E2M1_TO_E4M3_SCALE * Di**-0.5,
            S, q.stride(0), q.stride(1), w.stride(0),
            HP=hp, DI=Di, FP8=MODE_FP8, GENERAL=MODE_GENERAL, QS=qs,
            num_warps=16)  # [64, 128] per program: 16 values a thread, no spills (4 warps spill)
    return q8, w8, parts, mode, w_pad
