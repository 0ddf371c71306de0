"""The lightning indexer's scan and top-k over the paged FP4 key cache (v4-architecture.md §4, §9).

Per query t (position p_t) and visible entry e (e < (p_t + 1) // 4):
    I[t, e] = sum_h w[t, h] * relu(q[t, h] . k_e) * Di**-0.5
with k_e decoded from its 68-byte row (kv_layout.py: packed E2M1, a UE8M0 scale per 32).
Selection follows indexer_topk_ref.select_topk: descending score, ties to the lower index, -1
where fewer than topk entries are visible.

Two scans, each query scored by one of them (query_operands picks):

* FP8 (the model's queries): a query whose heads are each exact in FP8 E4M3 after one
  power-of-two scale s_h (FP4-rounded queries always are: E2M1 values are E4M3 values, and a
  head's block scales differ by far less than E4M3's range) is scored on FP8 tensor cores. A key
  code's E2M1 bits moved into an E4M3 byte (magnitude bits << 2, sign to bit 7) are the same
  value times 2**-6: on a GPU 4 bytes (8 codes) are converted at a time in a 32-bit register by
  inline PTX, 7 operations for 8 codes and no table, into one register of the 4 even codes and
  one of the 4 odd ones; the query's codes are laid out in that order (_e2m1_to_e4m3,
  _fp8_query), which the dot's sum does not see. Per 32-element block b one dot
  [128 keys, 32] x [32, heads] gives sum_d c_kd q'_hd; the products (2 significant bits times 2)
  and their 32-term sums need 13 bits, so each block's sum is exact even in the FP8 tensor cores'
  narrower accumulator (about 14 bits on Hopper, which is why blocks are not chained into one
  dot), is scaled by the key's block scale 2**(e-127) (exact), then summed over the blocks in
  float32. The ReLU'd head sums are weighted by w_h * s_h * 2**6 * Di**-0.5 (relu(x * s) ==
  relu(x) * s for s > 0).
* General: any float32 query is split into BF16 parts q = q0 + q1 + q2 (exact) and scored by
  tl.dot_scaled with the rows as its MXFP4 operand (codes [64, Di/2], scales [64, Di/32]) against
  the BF16 parts: three dots per page, loading the next page's bytes before scoring this one.
Both take exact products and float32 sums, so scores differ from the reference only by summation
order.

On Hopper GPUs the FP8 scan runs as a Gluon kernel (indexer_scan_hopper.py): the same sums in the
same order, so the same keys, with the operand layouts stated instead of left to the compiler.
Where its pages suit the bulk copies, that launch also scores the general queries, with the same
BF16 dots as the general scan's (its bits), and the general scan is not launched at all.

Each score is stored as an int64 key (order-preserving bits of the float score, then
INT32_MAX - e), so one torch.topk over the keys gives the reference's order including ties, and
an invisible column holds INT64_MIN, which decodes to NaN. The decode top-k writes no invisible
page: the scan gives each row's length instead, and the selection reads no further
(index_score_keys_and_lengths, key_select.select_entries), so in a batch whose block table is as
wide as its longest request the short rows cost their own length, not the longest's. Each key is computed the same way
whatever else shares the launch (fixed 64-entry pages, no cross-key reduction), so a query's
selection does not depend on its batch or on the split of pages over programs.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from . import grid_dependency, scan_plan
from . import indexer_scan_hopper as hopper_scan
from .block_quant import fp8_e4m3_block_quant
from .dispatch import gluon_ran, use_triton
from .geometry import BLOCK, CSA
from .grid_dependency import wait_for_previous_grid
from .indexer_topk_ref import index_scores, select_topk
from .key_select import kernel_wins, select_entries
from .key_select_ref import SENTINEL, entries_of_keys
from .kv_layout import index_row_bytes, index_scales_as_words
from .quantize import reference_decode_index
from .scan_plan import planned_span
from .scan_operands import E2M1_TO_E4M3_PTX, E2M1_TO_E4M3_SCALE, GENERAL_PARTS, MODE_FP8, MODE_GENERAL, scan_operands

log = logging.getLogger(__name__)
PAGE_ENTRIES = BLOCK // CSA  # CSA entries per page: one 256-position block
# Launch shape, fixed: the warp count changes the layout of the dots and so the order of the score
# sums (keys differ in the last bits between 4 and 8 warps on an H100); pages per step and
# programs do not. Swept on an H100 (`python -m load_tests.sweep_kernel_launch --only scan`, FP8
# scan, 1M context, batch 32): 4 warps and 2 pages (128 keys) per step, 0.52 ms; 1 page 0.61 ms;
# 4 pages 0.91 ms; 8 warps 0.83 ms. At 4 warps the FP8 scan holds 252 registers per thread, so 2
# programs fit on an SM: its launch gives each query (2 x SMs) // queries programs, one wave
# (a ninth program per query left a second wave of 24 programs). The general scan keeps about 4
# programs per SM.
FP8_PROGRAMS_PER_SM, GENERAL_PROGRAMS_PER_SM = 2, 4
SCAN_WARPS = 4
SCAN_STAGES = 3  # software-pipelining depth of the FP8 scan's loop (Triton's default)
FP8_PAGES = 2  # pages per step of the FP8 scan
# the decode top-k: the scan writes each row's keys up to its own length and the selection reads no
# further (index_score_keys_and_lengths); off, every row's keys run to the batch's widest table,
# sentinels past each row's visible entries (load_tests/bench_scan_split.py times both)
ROW_LENGTHS = True
# Hopper GPUs take the FP8 scan in Gluon (indexer_scan_hopper.py; 0.35 against 0.52 ms at 1M x 32 on
# an H100); off, they run the Triton kernel above (the launch sweep turns it off to time that one)
HOPPER_SCAN = True


@triton.jit
def _load_page(rows_ptr, table_row, page, valid, n_blk, page_stride, row_stride: tl.constexpr, DH: tl.constexpr):
    """The raw rows of one page of entries: codes [64, DH] and scales [64, DH / 16] (uint8); each
    row is DH bytes of packed E2M1 (low nibble first) then one UE8M0 byte per 32 elements, which
    is the MXFP4 operand tl.dot_scaled takes as is. Nothing is read where `valid` is false."""
    page_id = tl.load(table_row + tl.minimum(page, n_blk - 1)).to(tl.int64)
    entry = tl.arange(0, 64)[:, None]
    row = rows_ptr + page_id * page_stride + entry * row_stride
    mask = entry < valid.to(tl.int32) * 64  # all rows or none
    codes = tl.load(row + tl.arange(0, DH)[None, :], mask=mask, other=0)
    scales = tl.load(row + DH + tl.arange(0, DH // 16)[None, :], mask=mask, other=127)
    return codes, scales


@triton.jit
def _page_keys(codes, scales, col, n_vis, q0, q_t, q_stride_part, w, inv_sqrt_di,
               N_PARTS: tl.constexpr, SENTINEL_KEY: tl.constexpr):
    """Score keys [64] of one page's entries (columns col) for one query."""
    acc = tl.dot_scaled(codes, scales, "e2m1", q0, None, "bf16")  # [64 entries, HP heads]
    for part in tl.static_range(1, N_PARTS):  # the float32 remainder of q, re-read from cache
        acc = tl.dot_scaled(codes, scales, "e2m1", tl.load(q_t + part * q_stride_part), None, "bf16", acc)
    return _keys_of(acc, w, inv_sqrt_di, col, n_vis, SENTINEL_KEY)


