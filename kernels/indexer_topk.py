"""The lightning indexer's scan and top-k over the paged FP4 key cache (v4-architecture.md §4, §9).

Per query t (position p_t) and visible entry e (e < (p_t + 1) // 4):
    I[t, e] = sum_h w[t, h] * relu(q[t, h] . k_e) * Di**-0.5
with k_e decoded from its 68-byte row (kv_layout.py: packed E2M1, a UE8M0 scale per 32).
Selection follows indexer_topk_ref.select_topk: descending score, ties to the lower index, -1
where fewer than topk entries are visible.

The scan reads each page's 64 rows once and scores them for all Hi heads with tl.dot_scaled:
the rows are already its MXFP4 operand (codes [64, Di/2], scales [64, Di/32]); the query is
the BF16 operand [Di, Hi]. A decoded key is c * 2**s with c in {0, .5, ..., 6}, exact in BF16,
and the query is split into BF16 parts q = q0 + q1 + q2, which is exact for any float32; so
products are exact, sums run in float32, and scores differ from the reference only by summation
order. A query on the BF16 grid (the model's FP4-rounded queries are) needs only q0: it is
scored by a launch compiled for one part; the rest by a second launch doing three dots per page
(a separate launch keeps the common kernel's register count down). The next page's bytes are
loaded before the current page is scored, to overlap memory latency with the decode and dot.

Each score is stored as an int64 key (order-preserving bits of the float score, then
INT32_MAX - e), so one torch.topk over the keys gives the reference's order including ties, and
an invisible column holds INT64_MIN, which decodes to NaN. Each key is computed the same way
whatever else shares the launch (fixed 64-entry pages, no cross-key reduction), so a query's
selection does not depend on its batch or on the split of pages over programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import use_triton
from .geometry import BLOCK, CSA
from .indexer_topk_ref import index_scores, select_topk
from .kv_layout import index_row_bytes
from .quantize import reference_decode_index

PAGE_ENTRIES = BLOCK // CSA  # CSA entries per page: one 256-position block
SENTINEL = -(2**63)  # key of an invisible column; its top 32 bits decode to NaN
_PROGRAMS_PER_SM = 4
# Warps per scan program. Fixed: the warp count changes the layout of the dot and so the order of
# the score sums (keys differ in the last bits between 4 and 8 warps on an H100). 4 was fastest
# at 128K and 1M (batch 32, 1M: 0.96 ms against 1.17 ms with 8).
SCAN_WARPS = 4


@triton.jit
def _load_page(rows_ptr, table_row, page, valid, n_blk, page_stride, row_stride, DH: tl.constexpr):
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
    score = tl.sum(w[None, :] * (tl.maximum(acc, 0.0) * inv_sqrt_di), axis=1)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in the reference sort
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    key = ordered * 4294967296 + (2147483647 - col)
    return tl.where(col < n_vis, key, SENTINEL_KEY)


@triton.jit
def _scan_kernel(q_ptr, w_ptr, parts_ptr, pos_ptr, rows_ptr, table_ptr, out_ptr,
                 q_stride_s, q_stride_part, table_stride_s, page_stride, row_stride, out_stride_s,
                 n_blk, n_cols, pages_per_prog, inv_sqrt_di,
                 HP: tl.constexpr, DI: tl.constexpr, N_PARTS: tl.constexpr, SENTINEL_KEY: tl.constexpr):
    """Score keys of the visible entries of queries needing N_PARTS query parts; the N_PARTS = 1
    launch also writes the sentinel of every invisible page."""
    s = tl.program_id(0)
    page_lo = tl.program_id(1) * pages_per_prog
    page_hi = tl.minimum(page_lo + pages_per_prog, tl.cdiv(n_cols, 64))
    n_vis = (tl.load(pos_ptr + s).to(tl.int32) + 1) // 4
    vis_hi = tl.minimum(page_hi, tl.minimum(tl.cdiv(n_vis, 64), n_blk))
    n = tl.arange(0, 64)
    out_row = out_ptr + s.to(tl.int64) * out_stride_s
    if tl.load(parts_ptr + s) == N_PARTS:  # else the other launch scores this query
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

    if N_PARTS == 1:
        for page in range(tl.maximum(vis_hi, page_lo), page_hi):
            tl.store(out_row + page * 64 + n, tl.full([64], SENTINEL_KEY, tl.int64))


def scores_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """int64 score keys -> float32 scores (NaN for invisible columns)."""
    top = (keys >> 32).to(torch.int32)
    return torch.where(top < 0, top ^ 0x7FFFFFFF, top).view(torch.float32)


def _query_parts(q: torch.Tensor, hp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [S, Hi, Di] float32 -> BF16 parts [S, 3, hp, Di] (heads zero-padded to hp) with
    q == part0 + part1 + part2, and the part count each query needs."""
    S, Hi, Di = q.shape
    parts = []
    rest = q.float()
    for _ in range(3):
        p = rest.to(torch.bfloat16)
        parts.append(p)
        rest = rest - p.float()
    stacked = torch.zeros(S, 3, hp, Di, dtype=torch.bfloat16, device=q.device)
    stacked[:, :, :Hi] = torch.stack(parts, dim=1)
    exact_in_one = (stacked[:, 1:] == 0).flatten(1).all(1)
    return stacked, torch.where(exact_in_one, 1, 3).to(torch.int32)