@triton.jit
def _keys_of(acc, w, head_scale, col, n_vis, SENTINEL_KEY: tl.constexpr):
    """int64 keys [N] of head dot products acc [N entries, HP heads]: the order-preserving bits of
    sum_h w_h * relu(acc) * head_scale_h, then INT32_MAX - col (ties to the lower entry)."""
    score = tl.sum(w[None, :] * (tl.maximum(acc, 0.0) * head_scale), axis=1)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in the reference sort
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    key = ordered * 4294967296 + (2147483647 - col)
    return tl.where(col < n_vis, key, SENTINEL_KEY)


@triton.jit
def _span(pos_ptr, mode_ptr, S, n_cols, n_blk, pages_per_prog, MODE: tl.constexpr, BLOCK_S: tl.constexpr,
          STEP: tl.constexpr, SENTINELS: tl.constexpr):
    """(s, page_lo, page_hi, n_vis, vis_hi, first) of this program: the plan's (BLOCK_S > 0:
    scan_plan) or program (s, j)'s pages_per_prog pages of query s. It scores [page_lo, vis_hi)
    and writes the sentinel into [max(vis_hi, page_lo), page_hi); `first`: query s's first program."""
    if BLOCK_S > 0:
        s, page_lo, page_hi, n_vis, vis_hi, first = planned_span(pos_ptr, mode_ptr, S, n_cols, n_blk, MODE, BLOCK_S,
                                                                 STEP, SENTINELS)
    else:
        s = tl.program_id(0)
        page_lo = tl.program_id(1) * pages_per_prog
        page_hi = tl.minimum(page_lo + pages_per_prog, tl.cdiv(n_cols, 64))
        n_vis = (tl.load(pos_ptr + s).to(tl.int32) + 1) // 4
        vis_hi = tl.minimum(page_hi, tl.minimum(tl.cdiv(n_vis, 64), n_blk))
        first = tl.program_id(1) == 0
    return s, page_lo, page_hi, n_vis, vis_hi, first


@triton.jit
def _scan_kernel(q_ptr, w_ptr, mode_ptr, pos_ptr, rows_ptr, table_ptr, out_ptr,
                 q_stride_s, q_stride_part, table_stride_s, page_stride, out_stride_s,
                 n_blk, n_cols, pages_per_prog, inv_sqrt_di, row_stride: tl.constexpr,
                 HP: tl.constexpr, DI: tl.constexpr, N_PARTS: tl.constexpr, SENTINEL_KEY: tl.constexpr,
                 MODE: tl.constexpr, DEPENDENT: tl.constexpr):
    """Score keys of the visible entries of the queries in MODE (the general scan), from N_PARTS
    BF16 query parts; the FP8 launch writes the sentinels. DEPENDENT: launched as a dependent of
    the FP8 launch (grid_dependency), so a program waits for that launch's end before it reads
    anything (and every program waits: the work after this kernel waits for this one alone). It
    used to score first and wait after, reading the operands before the wait that makes earlier
    kernels' writes visible to it, and back-to-back calls then gave other keys than plain launches
    in a few rows (grid_dependency). Split per query, never planned (index_score_keys says why)."""
    wait_for_previous_grid(DEPENDENT)  # before the first read: see grid_dependency
    s, page_lo, page_hi, n_vis, vis_hi, _ = _span(pos_ptr, mode_ptr, 0, n_cols, n_blk, pages_per_prog, MODE, 0, 1,
                                                  False)
    n = tl.arange(0, 64)
    out_row = out_ptr + s.to(tl.int64) * out_stride_s
    if tl.load(mode_ptr + s) == MODE:  # else the FP8 launch scores this query
        h = tl.arange(0, HP)
        q_t = q_ptr + s.to(tl.int64) * q_stride_s + h[None, :] * DI + tl.arange(0, DI)[:, None]  # part p: [DI, HP]
        q0 = tl.load(q_t)
        w = tl.load(w_ptr + s * HP + h)
        table_row = table_ptr + s.to(tl.int64) * table_stride_s
        # the next page's bytes are requested before this page is scored, so their latency
        # overlaps the decode and the dot
        codes, scales = _load_page(rows_ptr, table_row, page_lo, page_lo < vis_hi, n_blk, page_stride, row_stride,
                                   DI // 2)
        for page in range(page_lo, vis_hi):
            next_codes, next_scales = _load_page(rows_ptr, table_row, page + 1, page + 1 < vis_hi, n_blk,
                                                 page_stride, row_stride, DI // 2)
            key = _page_keys(codes, scales, page * 64 + n, n_vis, q0, q_t, q_stride_part, w, inv_sqrt_di,
                             N_PARTS, SENTINEL_KEY)
            tl.store(out_row + page * 64 + n, key)
            codes, scales = next_codes, next_scales


@triton.jit
def _e2m1_to_e4m3(raw, INTERPRET: tl.constexpr):
    """Packed E2M1 codes raw uint8 [N, n] (element 2j in the low nibble of byte j) -> their E4M3
    bytes [N, 2n] (module docstring: the value times 2**-6) in the scan's K order, which takes
    each group of 8 elements (4 bytes) as its 4 even elements, then its 4 odd ones.

    On a GPU the bytes are converted 4 at a time in 32-bit registers (inline PTX: 7 operations per
    8 elements, and the even and odd registers are already the dot operand's groups of 4); the
    interpreter, which runs no PTX, does the same per byte."""
    if INTERPRET:
        even = ((raw & 7) << 2) | ((raw & 8) << 4)
        odd = ((raw >> 2) & 0x1C) | (raw & 0x80)
    else:
        even, odd = tl.inline_asm_elementwise(
            E2M1_TO_E4M3_PTX, "=r,=r,r", [raw], dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
    N: tl.constexpr = raw.shape[0]
    n: tl.constexpr = raw.shape[1]
    grouped = tl.join(even, odd).reshape(N, n // 4, 4, 2).permute(0, 1, 3, 2)
    return grouped.reshape(N, 2 * n).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _scan_fp8_kernel(q8_ptr, w8_ptr, mode_ptr, pos_ptr, rows_ptr, table_ptr, out_ptr,
                     q8_stride_s, table_stride_s, page_stride, out_stride_s,
                     n_blk, n_cols, pages_per_prog, S, len_ptr, row_stride: tl.constexpr,
                     HP: tl.constexpr, DI: tl.constexpr, SENTINEL_KEY: tl.constexpr,
                     PAGES: tl.constexpr, INTERPRET: tl.constexpr, MODE: tl.constexpr, WORD_SCALES: tl.constexpr,
                     BLOCK_S: tl.constexpr, SENTINELS: tl.constexpr):
    """Score keys of the visible entries of the queries in MODE (the FP8 scan: module docstring),
    PAGES pages per step, and the sentinel of every invisible page of every query, or (not
    SENTINELS) each query's length instead (index_score_keys). WORD_SCALES: rows are 4-byte
    aligned and hold whole groups of 4 scale bytes."""
    s, page_lo, page_hi, n_vis, vis_hi, first = _span(pos_ptr, mode_ptr, S, n_cols, n_blk, pages_per_prog, MODE,
                                                      BLOCK_S, PAGES, SENTINELS)
    out_row = out_ptr + s.to(tl.int64) * out_stride_s
    if tl.load(mode_ptr + s) == MODE:  # else the general scan scores this query
        h = tl.arange(0, HP)
        # q8 [S, Di/32, HP, 32]: block b of every head as a [32, HP] operand, in the K order of
        # _e2m1_to_e4m3
        q_t = q8_ptr + s.to(tl.int64) * q8_stride_s + h[None, :] * 32 + tl.arange(0, 32)[:, None]
        qs = ()
        for b in tl.static_range(DI // 32):
            qs = qs + (tl.load(q_t + b * HP * 32),)
        w8 = tl.load(w8_ptr + s * HP + h)  # weights x head scales x Di**-0.5 (query_operands)
        table_row = table_ptr + s.to(tl.int64) * table_stride_s
        entry = tl.arange(0, 64 * PAGES)
        for page in range(page_lo, vis_hi, PAGES):
            pg = page + entry // 64
            in_range = pg < vis_hi  # rows of pages past vis_hi are not read
            page_id = tl.load(table_row + tl.minimum(pg, n_blk - 1)).to(tl.int64)
            row = rows_ptr + page_id * page_stride + (entry % 64) * row_stride
            acc = tl.zeros([64 * PAGES, HP], tl.float32)
            # the scale bytes 4 at a time, as 32-bit words (block b's in bits 8(b%4).. of word b//4),
            # where rows are 4-byte aligned (68 bytes at Di=128): a byte load per block was a global
            # load each block waited for before its dot (too few bytes for the async copies that
            # stage the codes)
            words = ()
            if WORD_SCALES:
                for g in tl.static_range(DI // 128):
                    words = words + (tl.load((row + DI // 2 + 4 * g).to(tl.pointer_type(tl.int32)), mask=in_range,
                                             other=0x7F7F7F7F),)
            for b in tl.static_range(DI // 32):
                raw = tl.load(row[:, None] + b * 16 + tl.arange(0, 16)[None, :], mask=in_range[:, None], other=0)
                if WORD_SCALES:
                    e = (words[b // 4] >> (8 * (b % 4))) & 0xFF
                else:
                    e = tl.load(row + DI // 2 + b, mask=in_range, other=127).to(tl.int32)
                k_scale = tl.where(e == 0, 2.0**-127, (e << 23).to(tl.float32, bitcast=True))  # UE8M0, as kv_layout decodes
                # one block's exact sums (fresh accumulator), times the key's block scale
                acc += tl.dot(_e2m1_to_e4m3(raw, INTERPRET), qs[b]) * k_scale[:, None]
            col = page * 64 + entry
            # columns of pages past vis_hi are the sentinel loop's below
            tl.store(out_row + col, _keys_of(acc, w8, 1.0, col, n_vis, SENTINEL_KEY), mask=col < vis_hi * 64)

    if SENTINELS:
        n = tl.arange(0, 64)
        for page in range(tl.maximum(vis_hi, page_lo), page_hi):
            tl.store(out_row + page * 64 + n, tl.full([64], SENTINEL_KEY, tl.int64))
    elif first:
        tl.store(len_ptr + s, tl.minimum(n_vis, tl.minimum(n_blk, tl.cdiv(n_cols, 64)) * 64))


def _hopper_scan(q8, w8, mode, positions, index_rows, table, out, n_cols: int, lengths, general) -> tuple[bool, bool]:
    """Run the Gluon FP8 scan: (whether it ran, whether it scored the general scan's queries too).
    It did not run, and the Triton scan runs from then on, where this Triton cannot compile or
    launch it (Gluon is experimental: its API moves between Triton releases)."""
    global HOPPER_SCAN
    ppp = _pages_per_program(q8.shape[0], -(-n_cols // PAGE_ENTRIES), q8.device, hopper_scan.PROGRAMS_PER_SM)
    both = []
    HOPPER_SCAN = gluon_ran(lambda: both.append(hopper_scan.scan_fp8(
        q8, w8, mode, positions, index_rows, table, out, n_cols, ppp, SENTINEL, MODE_FP8, lengths, general)),
        "FP8 scan", "scan", log)
    return HOPPER_SCAN, HOPPER_SCAN and both == [True]


def _query_parts(q: torch.Tensor, hp: int) -> torch.Tensor:
    """q [S, Hi, Di] float32 -> BF16 parts [S, 3, hp, Di] (heads zero-padded to hp) with
    q == part0 + part1 + part2 exactly (the general scan's operand)."""
    S, Hi, Di = q.shape
    parts = []
    rest = q.float()
    for _ in range(3):
        p = rest.to(torch.bfloat16)
        parts.append(p)
        rest = rest - p.float()
    stacked = torch.zeros(S, 3, hp, Di, dtype=torch.bfloat16, device=q.device)
    stacked[:, :, :Hi] = torch.stack(parts, dim=1)
    return stacked


def _on_fp4_grid(codes: torch.Tensor) -> torch.Tensor:
    """Per element of E4M3 codes [..., Di]: whether its 32-element block is E2M1 values times one
    power of two (the FP4 grid), read off the code bits. A block whose largest magnitude is
    m * 2**E (m = 1 or 1.5) has FP4 scale 2**(E-2) (pow2_ceil(amax / 6)), so its values are 0 or
    (1 or 1.5) * 2**j with E-2 <= j+1 <= E+1, and only 1 * 2**(E-3) at the bottom (0.5 times the
    scale). A code's mantissa must then be 0 or 4 (the 1.5) and its exponent field within 3 of
    the block's largest; E4M3 subnormals but 2**-7 (mantissa 4, field 0) read as off the grid,
    which only sends such a query to the general scan. A dozen operations on bytes: the model's
    indexer runs this for every query block of a prefill, where fp4_e2m1_block_qdq(q) == q cost
    ten times more."""
    mag = codes.view(torch.uint8) & 0x7F
    mant, field = mag & 7, mag >> 3
    top = field.unflatten(-1, (-1, 32)).amax(-1, keepdim=True).expand(*field.shape[:-1], -1, 32).flatten(-2)
    below = top - field
    grid = ((mant & 3) == 0) & ((below < 3) | ((below == 3) & (mant == 0)))
    return (mag == 0) | grid


def _fp8_query(q: torch.Tensor, w: torch.Tensor, hp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FP8 scan's operands: q [S, Hi, Di] float32 -> E4M3 codes [S, Di/32, hp, 32] (block b of
    head h at [:, b, h], in the scan's K order) with q == codes * s_h for a power of two s_h per
    head; head weights w [S, Hi] times s_h * 2**6 * Di**-0.5 [S, hp] (relu(x) * s == relu(x * s)
    for s > 0); and whether the query may take the FP8 scan [S]: every head on the FP4 grid and
    exactly codes * s_h (else the general scan scores it)."""
    S, Hi, Di = q.shape
    q = q.float()
    codes, scale = fp8_e4m3_block_quant(q, Di)  # one block per head: scale [S, Hi, 1]
    # FP8 mode needs q exact as E4M3 codes times s_h, on the FP4 grid (whose block sums are exact
    # in the FP8 dot: module docstring)
    exact = ((codes.float() * scale == q) & _on_fp4_grid(codes)).flatten(1).all(1)
    q8 = torch.zeros(S, Di // 32, hp, 32, dtype=torch.float8_e4m3fn, device=q.device)
    # the K order as a view (no index tensor: this runs inside a decode step's CUDA graph, where a
    # host-to-device copy cannot be recorded): element 8i + 2b + t goes to position 8i + 4t + b
    ordered = codes.view(S, Hi, Di // 32, 4, 4, 2).transpose(-1, -2).reshape(S, Hi, Di // 32, 32)
    q8[:, :, :Hi] = ordered.transpose(1, 2)
    w8 = torch.zeros(S, hp, dtype=torch.float32, device=q.device)
    w8[:, :Hi] = w.float() * (scale[..., 0] * (E2M1_TO_E4M3_SCALE * Di**-0.5))
    return q8, w8, exact


def _pages_per_program(S: int, n_pages: int, device: torch.device, per_sm: int) -> int:
    """Pages per program so that S queries' programs fill per_sm programs per SM (at least one
    program per query; more queries than that run in several waves): the per-query split."""
    if device.type != "cuda":
        return 1
    return max(1, -(-n_pages // max(1, scan_plan.program_slots(device, per_sm) // S)))


def _check(q, w, index_rows, block_table, positions):
    S, Hi, Di = q.shape
    if w.shape != (S, Hi):
        raise ValueError(f"w has shape {list(w.shape)}, expected {[S, Hi]}")
    if index_rows.dim() != 3 or index_rows.shape[1] != PAGE_ENTRIES or index_rows.shape[2] != index_row_bytes(Di):
        raise ValueError(f"index_rows has shape {list(index_rows.shape)}, "
                         f"expected [P, {PAGE_ENTRIES}, {index_row_bytes(Di)}]")
    if block_table.dim() != 2 or block_table.shape[0] not in (1, S):
        raise ValueError(f"block_table has shape {list(block_table.shape)}, expected [{S} or 1, n_blk]")
    if positions.shape != (S,):
        raise ValueError(f"positions has shape {list(positions.shape)}, expected {[S]}")


def operands_reference(q: torch.Tensor, w: torch.Tensor, hp: int) -> tuple[torch.Tensor, ...]:
    """query_operands in torch operations (scan_operands' reference)."""
    S, Hi, _ = q.shape
    q8, w8, fp8_exact = _fp8_query(q, w, hp)
    mode = torch.where(fp8_exact, MODE_FP8, MODE_GENERAL).to(torch.int32)
    w_pad = torch.zeros(S, hp, dtype=torch.float32, device=q.device)
    w_pad[:, :Hi] = w
    return q8, w8, _query_parts(q, hp), mode, w_pad


def query_operands(q: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The scan's query operands: FP8 codes and scaled head weights (_fp8_query), BF16 parts
    (_query_parts), the scan each query takes [S] (MODE_FP8 / MODE_GENERAL), head weights
    zero-padded to hp [S, hp]. Row by row and without host syncs, so a decode step computes them
    inside its CUDA graph (Attention.prepare) and hands them to indexer_topk; on the kernel path
    in one launch (scan_operands.py), else in torch operations (operands_reference)."""
    hp = max(16, triton.next_power_of_2(q.shape[1]))
    if use_triton(q):
        return scan_operands(q.float(), w.float(), hp)
    return operands_reference(q, w, hp)


def index_score_keys(q: torch.Tensor, w: torch.Tensor, index_rows: torch.Tensor, block_table: torch.Tensor,
                     positions: torch.Tensor, n_cols: int, operands: tuple | None = None) -> torch.Tensor:
    """The Triton scan: int64 score keys [S, n_cols] (see the module docstring). `operands`:
    query_operands(q, w), when the caller has them already."""
    return _score_keys(q, w, index_rows, block_table, positions, n_cols, operands, None)


def index_score_keys_and_lengths(q: torch.Tensor, w: torch.Tensor, index_rows: torch.Tensor,
                                 block_table: torch.Tensor, positions: torch.Tensor, n_cols: int,
                                 operands: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """index_score_keys' keys up to each row's length, and the lengths [S] int32: row r's columns
    from lengths[r] on are left unwritten (they would all hold the sentinel), which
    key_select.select_entries(keys, k, lengths) never reads. In a batch of one long request and
    short ones, the short rows' columns up to the long one's are neither written nor read."""
    lengths = torch.empty(q.shape[0], dtype=torch.int32, device=q.device)
    return _score_keys(q, w, index_rows, block_table, positions, n_cols, operands, lengths), lengths


def _score_keys(q, w, index_rows, block_table, positions, n_cols, operands, lengths):
    """index_score_keys, and (`lengths` given) index_score_keys_and_lengths' keys into it."""
    _check(q, w, index_rows, block_table, positions)
    S, Hi, Di = q.shape
    if index_rows.stride(2) != 1:
        raise ValueError("index_rows must have contiguous rows")
    if n_cols % PAGE_ENTRIES:
        raise ValueError(f"n_cols={n_cols} must be a multiple of {PAGE_ENTRIES} (whole pages)")
    if Di < 32 or Di & (Di - 1):
        raise ValueError(f"index dim {Di} must be a power of two >= 32 (whole FP4 blocks, dot tiles >= 16)")
    q8, w8, parts, mode, w_pad = operands if operands is not None else query_operands(q, w)
    hp = w_pad.shape[1]
    table = block_table.to(torch.int32)
    out = torch.empty(S, n_cols, dtype=torch.int64, device=q.device)
    if table.shape[1] == 0:  # nothing to read, and the kernels' prefetch needs a table entry
        if lengths is not None:
            lengths.zero_()
        return out.fill_(SENTINEL)
    if S and n_cols:
        common = (table.stride(0) if table.shape[0] > 1 else 0, index_rows.stride(0), out.stride(0),
                  table.shape[1], n_cols)
        # a compile-time row stride (68 bytes at Di=128) lets Triton see 4-byte aligned rows and
        # load the codes 4 bytes at a time; a runtime one leaves them byte by byte
        consts = dict(row_stride=index_rows.stride(1), HP=hp, DI=Di, SENTINEL_KEY=SENTINEL, num_warps=SCAN_WARPS)
        # each query is scored by the launch of its mode; the FP8 one also writes the sentinels (or the
        # lengths). On Hopper the FP8 launch is the Gluon kernel (indexer_scan_hopper.py: the same keys)
        gluon_ran, general_scored = False, False
        if HOPPER_SCAN and hopper_scan.usable(q8, index_rows):
            gluon_ran, general_scored = _hopper_scan(q8, w8, mode, positions, index_rows, table, out, n_cols,
                                                     lengths, (parts, w_pad, Di**-0.5))
        if general_scored:  # the Gluon launch scored every query (indexer_scan_hopper.GENERAL_HERE)
            return out
        if not gluon_ran:
            sentinels = lengths is None
            ppp = _pages_per_program(S, -(-n_cols // PAGE_ENTRIES), q.device, FP8_PROGRAMS_PER_SM)
            grid, ppp, block_s = scan_plan.launch_split(S, n_cols, table.shape[1], FP8_PAGES, sentinels, q.device,
                                                        FP8_PROGRAMS_PER_SM, ppp)
            _scan_fp8_kernel[grid](
                q8, w8, mode, positions, index_rows, table, out, q8.stride(0), *common, ppp, S,
                out if sentinels else lengths, **consts, PAGES=FP8_PAGES, INTERPRET=not q.is_cuda, MODE=MODE_FP8,
                num_stages=SCAN_STAGES, WORD_SCALES=index_scales_as_words(index_rows, Di), BLOCK_S=block_s,
                SENTINELS=sentinels)
        # the general scan, where the Gluon launch did not score its queries: most queries take the FP8
        # scan, and then this launch's programs only end; as a dependent launch they do so in the FP8
        # scan's tail instead of after it (grid_dependency). It keeps
        # the per-query split: its queries, off the FP4 grid, are none of the model's, and under the
        # plan each of its programs would first compute it (on an H100 0.5 us more of a 32-query
        # call's 7 us at 8K, kernels/RESULTS.md, sixteenth session)
        n_pages = -(-n_cols // PAGE_ENTRIES)
        ppp = _pages_per_program(S, n_pages, q.device, GENERAL_PROGRAMS_PER_SM)
        dependent = grid_dependency.enabled(q)
        _scan_kernel[(S, -(-n_pages // ppp))](
            parts, w_pad, mode, positions, index_rows, table, out, parts.stride(0), parts.stride(1), *common, ppp,
            Di**-0.5, **consts, N_PARTS=GENERAL_PARTS, MODE=MODE_GENERAL, DEPENDENT=dependent,
            **grid_dependency.launch_kwargs(dependent))
    return out


def reference(q: torch.Tensor, w: torch.Tensor, index_rows: torch.Tensor, block_table: torch.Tensor,
              positions: torch.Tensor, topk: int) -> torch.Tensor:
    """select_topk over the decoded keys of each query's request."""
    _check(q, w, index_rows, block_table, positions)
    q, w = q.float(), w.float()
    S, _, Di = q.shape
    out = torch.full((S, topk), -1, dtype=torch.int32, device=q.device)
    n_vis = (positions.long() + 1) // 4
    # queries sharing a table row (a prefill chunk) share one decode of their keys
    groups = ([torch.arange(S, device=q.device)] if block_table.shape[0] == 1
              else [torch.tensor([i], device=q.device) for i in range(S)])
    for rows in groups:
        table = block_table[0 if block_table.shape[0] == 1 else int(rows[0])]
        n = min(int(n_vis[rows].max()), table.shape[0] * PAGE_ENTRIES) if rows.numel() else 0
        raw = index_rows[table[: -(-n // PAGE_ENTRIES)].long()].reshape(-1, index_rows.shape[-1])[:n]
        keys = reference_decode_index(raw, Di)
        out[rows] = select_topk(q[rows], w[rows], keys, positions[rows], topk).int()
    return out


def reference_scores(q: torch.Tensor, w: torch.Tensor, index_rows: torch.Tensor, block_table: torch.Tensor,
                     positions: torch.Tensor, n_cols: int) -> torch.Tensor:
    """index_scores of each query over its request's first n_cols entries [S, n_cols]."""
    q, w = q.float(), w.float()
    S, _, Di = q.shape
    out = torch.empty(S, n_cols, dtype=torch.float32, device=q.device)
    for i in range(S):
        table = block_table[0 if block_table.shape[0] == 1 else i]
        raw = index_rows[table[: -(-n_cols // PAGE_ENTRIES)].long()].reshape(-1, index_rows.shape[-1])[:n_cols]
        out[i] = index_scores(q[i : i + 1], w[i : i + 1], reference_decode_index(raw, Di))[0]
    return out


def indexer_topk(q: torch.Tensor, w: torch.Tensor, index_rows: torch.Tensor, block_table: torch.Tensor,
                 positions: torch.Tensor, topk: int, operands: tuple | None = None) -> torch.Tensor:
    """Top-k visible CSA entries per query: [S, topk] int32 entry indices, -1 padding.

    q [S, Hi, Di] float32 indexer queries, w [S, Hi] float32 head weights, index_rows
    [P_blk, 64, Di/2 + Di/32] uint8 (pools.csa_index[:, slot], rows contiguous), block_table
    [S, n_blk] (or [1, n_blk] shared by all queries) int32 page ids of each query's request,
    positions [S] the queries' positions, operands (optional) query_operands(q, w). Entries
    beyond the table are never read."""
    if not use_triton(q):
        return reference(q, w, index_rows, block_table, positions, topk)
    n_cols = PAGE_ENTRIES * max(block_table.shape[1], -(-topk // PAGE_ENTRIES))
    args = (q, w, index_rows, block_table, positions, n_cols, operands)
    if not kernel_wins(q.shape[0], topk, q.device):  # torch.topk reads every column: all of them written
        return entries_of_keys(*topk_of_keys(index_score_keys(*args), topk))
    if ROW_LENGTHS:
        keys, lengths = index_score_keys_and_lengths(*args)
        return select_entries(keys, topk, lengths)
    return select_entries(index_score_keys(*args), topk)


def _multiblock_topk(rows: int, width: int) -> bool:
    """Whether torch.topk on CUDA takes its multi-block radix select for `rows` slices of `width`
    (ATen's should_use_multiblock, as of torch 2.11): some 30 kernel launches per call instead of
    a few. Only the launch count depends on it, never the result."""
    return ((rows <= 20 and width >= 20000) or (20 < rows <= 40 and width >= 10000)
            or (40 < rows <= 80 and width >= 8000) or (80 < rows < 200 and width >= 5000)
            or (200 <= rows < 800 and width >= 3000) or (800 <= rows <= 4000 and width >= 800)
            or (rows > 4000 and width >= 400))


def topk_of_keys(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(keys, k, dim=1, sorted=True) of distinct int64 score keys [S, n].

    For the rows key_select leaves to torch (more than SELECT_MAX_ROWS: a prefill chunk's) over
    long key lists, torch.topk's multi-block select launches some 30 small kernels from the host.
    There the keys go in two rounds instead, each a single-block select: the top k of each piece
    of the row, then the top k of those. (Decode batches, for which this was written, now take
    key_select's kernel.) The keys are distinct (each carries its entry index), so the
    second round's top k is the row's and comes out in the same order: the same result."""
    S, n = keys.shape
    if k > n or not _multiblock_topk(S, n):
        return torch.topk(keys, k, dim=1, sorted=True)
    for piece in (8192, 4096, 2048):
        if piece < k or n % piece or _multiblock_topk(S * (n // piece), piece):
            continue
        r = n // piece
        if _multiblock_topk(S, r * k):
            continue
        best, idx = torch.topk(keys.view(S, r, piece), k, dim=2, sorted=False)
        idx = (idx + torch.arange(0, n, piece, device=keys.device)[:, None]).view(S, r * k)
        best, pick = torch.topk(best.view(S, r * k), k, dim=1, sorted=True)
        return best, idx.gather(1, pick)
    return torch.topk(keys, k, dim=1, sorted=True)


def scan_traffic(S: int, context: int, Hi: int, Di: int) -> tuple[int, int]:
    """(bytes, flops) of the scan for S decode queries, each over its own request's keys at
    `context` positions: key rows read, int64 score keys written, BF16 query part 0 and weights
    read; FLOPs of the Hi x Di dot per key plus ReLU, scale and weighted head sum (3 per head)."""
    n = (context + 1) // 4
    bytes_moved = S * (n * (index_row_bytes(Di) + 8) + Hi * Di * 2 + Hi * 4)
    flops = S * n * Hi * (2 * Di + 3)
    return bytes_moved, flops