def _pages_per_program(S: int, n_pages: int, device: torch.device) -> int:
    """Pages per program so that the launch fills the GPU about _PROGRAMS_PER_SM times over."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, -(-S * n_pages // (_PROGRAMS_PER_SM * sms)))


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


def query_operands(q: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scan's query operands: BF16 parts [S, 3, hp, Di] and part counts [S] (_query_parts),
    head weights zero-padded to hp [S, hp]. Row by row and without host syncs, so a decode step
    computes them inside its CUDA graph (Attention.prepare) and hands them to indexer_topk."""
    S, Hi, _ = q.shape
    hp = max(16, triton.next_power_of_2(Hi))
    parts, n_parts = _query_parts(q, hp)
    w_pad = torch.zeros(S, hp, dtype=torch.float32, device=q.device)
    w_pad[:, :Hi] = w
    return parts, n_parts, w_pad


def index_score_keys(q: torch.Tensor, w: torch.Tensor, index_rows: torch.Tensor, block_table: torch.Tensor,
                     positions: torch.Tensor, n_cols: int, operands: tuple | None = None) -> torch.Tensor:
    """The Triton scan: int64 score keys [S, n_cols] (see the module docstring). `operands`:
    query_operands(q, w), when the caller has them already."""
    _check(q, w, index_rows, block_table, positions)
    S, Hi, Di = q.shape
    if index_rows.stride(2) != 1:
        raise ValueError("index_rows must have contiguous rows")
    if n_cols % PAGE_ENTRIES:
        raise ValueError(f"n_cols={n_cols} must be a multiple of {PAGE_ENTRIES} (whole pages)")
    if Di < 32 or Di & (Di - 1):
        raise ValueError(f"index dim {Di} must be a power of two >= 32 (whole FP4 blocks, dot tiles >= 16)")
    parts, n_parts, w_pad = operands if operands is not None else query_operands(q, w)
    hp = w_pad.shape[1]
    table = block_table.to(torch.int32)
    out = torch.empty(S, n_cols, dtype=torch.int64, device=q.device)
    n_pages = -(-n_cols // PAGE_ENTRIES)
    ppp = _pages_per_program(S, n_pages, q.device)
    if table.shape[1] == 0:  # nothing to read, and the kernel's prefetch needs a table entry
        return out.fill_(SENTINEL)
    if S and n_cols:
        # two launches, so that the common one-part scan is compiled without the registers of
        # the three-part one; each query is scored by the launch matching its part count
        for n_parts_launch in (1, 3):
            _scan_kernel[(S, -(-n_pages // ppp))](
                parts, w_pad, n_parts, positions, index_rows, table, out,
                parts.stride(0), parts.stride(1), table.stride(0) if table.shape[0] > 1 else 0,
                index_rows.stride(0), index_rows.stride(1), out.stride(0),
                table.shape[1], n_cols, ppp, Di**-0.5,
                HP=hp, DI=Di, N_PARTS=n_parts_launch, SENTINEL_KEY=SENTINEL, num_warps=SCAN_WARPS)
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
    keys = index_score_keys(q, w, index_rows, block_table, positions, n_cols, operands)
    best, idx = torch.topk(keys, topk, dim=1, sorted=True)
    return torch.where(torch.isfinite(scores_from_keys(best)), idx, -1).to(torch.int32)


def scan_traffic(S: int, context: int, Hi: int, Di: int) -> tuple[int, int]:
    """(bytes, flops) of the scan for S decode queries, each over its own request's keys at
    `context` positions: key rows read, int64 score keys written, BF16 query part 0 and weights
    read; FLOPs of the Hi x Di dot per key plus ReLU, scale and weighted head sum (3 per head)."""
    n = (context + 1) // 4
    bytes_moved = S * (n * (index_row_bytes(Di) + 8) + Hi * Di * 2 + Hi * 4)
    flops = S * n * Hi * (2 * Di + 3)
    return bytes_moved, flops
