"""The lightning indexer's FP8 scan for Hopper GPUs, in Gluon (Triton's layout-explicit dialect).

Same scores, bit for bit, as indexer_topk's FP8 scan (`_scan_fp8_kernel`, its module docstring
has the math): per 32-element block one exact E4M3 dot with a fresh accumulator, times the key's
block scale, summed in float32 in block order, then the ReLU'd, weighted head sum and the int64
key. What differs is where the bytes go. In Triton the compiler picked the layouts: each block's
converted codes went through shared memory to become the dot's operand, each block's scales too,
with a barrier each way (14 barriers per 128 keys), and the codes were staged by async copies the
loop waited on right after issuing them. Here the layouts are stated:

* each thread loads, as 32-bit words, exactly the code bytes its share of the dot operand needs.
  wgmma's register operand gives a thread, per row, the 4-element K groups q and q + 4 (q = lane
  mod 4); the thread loads the row's word q (8 codes), and the conversion to E4M3 makes its 4
  even codes group q and its 4 odd codes group q + 4. The query is laid out in that K order
  (position 16p + 4j + i holds code 8j + 2i + p) when it is copied to shared memory, once per
  program. No byte crosses threads.
* the scale words are loaded in the accumulator's row layout, so the block scales multiply the
  dot results in place;
* the next step's words are loaded before this step's dots (carried in registers as 32-bit
  words: as bytes each would take a register and a repack).

H100, 1M context x 32 queries: 0.27-0.28 ms (78-79% of the copy rate), the registers loader 0.36, the Triton
scan 0.52 (kernels/RESULTS.md).
Hopper only (wgmma); indexer_topk uses it where `usable` says so and keeps the Triton scan
elsewhere, which is also what the CPU tests run in the interpreter (Gluon has no interpreter).

How a program's pages reach it (LOADER). Loading each thread's own words (`_scan_kernel`, the
"registers" loader) caps the scan at about 77% of the copy rate even with nothing else in the
loop (kernels/RESULTS.md): a warp's 4-byte loads touch 16 bytes in each of 8 rows of 68. The
"bulk_ws" loader (`_scan_kernel_ws`) moves whole pages instead: one loader warp has the copy
engine (TMA) write each page's 4,352 bytes as they lie (17 words a row) into a ring of STAGES
shared-memory slots, two pages a slot; the scoring warp group waits for a full slot, reads its
words through a padded layout that skips each row's 17th word and hands the slot back (the
loader fences before refilling it: the copy engine writes through another proxy than the loads
read), and scores the two pages with each block's dot started before the previous one's float32
scale and add (`_store_slot_keys`), so the tensor cores work under the warps' math (warp
specialization: the loader runs ahead on its own with 24 registers, the scorer takes the rest).
It needs pages whose rows lie back to back on 16-byte boundaries (`bulk_copy_usable`, which the
engine's pools meet) and a Triton that lets shared memory be viewed through a padded layout it
was not allocated with (gluon_api.PADDED_VIEWS: 3.6, not 3.9); elsewhere the registers loader
runs (loader_for). Both give the same keys: the same sums in the same order (_block_scale, _keys_of,
_head_partials), checked bit for bit on the GPU.

The first block scale (FIRST_SCALE_OUT, bulk_ws only). The scorer is bound by its instructions,
not by memory (kernels/RESULTS.md: an H200 takes an H100's time), and 256 of the 634 a step were
the block scales' FFMAs: acc = d0 s0 + d1 s1 + d2 s2 + d3 s3, four per row and head. The bulk_ws
scorer sums acc' = d0 + d1 (s1/s0) + d2 (s2/s0) + d3 (s3/s0) instead and multiplies each lane's
weighted head sum by s0 (the scales are powers of two, and relu(s0 x) = s0 relu(x)): a step is
579 instructions (sm_90a, Triton 3.6) against 634, the guard below included. Scaling by a power
of two commutes with float32 rounding wherever neither value leaves the normal range, so every
partial value is then exactly the unfactored one over s0 and the keys are the same bits,
provided no intermediate value is subnormal or overflows. A guard makes sure of that:
* every visible row's four codes lie in [112, 143] (s in [2**-15, 2**16]; the quantizer's amax
  floor keeps the model's codes >= 112, kernels/quantize.py). A block's dot d is a multiple of
  2**-16 below 2**11 (E4M3 products of the query's 2**-9 grid and the codes' 2**-7), so every
  partial sum of acc' is 0 or a multiple of 2**-47 below 2**44;
* every nonzero head weight lies in [2**-40, 2**59): the weighted head sums are then 0 or
  multiples of 2**-110, times s0 >= 2**-125, and below 2**127.
Rows past the query's entries (any bytes) are left out of it: only a query's last step can hold
them, so that step alone is masked (_score_step). A program whose rows or weights miss the guard
scores all its pages again, after a barrier, page by page from global memory as the page-by-page
scorer does (_page_words_global): the same keys, slower. The guard's end costs a program about
0.3 us, so programs of fewer than FACTORED_STEPS steps score as before. GPU test: codes and
weights at both ends of the guard and past them give the Triton scan's keys; with the guard made
to pass everything, the rows past it give other keys (checked on an H100).

The general scan's queries (GENERAL_HERE, bulk_ws only). A query off the FP4 grid is scored by
indexer_topk's general scan: three BF16 parts of the query against the keys through tl.dot_scaled.
For the model's queries that launch had nothing to do, yet its programs still had to be scheduled
after this kernel's and end before the top-k could start: about 1.9 us of a 128K x 32 call's 40
(kernels/RESULTS.md, twentieth session). Here the plan counts those queries' steps too, and their
programs score them after the warp groups meet (_score_general), page by page from global memory,
with the general scan's arithmetic: the keys decoded as its tl.dot_scaled decodes them on Hopper
(E2M1 value times the block scale taken as a BF16 exponent field, 0 for code 0, NaN for 255), the
same 24 wgmma m64n64k16 on one accumulator (the first without one), and the ReLU'd heads times
Di**-0.5, weighted and summed in the accumulator's layout, as its reduction runs. So their keys are
that scan's bits, and the general scan is not launched.
"""

from __future__ import annotations

import functools

import torch
import triton.language as tl

from . import gluon_api, grid_dependency, scan_plan
from .kv_layout import index_row_bytes, index_scales_as_words
from .scan_operands import E2M1_TO_E4M3_PTX
from .scan_plan import _SENTINEL_PAGES

try:  # Gluon ships with Triton 3.4+; without it the Triton scan runs everywhere
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None
else:
    from .gluon_api import cta_barrier, reinterpret, tma_load
    from .grid_dependency import let_next_grid_start, wait_for_previous_grid_gluon

ROWS_PER_STEP = 128  # two 64-entry pages: one [128, 32] x [32, heads] dot per block
WARPS = 4  # one warp group; about 250 registers a thread, so two programs per SM
# H100 sweep at 1M x 32 (kernels/RESULTS.md, twelfth session): bulk_ws 0.287 ms at 2, 0.344 at 1, 0.331 at
# 3 (where the two-page scorer spills at 136 registers); the page-by-page scorer (SCORED_PAGES = 1) fits
# three without spills and measured 0.290 there, no faster than the two-page scorer at two
PROGRAMS_PER_SM = 2
DI = 128  # the layouts below hold a row's 4 block scales in one word
# the same values as the kernels see them (a Gluon kernel reads only constexpr globals)
_ROWS, _WARPS, _DI = tl.constexpr(ROWS_PER_STEP), tl.constexpr(WARPS), tl.constexpr(DI)
ROW_WORDS = index_row_bytes(DI) // 4  # an indexer row as 32-bit words: 16 of codes, 1 of scales
_ROW_BYTES = tl.constexpr(4 * ROW_WORDS)
PAGE_WORDS = 64 * ROW_WORDS  # a page of 64 rows, as 32-bit words
_PAGE_WORDS = tl.constexpr(PAGE_WORDS)
PAGE_SLOT = 2048  # words from one page of a ring slot to the next (bulk copies land on 128-byte boundaries)
_PAGE_SLOT = tl.constexpr(PAGE_SLOT)
# two-page steps in flight per program (bulk_ws). H100, four alternations, ms (kernels/RESULTS.md):
# 128K x 32 2: 0.0448-0.0451, 3: 0.0451-0.0459, 4: 0.0456-0.0462; 1M x 32 and 1M x 1 the same within noise
STAGES = 2
# pages of a step whose words and sums the bulk_ws scorer holds at once: 2, or 1 (page by page: fewer
# registers, for three programs an SM; slower at two and no faster at three, PROGRAMS_PER_SM above)
SCORED_PAGES = 2
# the bulk_ws scorer takes each row's first block scale out of its sum (module docstring: "The first
# block scale"); False scores as the registers loader does. H100, the same keys: 128K x 32 0.0421 ->
# 0.0402-0.0407 ms, 1M x 32 0.284-0.288 -> 0.270-0.277 (kernels/RESULTS.md, twentieth session)
FIRST_SCALE_OUT = True
# the fewest steps a program takes the factored sums for (_score_pages): the guard's end costs about
# 0.3 us a program, a step saves about 0.05
FACTORED_STEPS = 8
# the bulk_ws kernel scores the general scan's queries too (_score_general), and the general scan's
# launch, whose programs found nothing to do for the model's queries, is not made. H100, the scan
# call with the proxy fence where the twenty-third session put it (before the scorer's hand-back;
# the loader's since: 128K x 32 0.0378), ms (`python -m load_tests.bench_kernel_ab --set
# kernels.indexer_scan_hopper.GENERAL_HERE=False,True`, the same keys): 128K x 32 0.0413 -> 0.0397
# (64.5% -> 67.1% of the copy rate), 128K x 64 0.0754 -> 0.0733, 1M x 32 the same, 128K x 1 0.0058 ->
# 0.0047, 1M x 1 0.0140 -> 0.0125, 8K x 32 0.0076 -> 0.0060 (kernels/RESULTS.md, twenty-third
# session; its GPU test's failure of the twenty-second was the missing fence). Off: that launch
# scores them
GENERAL_HERE = True
# a float32 from the lane whose id is this one's xor 1 / xor 2 (_store_step_keys)
_LANE_XOR1 = tl.constexpr("shfl.sync.bfly.b32 $0, $1, 1, 0x1f, -1;")
_LANE_XOR2 = tl.constexpr("shfl.sync.bfly.b32 $0, $1, 2, 0x1f, -1;")
# registers a thread of the loader warp keeps: the fewest, its values live in uniform registers
LOADER_REGS = tl.constexpr(24)


if gluon is not None:

    @gluon.jit
    def _e2m1_to_e4m3(raw):
        """Packed E2M1 bytes -> (even codes, odd codes) as E4M3 bytes, each the value times 2**-6
        (indexer_topk._e2m1_to_e4m3: the same 7 operations per 4 bytes)."""
        return gl.inline_asm_elementwise(E2M1_TO_E4M3_PTX, "=r,=r,r", [raw], dtype=(gl.uint8, gl.uint8), is_pure=True,
                                         pack=4)

    @gluon.jit
    def _dot_operand(words, ROWS: gl.constexpr, a_l: gl.constexpr, raw3_l: gl.constexpr):
        """One block's packed codes, 32-bit words [ROWS, 4] -> the dot's E4M3 operand [ROWS, 32] in
        a_l, K position 16p + 4j + i = code 8j + 2i + p. The bytes are taken out of the words by
        shifts (which the compiler folds back into the words' registers) because the conversion
        works on 4 bytes at a time."""
        shift = 8 * gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, raw3_l)))
        raw = ((gl.expand_dims(words, 2) >> shift[None, None, :]) & 0xFF).to(gl.uint8).reshape(ROWS, 16)
        even, odd = _e2m1_to_e4m3(raw)
        # [ROWS, 4 words, 4 bytes] twice -> [ROWS, 2 (even, odd), 4 words, 4 bytes]
        a = gl.join(even.reshape(ROWS, 4, 4), odd.reshape(ROWS, 4, 4)).permute(0, 3, 1, 2).reshape(ROWS, 32)
        return gl.convert_layout(a.to(gl.float8e4nv, bitcast=True), a_l)

    @gluon.jit
    def _step_loads(rows_ptr, table_row, page, vis_hi, n_blk, page_stride, row_stride: gl.constexpr,
                    ROWS: gl.constexpr, row_l: gl.constexpr, word_l: gl.constexpr):
        """A step's reads: the rows' scale words [ROWS] (row_l; block b's scale in bits 8b..8b+7)
        and each block's packed codes as words [ROWS, 4] (word_l). Rows of pages past vis_hi are
        not read (codes 0, scales 127)."""
        r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, word_l))
        pg = page + r // 64
        in_range = pg < vis_hi
        page_id = gl.load(table_row + gl.minimum(pg, n_blk - 1), mask=in_range, other=0)
        row = (rows_ptr + page_id.to(gl.int64) * page_stride + (r % 64) * row_stride).to(gl.pointer_type(gl.int32))
        scales = gl.convert_layout(gl.load(row + _DI // 8, mask=in_range, other=0x7F7F7F7F), row_l)
        col = gl.arange(0, 4, layout=gl.SliceLayout(0, word_l))
        blocks = ()
        for b in gl.static_range(_DI // 32):
            blocks = blocks + (gl.load(row[:, None] + b * 4 + col[None, :], mask=in_range[:, None], other=0),)
        return scales, blocks


    @gluon.constexpr_function
    def _acc_layout(HP, K=32):
        """wgmma's accumulator of a step: [ROWS keys, HP heads] over one warp group; K: the
        instruction's (32 for the FP8 dots, 16 for the general queries' BF16 ones, as
        indexer_topk._scan_kernel's tl.dot_scaled takes them on Hopper: m64nHPk16)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[_WARPS, 1], instr_shape=[16, HP, K])

    @gluon.constexpr_function
    def _operand_layout(HP):
        """wgmma's register operand of a step's codes (the FP8 dot's A, K groups of 4)."""
        return gl.DotOperandLayout(operand_index=0, parent=_acc_layout(HP), k_width=4)

    # codes as [row, word, byte]: the thread holding the operand's K groups q and q + 4 of a row
    # (lane bits 0-1 = q, rows as the operand spreads them over lanes, warps and registers) holds
    # word q; a step's words [ROWS, 4] drop the byte dim
    _RAW3_L = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [8, 0, 0], [64, 0, 0]],
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[ROWS_PER_STEP, 4, 4]))
    _WORD_L = gl.constexpr(gl.SliceLayout(2, _RAW3_L.value))

    @gluon.jit
    def _program_span(pos_ptr, n_cols, n_blk, pages_per_prog):
        """Program (s, j) scores query s's pages [page_lo, vis_hi) and writes the sentinel up to page_hi;
        program (s, 0) is its query's first."""
        s = gl.program_id(0)
        page_lo = gl.program_id(1) * pages_per_prog
        page_hi = gl.minimum(page_lo + pages_per_prog, gl.cdiv(n_cols, 64))
        n_vis = (gl.load(pos_ptr + s).to(gl.int32) + 1) // 4
        vis_hi = gl.minimum(page_hi, gl.minimum(gl.cdiv(n_vis, 64), n_blk))
        return s, page_lo, page_hi, n_vis, vis_hi, gl.program_id(1) == 0

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _planned_span(pos_ptr, mode_ptr, S, n_cols, n_blk, MODE: gl.constexpr, BLOCK_S: gl.constexpr,
                      SENTINELS: gl.constexpr, BOTH_MODES: gl.constexpr):
        """scan_plan.planned_span (its arithmetic, for STEP 2) in Gluon's layouts; BOTH_MODES: the
        queries of the general scan are this launch's too (GENERAL), and weigh as the others."""
        # every warp holds all queries (a lane one or two), so no sum crosses warps
        q_l: gl.constexpr = gl.BlockedLayout([(BLOCK_S + 31) // 32], [32], [_WARPS], [0])
        n_pages = gl.cdiv(n_cols, 64)
        i = gl.arange(0, BLOCK_S, layout=q_l)
        ok = i < S
        n_vis = (gl.load(pos_ptr + i, mask=ok, other=-1).to(gl.int32) + 1) // 4
        vis = gl.minimum(gl.minimum(gl.cdiv(n_vis, 64), n_blk), n_pages)
        # a query of the other mode scores nothing here (the general scan does) unless BOTH_MODES, but its
        # sentinels are ours
        if BOTH_MODES:
            steps = gl.cdiv(vis, 2)
        else:
            steps = gl.where(gl.load(mode_ptr + i, mask=ok, other=MODE + 1) == MODE, gl.cdiv(vis, 2), 0)
        if SENTINELS:
            spare = n_pages - vis
        else:
            spare = gl.zeros_like(vis)
        units = gl.where(ok, gl.maximum(steps + spare // _SENTINEL_PAGES, 1), 0)  # a program for every query
        G = gl.num_programs(0)
        total = gl.maximum(gl.sum(units, axis=0), 1)
        per_query = gl.where(units > 0, gl.maximum(gl.cdiv(units * (G - S), total), 1), 0)
        end = gl.associative_scan(per_query, 0, _add)
        p = gl.program_id(0)
        hit = (end > p) & (end - per_query <= p)  # this program's query (none: a spare program)
        s = gl.sum(gl.where(hit, i, 0), axis=0)
        c = gl.sum(gl.where(hit, per_query, 0), axis=0)
        q_units = gl.sum(gl.where(hit, units, 0), axis=0)
        q_steps = gl.sum(gl.where(hit, steps, 0), axis=0)
        q_vis = gl.sum(gl.where(hit, vis, 0), axis=0)
        quota = gl.cdiv(q_units, gl.maximum(c, 1))
        u0 = (p - gl.sum(gl.where(hit, end - per_query, 0), axis=0)) * quota
        u1 = gl.minimum(u0 + quota, q_units)
        # units below q_steps are steps (pages 2u, 2u + 1), the rest sentinel pages from q_vis on
        page_lo = gl.where(u0 < q_steps, 2 * u0, q_vis + (u0 - q_steps) * _SENTINEL_PAGES)
        page_hi = gl.where(u1 <= q_steps, gl.minimum(2 * u1, q_vis), q_vis + (u1 - q_steps) * _SENTINEL_PAGES)
        if SENTINELS:  # the last program takes the sentinel pages under a unit
            last = n_pages
        else:
            last = q_vis
        found = u0 < q_units
        page_hi = gl.where(found, gl.where(u1 == q_units, last, page_hi), 0)
        page_lo = gl.minimum(page_lo, page_hi)
        return (s, page_lo, page_hi, gl.sum(gl.where(hit, n_vis, 0), axis=0), gl.minimum(page_hi, q_vis),
                found & (u0 == 0))

    @gluon.jit
    def _span(pos_ptr, mode_ptr, S, n_cols, n_blk, pages_per_prog, MODE: gl.constexpr, BLOCK_S: gl.constexpr,
              SENTINELS: gl.constexpr, BOTH_MODES: gl.constexpr):
        """(s, page_lo, page_hi, n_vis, vis_hi, first) of this program: the plan's (BLOCK_S > 0) or
        the grid's (s, j) split; `first`: the first program of query s."""
        if BLOCK_S > 0:
            s, page_lo, page_hi, n_vis, vis_hi, first = _planned_span(pos_ptr, mode_ptr, S, n_cols, n_blk, MODE,
                                                                      BLOCK_S, SENTINELS, BOTH_MODES)
        else:
            s, page_lo, page_hi, n_vis, vis_hi, first = _program_span(pos_ptr, n_cols, n_blk, pages_per_prog)
        return s, page_lo, page_hi, n_vis, vis_hi, first

    @gluon.jit
    def _query_smem(HP: gl.constexpr):
        """Room for the query's blocks [NB, HP, 32] in shared memory (K contiguous, as an FP8 dot's
        shared operand must be)."""
        return gl.allocate_shared_memory(gl.float8e4nv, [_DI // 32, HP, 32],
                                         gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=8, rank=2))

    @gluon.jit
    def _store_query(q_smem, q8_ptr, s, q8_stride_s):
        """Query s's blocks into q_smem by one warp group, in the step operand's K order: position
        16p + 4j + i holds code 8j + 2i + p, which q8's order (indexer_topk._fp8_query) keeps at
        8j + 4p + i."""
        HP: gl.constexpr = q_smem.shape[1]
        q_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [_WARPS, 1], [1, 0])
        h = gl.arange(0, HP, layout=gl.SliceLayout(1, q_l))
        k = gl.arange(0, 32, layout=gl.SliceLayout(0, q_l))
        order = 8 * ((k % 16) // 4) + 4 * (k // 16) + k % 4
        q_src = q8_ptr + s.to(gl.int64) * q8_stride_s + h[:, None] * 32 + order[None, :]
        for b in gl.static_range(_DI // 32):
            q_smem.index(b).store(gl.load(q_src + b * HP * 32))

    @gluon.jit
    def _step_keys(blocks, scales, q_smem, w8, col, n_vis, SENTINEL_KEY: gl.constexpr):
        """One step's score keys [ROWS] (the accumulator's row layout) from its code words (NB
        blocks of [ROWS, 4]) and scale words: per block one exact dot with a fresh accumulator,
        times the key's block scale, then the ReLU'd, weighted head sum as the int64 key of
        indexer_topk._keys_of."""
        ROWS: gl.constexpr = _ROWS
        HP: gl.constexpr = w8.shape[0]
        zero = gl.zeros([ROWS, HP], gl.float32, _acc_layout(HP))
        acc = zero
        for b in gl.static_range(_DI // 32):
            a = _dot_operand(blocks[b], ROWS, _operand_layout(HP), _RAW3_L)
            d = warpgroup_mma(a, q_smem.index(b).permute((1, 0)), zero, use_acc=False)
            acc = acc + d * _block_scale(scales, b)[:, None]
        return _keys_of(acc, w8, col, n_vis, SENTINEL_KEY)

    @gluon.jit
    def _block_scale(scales, b: gl.constexpr):
        """Block b's scale of each row, as float32, from the rows' scale words (E8M0: 2**(e - 127))."""
        # code 0 is 2**-127, a subnormal: its bits 0x00400000 lie below every normal scale's (e << 23),
        # so one integer max makes it (a compare and a select did, 16 instructions a step more)
        return gl.maximum(((scales >> (8 * b)) & 0xFF) << 23, 0x00400000).to(gl.float32, bitcast=True)

    @gluon.jit
    def _keys_of(acc, w8, col, n_vis, SENTINEL_KEY: gl.constexpr):
        """Rows' block-summed head scores [rows, HP] -> their int64 keys (indexer_topk._keys_of):
        the ReLU'd, weighted head sum, its bits ordered as integers, the column below them; the
        sentinel past the query's visible entries."""
        return _key_bits(gl.sum(w8[None, :] * gl.maximum(acc, 0.0), axis=1), col, n_vis, SENTINEL_KEY)

    @gluon.jit
    def _key_bits(score, col, n_vis, SENTINEL_KEY: gl.constexpr):
        """Rows' scores -> their int64 keys (_keys_of's second half)."""
        score = gl.where(score == 0.0, 0.0, score)
        bits = score.to(gl.int32, bitcast=True)
        ordered = gl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(gl.int64)
        return gl.where(col < n_vis, ordered * 4294967296 + (2147483647 - col), SENTINEL_KEY)

    @gluon.jit
    def _head_weights(w8_ptr, s, HP: gl.constexpr):
        return gl.load(w8_ptr + s * HP + gl.arange(0, HP, layout=gl.SliceLayout(0, _acc_layout(HP))))

    @gluon.jit
    def _write_sentinels(out_row, page_lo, vis_hi, page_hi, SENTINEL_KEY: gl.constexpr):
        """The sentinel key into every column of the program's pages that no query sees."""
        n = gl.arange(0, 64, layout=gl.BlockedLayout([1], [32], [_WARPS], [0]))
        for page in range(gl.maximum(vis_hi, page_lo), page_hi):
            gl.store(out_row + page * 64 + n, gl.full([64], SENTINEL_KEY, gl.int64, n.type.layout))

    @gluon.jit
    def _finish(out_row, len_ptr, s, first, page_lo, vis_hi, page_hi, n_vis, n_blk, n_cols,
                SENTINEL_KEY: gl.constexpr, SENTINELS: gl.constexpr):
        """The sentinel into the program's pages past its query's visible ones (SENTINELS), or, by
        the query's first program, the row's length: the columns the scans write
        (indexer_topk.index_score_keys)."""
        if SENTINELS:
            _write_sentinels(out_row, page_lo, vis_hi, page_hi, SENTINEL_KEY)
        elif first:
            gl.store(len_ptr + s, gl.minimum(n_vis, gl.minimum(n_blk, gl.cdiv(n_cols, 64)) * 64))

    @gluon.jit
    def _scan_kernel(q8_ptr, w8_ptr, mode_ptr, pos_ptr, rows_ptr, table_ptr, out_ptr,
                     q8_stride_s, table_stride_s, page_stride, out_stride_s, n_blk, n_cols, pages_per_prog, S,
                     len_ptr, row_stride: gl.constexpr, HP: gl.constexpr, SENTINEL_KEY: gl.constexpr,
                     MODE: gl.constexpr, BLOCK_S: gl.constexpr, SENTINELS: gl.constexpr):
        """The registers loader: each thread loads its own words, the next step's before this
        step's dots."""
        ROWS: gl.constexpr = _ROWS
        row_l: gl.constexpr = gl.SliceLayout(1, _acc_layout(HP))
        let_next_grid_start()  # the general scan may be scheduled from here on (grid_dependency)
        s, page_lo, page_hi, n_vis, vis_hi, first = _span(pos_ptr, mode_ptr, S, n_cols, n_blk, pages_per_prog, MODE,
                                                          BLOCK_S, SENTINELS, False)
        out_row = out_ptr + s.to(gl.int64) * out_stride_s
        if gl.load(mode_ptr + s) == MODE:  # else the general scan scores this query
            q_smem = _query_smem(HP)
            _store_query(q_smem, q8_ptr, s, q8_stride_s)
            fence_async_shared()
            w8 = _head_weights(w8_ptr, s, HP)
            table_row = table_ptr + s.to(gl.int64) * table_stride_s
            rows = gl.arange(0, ROWS, layout=row_l)
            scales, blocks = _step_loads(rows_ptr, table_row, page_lo, vis_hi, n_blk, page_stride, row_stride, ROWS,
                                         row_l, _WORD_L)
            for page in range(page_lo, vis_hi, 2):
                next_scales, next_blocks = _step_loads(rows_ptr, table_row, page + 2, vis_hi, n_blk, page_stride,
                                                       row_stride, ROWS, row_l, _WORD_L)
                col = page * 64 + rows
                gl.store(out_row + col, _step_keys(blocks, scales, q_smem, w8, col, n_vis, SENTINEL_KEY),
                         mask=col < vis_hi * 64)
                scales, blocks = next_scales, next_blocks
        _finish(out_row, len_ptr, s, first, page_lo, vis_hi, page_hi, n_vis, n_blk, n_cols, SENTINEL_KEY, SENTINELS)

    # -- the bulk-copy loaders: a ring slot holds a step's two pages at words 0 and PAGE_SLOT, each
    #    as it lies in memory (17 words a row) -------------------------------------------------------

    @gluon.jit
    def _page_ids(table_row, step, page_lo, vis_hi, n_blk):
        """The pool pages of step `step`'s two table columns (page 0 for columns past vis_hi: their
        rows are read but never stored)."""
        pg = page_lo + 2 * step
        a = gl.load(table_row + gl.minimum(pg, n_blk - 1), mask=pg < vis_hi, other=0)
        b = gl.load(table_row + gl.minimum(pg + 1, n_blk - 1), mask=pg + 1 < vis_hi, other=0)
        return a, b

    @gluon.jit
    def _issue_step(head_desc, tail_desc, ring, bars, step, ids, STAGES: gl.constexpr):
        """Start the bulk copies of one step's two pages into its ring slot: each page as 1,024 words
        and 64 (a TMA box is at most 256 elements a side, a power of two each, and a page is 17 x 64
        words), one barrier completing when all 8,704 bytes have landed."""
        tma_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
        slot = step % STAGES
        bar = bars.index(slot)
        buf = ring.index(slot)
        mbarrier.expect(bar, 2 * _PAGE_WORDS * 4)
        for p in gl.static_range(2):
            tma_load(head_desc, [ids[p], 0, 0], bar,
                     reinterpret(buf.slice(p * _PAGE_SLOT, 1024), gl.int32, [1, 16, 64], tma_l))
            tma_load(tail_desc, [ids[p], 16, 0], bar,
                     reinterpret(buf.slice(p * _PAGE_SLOT + 1024, 64), gl.int32, [1, 1, 64], tma_l))

    # one page's words [64, 4] as the [row, word, byte] view _dot_operand takes (_RAW3_L without the
    # register bit that picks a step's second page: a page is one 64-row dot of the warp group)
    _PAGE_RAW3_L = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [8, 0, 0]],
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[64, 4, 4]))
    _PAGE_WORD_L = gl.constexpr(gl.SliceLayout(2, _PAGE_RAW3_L.value))

    @gluon.jit
    def _page_words(page, HP: gl.constexpr):
        """A ring slot's page (17 words a row, as it lies in memory) -> its rows' scale words [64]
        (the accumulator's row layout) and each block's code words [64, 4] (_PAGE_WORD_L), read
        through padded layouts that skip each row's other words: row r at 17 r, its scale at + 16."""
        codes_l: gl.constexpr = gl.PaddedSharedLayout.with_identity_for([[16, 1]], [64, 16], [1, 0])
        scales_l: gl.constexpr = gl.PaddedSharedLayout.with_identity_for([[1, 16]], [64], [0])
        scales = reinterpret(page.slice(16, 16), gl.int32, [64], scales_l).load(gl.SliceLayout(1, _acc_layout(HP)))
        codes = reinterpret(page, gl.int32, [64, 16], codes_l)
        blocks = ()
        for b in gl.static_range(_DI // 32):
            blocks = blocks + (codes.slice(4 * b, 4, dim=1).load(_PAGE_WORD_L),)
        return scales, blocks

    @gluon.jit
    def _page_words_global(rows_ptr, page_id, page_stride, HP: gl.constexpr):
        """_page_words of a page read from global memory (the pool's page page_id) instead of a ring slot."""
        base = (rows_ptr + page_id.to(gl.int64) * page_stride).to(gl.pointer_type(gl.int32))
        r = gl.arange(0, 64, layout=gl.SliceLayout(1, _acc_layout(HP)))
        scales = gl.load(base + r * (_PAGE_WORDS // 64) + 16)
        rw = gl.arange(0, 64, layout=gl.SliceLayout(1, _PAGE_WORD_L))[:, None] * (_PAGE_WORDS // 64)
        cw = gl.arange(0, 4, layout=gl.SliceLayout(0, _PAGE_WORD_L))[None, :]
        blocks = ()
        for b in gl.static_range(_DI // 32):
            blocks = blocks + (gl.load(base + rw + 4 * b + cw),)
        return scales, blocks

    @gluon.jit
    def _issue_dot(words, q_smem, b: gl.constexpr, zero):
        """Start block b's dot of a page's rows (a fresh accumulator) on the tensor cores; the result
        is waited for with warpgroup_mma_wait."""
        HP: gl.constexpr = zero.shape[1]
        a = _dot_operand(words, 64, _operand_layout(HP), _PAGE_RAW3_L)
        return warpgroup_mma(a, q_smem.index(b).permute((1, 0)), zero, use_acc=False, is_async=True)

    @gluon.jit
    def _scale_ratio(scales, b: gl.constexpr):
        """Block b's scale over block 0's, 2**(e_b - e_0), as float32 (in range: the guard's rows)."""
        return ((((scales >> (8 * b)) & 0xFF) - (scales & 0xFF) + 127) << 23).to(gl.float32, bitcast=True)

    @gluon.jit
    def _outside_guard(scales):
        """Nonzero where a row's four block codes (its scale word) are not all in [112, 143]: a byte
        below 112 borrows and sets its bit 7, one above 143 keeps a bit of 5-7 (the lowest byte out
        of range is always caught, as no borrow reaches it)."""
        return (scales - 0x70707070) & -522133280  # 0xE0E0E0E0

    @gluon.jit
    def _weights_outside_guard(w8):
        """Per row [64] (the accumulator's row layout): 1 where a nonzero head weight held by the
        row's quad of lanes has its exponent outside [-40, 58] (a subnormal, inf or NaN too), else 0.
        Every row's quad holds all the heads, so each row sees them all, and no value crosses warps."""
        bits = w8.to(gl.int32, bitcast=True)
        e = (bits >> 23) & 0xFF
        out = (((bits & 0x7FFFFFFF) != 0) & ((e < 127 - 40) | (e > 127 + 58))).to(gl.int32)
        return gl.max(out[None, :] + gl.zeros([64, w8.shape[0]], gl.int32, _acc_layout(w8.shape[0])), axis=1)

    @gluon.jit
    def _store_slot_keys(pages, q_smem, w8, out_row, col0, n_vis, vis_hi, SENTINEL_KEY: gl.constexpr,
                         FACTORED: gl.constexpr):
        """The keys of consecutive pages (their words: one or two pages of a step), stored at columns
        col0 + [0, 64 x pages). The same sums as _step_keys, page by page, with each dot started
        before the previous one's scale and add: the tensor cores work under the float32 math
        instead of the warps waiting on them. A page is 64 rows, so two dots in flight and the sum
        take 96 registers a thread."""
        HP: gl.constexpr = w8.shape[0]
        NB: gl.constexpr = _DI // 32
        NP: gl.constexpr = len(pages)
        zero = gl.zeros([64, HP], gl.float32, _acc_layout(HP))
        pending = _issue_dot(pages[0][1][0], q_smem, 0, zero)
        acc = zero
        for i in gl.static_range(NP * NB):  # (page, block) = divmod(i, NB)
            if i + 1 < NP * NB:
                started = _issue_dot(pages[(i + 1) // NB][1][(i + 1) % NB], q_smem, (i + 1) % NB, zero)
                d = warpgroup_mma_wait(1, deps=[pending])
                pending = started
            else:
                d = warpgroup_mma_wait(0, deps=[pending])
            if FACTORED:
                if i % NB == 0:
                    acc = d
                else:
                    acc = acc + d * _scale_ratio(pages[i // NB][0], i % NB)[:, None]
            else:
                if i % NB == 0:
                    acc = zero
                acc = acc + d * _block_scale(pages[i // NB][0], i % NB)[:, None]
            if i % NB == NB - 1:  # a page's sums are complete
                part = _head_partials(acc, w8)
                if FACTORED:
                    s0 = _block_scale(pages[i // NB][0], 0)
                    part = part * gl.convert_layout(s0, gl.SliceLayout(1, part.type.layout))[:, None]
                if NP == 1:
                    _store_page_keys(part, out_row, col0, n_vis, vis_hi, SENTINEL_KEY)
                elif i // NB == 0:
                    first_page = part  # two registers a thread, until the second page's
                else:
                    _store_step_keys(first_page, part, out_row, col0, n_vis, vis_hi, SENTINEL_KEY)

    # The head sum of a page's rows, and who finishes it. In the accumulator a row's 64 heads lie with
    # the four lanes of a quad (lane q holds the columns 8j + 2q + e), and gl.sum over the heads ends
    # with every lane of the quad holding the row's score: each thread then made the keys of both its
    # rows, four times over in a quad (about 20 instructions a row). Here each lane first sums its own
    # heads (the same float32 chain, in column order: _head_partials), then the quad's partial sums of
    # a row are added as gl.sum's butterfly adds them, lanes q and q ^ 2 first, (p0 + p2) + (p1 + p3),
    # but each add in the lane that keeps the row: the same sums, so the same bits, and one key a
    # thread a step instead of four (sm_90a, with _block_scale's integer max: 634 instructions a step
    # against 706; H100, 1M x 32: 8-10% less time, kernels/RESULTS.md, twelfth session). The
    # two-page scorer swaps the halves by explicit shuffles: the same exchange written as one
    # gl.convert_layout compiled to a shared store and an ldmatrix a warp, and its keys were not the
    # Triton scan's on the H100.
    @gluon.jit
    def _head_partials(acc, w8):
        """A page's ReLU'd, weighted heads [64, HP] summed by each lane over its own columns, in
        column order -> [64 rows, 4 lanes of the quad] (column 8j + 2q + e -> lane q)."""
        HP: gl.constexpr = acc.shape[1]
        y = w8[None, :] * gl.maximum(acc, 0.0)
        return gl.sum(y.reshape(64, HP // 8, 4, 2).permute(0, 2, 1, 3).reshape(64, 4, HP // 4), axis=2)

    # a page's partials [64 rows, 2 (q // 2), 2 (q % 2)] with q // 2 moved into a register and the
    # row's bit 3 (a thread's second row) into that lane bit: a row's score ends in the two lanes q, q ^ 1
    _PAGE_SUM_L = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 1, 0]],
        lane_bases=[[0, 0, 1], [8, 0, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[64, 2, 2]))

    @gluon.jit
    def _store_page_keys(partials, out_row, col0, n_vis, vis_hi, SENTINEL_KEY: gl.constexpr):
        """One page's keys (the page-by-page scorer), from _head_partials, at columns col0 + [0, 64)."""
        p = gl.convert_layout(partials.reshape(64, 2, 2), _PAGE_SUM_L)
        score = gl.sum(gl.sum(p, axis=1), axis=1)  # p_q + p_(q^2), then across lanes q, q ^ 1
        col = col0 + gl.arange(0, 64, layout=gl.SliceLayout(1, gl.SliceLayout(1, _PAGE_SUM_L)))
        gl.store(out_row + col, _key_bits(score, col, n_vis, SENTINEL_KEY), mask=col < vis_hi * 64)

    @gluon.jit
    def _from_lane_xor(x, ASM: gl.constexpr):
        """x as the lane (this one's id xor a constant) holds it: a warp shuffle (_LANE_XOR1 / 2)."""
        return gl.inline_asm_elementwise(ASM, "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1)

    @gluon.jit
    def _store_step_keys(first, second, out_row, col0, n_vis, vis_hi, SENTINEL_KEY: gl.constexpr):
        """A step's keys from its two pages' _head_partials [64, 4], at columns col0 + [0, 128): in
        two rounds of shuffles the quad's lanes q < 2 finish the first page, the others the second,
        and the even lanes of those a thread's first row (r), the odd ones its second (r + 8), so each
        thread makes one key. In _head_partials' layout lane q holds partial q of rows r and r + 8
        (the shuffles depend on it; the GPU test compares the keys with the Triton scan's)."""
        q = gl.arange(0, 4, layout=gl.SliceLayout(0, first.type.layout))[None, :]
        # lanes q and q ^ 2: p_q + p_(q^2) of both rows of the page lane q finishes
        on_second = q >= 2
        sums = gl.where(on_second, second, first) + _from_lane_xor(gl.where(on_second, first, second), _LANE_XOR2)
        # lanes q and q ^ 1: (p_q + p_(q^2)) + (p_(q^1) + p_(q^3)), of the row lane q finishes
        r, r8 = gl.split(sums.reshape(4, 2, 8, 4).permute(0, 2, 3, 1))  # [row // 16, row % 8, q] each
        q = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, r.type.layout)))[None, None, :]
        odd = q % 2 == 1
        score = gl.where(odd, r8, r) + _from_lane_xor(gl.where(odd, r, r8), _LANE_XOR1)
        key_l: gl.constexpr = r.type.layout
        row = (16 * gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, key_l)))[:, None, None]
               + gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, key_l)))[None, :, None] + 8 * (q % 2))
        col = col0 + 64 * (q // 2) + row
        gl.store(out_row + col, _key_bits(score, col, n_vis, SENTINEL_KEY), mask=col < vis_hi * 64)

    @gluon.jit
    def _barriers(STAGES: gl.constexpr):
        """One barrier per ring slot, initialised (one arrival completes a phase)."""
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        return bars

    @gluon.jit
    def _ring(STAGES: gl.constexpr):
        """STAGES ring slots of two pages and the barrier each completes when its copies land."""
        ring = gl.allocate_shared_memory(gl.int32, [STAGES, 2 * _PAGE_SLOT], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        return ring, _barriers(STAGES)

    @gluon.jit
    def _load_pages(head_desc, tail_desc, ring, ready, empty, table_row, page_lo, n_steps, vis_hi, n_blk,
                    STAGES: gl.constexpr):
        """The loader warp: each step's two pages into the ring, up to STAGES steps ahead of the
        scorer, a slot refilled once the scorer has handed it back."""
        ids = _page_ids(table_row, 0, page_lo, vis_hi, n_blk)
        for it in range(n_steps):
            # the next step's page ids are read a step ahead, so no copy waits for a table read
            next_ids = _page_ids(table_row, it + 1, page_lo, vis_hi, n_blk)
            mbarrier.wait(empty.index(it % STAGES), ((it // STAGES) & 1) ^ 1)
            # the scorer's reads of the slot (generic proxy) must be done before this copy (async
            # proxy) writes it: the arrive and this wait order them for threads, not for the copy
            # engine, so a proxy fence sits on the path between them. Here (as deepseek-ai/DeepEP
            # #642 places it) it is one warp's, once a step; before the scorer's hand-back (where
            # CUTLASS kernels put it) it was four warps' and also waited for their key stores:
            # 128K x 32 0.0400 -> 0.0378 ms on an H100. With no fence an H100 scored a few rows of
            # a page from the next copy's words where other programs on the SM loaded shared
            # memory heavily; with the fence there, none in 3,456 calls, here none in 20,600
            # (kernels/RESULTS.md, twenty-third and twenty-fourth sessions)
            fence_async_shared()
            _issue_step(head_desc, tail_desc, ring, ready, it, ids, STAGES)
            ids = next_ids

    @gluon.jit
    def _score_step(ring, ready, empty, it, q_smem, w8, out_row, page_lo, n_vis, vis_hi, outside, seen,
                    SENTINEL_KEY: gl.constexpr, STAGES: gl.constexpr, SCORED_PAGES: gl.constexpr,
                    FACTORED: gl.constexpr, MASKED: gl.constexpr):
        """Step `it` of the scoring warp group: a full slot's words into registers, the slot handed
        back at once, and the step's keys; or (SCORED_PAGES 1) the first page's words and keys, then
        the second page's words, the hand-back and its keys, so half the words and sums are live at
        a time. FACTORED: the rows' guard misses into `outside`, those of rows from `seen` on left
        out where MASKED (a query's last step)."""
        HP: gl.constexpr = w8.shape[0]
        slot = it % STAGES
        mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
        buf = ring.index(slot)
        col0 = (page_lo + 2 * it) * 64
        first = _page_words(buf.slice(0, _PAGE_SLOT), HP)
        if SCORED_PAGES == 1:
            _store_slot_keys((first,), q_smem, w8, out_row, col0, n_vis, vis_hi, SENTINEL_KEY, FACTORED)
        last = _page_words(buf.slice(_PAGE_SLOT, _PAGE_SLOT), HP)
        # handed back with no fence here: the loader fences before its next copy (_load_pages)
        mbarrier.arrive(empty.index(slot), count=1)
        if FACTORED:
            if MASKED:  # rows past the query's entries may hold any bytes
                row = gl.arange(0, 64, layout=outside.type.layout)
                unseen = seen - col0  # the step's first row not to check
                outside = (outside | gl.where(row < unseen, _outside_guard(first[0]), 0)
                           | gl.where(row + 64 < unseen, _outside_guard(last[0]), 0))
            else:
                outside = outside | _outside_guard(first[0]) | _outside_guard(last[0])
        if SCORED_PAGES == 1:
            _store_slot_keys((last,), q_smem, w8, out_row, col0 + 64, n_vis, vis_hi, SENTINEL_KEY, FACTORED)
        else:
            _store_slot_keys((first, last), q_smem, w8, out_row, col0, n_vis, vis_hi, SENTINEL_KEY, FACTORED)
        return outside

    @gluon.jit
    def _score_pages(ring, ready, empty, q_smem, q8_ptr, q8_stride_s, w8_ptr, out_row, s, page_lo, n_steps, n_vis,
                     vis_hi, rows_ptr, table_row, page_stride, HP: gl.constexpr, SENTINEL_KEY: gl.constexpr,
                     STAGES: gl.constexpr, SCORED_PAGES: gl.constexpr, FACTORED: gl.constexpr):
        """The scoring warp group: the query into shared memory (while the loader warp's first copies
        fly), then the steps (_score_step). A program of FACTORED steps or more (0: none) takes the
        factored sums: the guard's misses (module docstring) of the weights and of every visible row
        are gathered, the last step's apart, and a program with any scores its pages again."""
        if n_steps > 0:
            _store_query(q_smem, q8_ptr, s, q8_stride_s)
            fence_async_shared()  # the stores, before the dots read them through the async proxy
            cta_barrier()  # every warp's part of the query, before any warp's dot
        w8 = _head_weights(w8_ptr, s, HP)
        # the factored path's guard misses and its rows to check; set before the branch, which gives the
        # PTX the GPU runs measured (inside it, the compiler reorders the program's setup)
        outside = gl.zeros([64], gl.int32, gl.SliceLayout(1, _acc_layout(HP)))
        seen = gl.minimum(n_vis, vis_hi * 64)  # columns from here on are never stored
        # the guard's end (the weights, a reduction across warps, a branch) costs a program about
        # 0.3 us, so a program of fewer steps than FACTORED_STEPS scores them as before (H100: one
        # step 5.6 -> 6.0 us a call at 128K x 1, kernels/RESULTS.md)
        if FACTORED > 0 and n_steps >= FACTORED:
            for it in range(n_steps - 1):
                outside = _score_step(ring, ready, empty, it, q_smem, w8, out_row, page_lo, n_vis, vis_hi, outside,
                                      seen, SENTINEL_KEY, STAGES, SCORED_PAGES, True, False)
            outside = _score_step(ring, ready, empty, n_steps - 1, q_smem, w8, out_row, page_lo, n_vis, vis_hi,
                                  outside, seen, SENTINEL_KEY, STAGES, SCORED_PAGES, True, True)
            # the weights' misses last: checked first, they made the first step wait for w8's load
            # (0.5 us a call on an H100 at 128K x 1 and 8K x 32, kernels/RESULTS.md)
            outside = outside | _weights_outside_guard(w8)
            if gl.max((outside != 0).to(gl.int32), axis=0) > 0:
                # a row or weight the guard does not cover: every page of the program scored again,
                # as the page-by-page scorer scores, from global memory. The barrier orders the first
                # pass's key stores before the second's to the same columns
                cta_barrier()
                for page in range(page_lo, vis_hi):
                    words = _page_words_global(rows_ptr, gl.load(table_row + page), page_stride, HP)
                    _store_slot_keys((words,), q_smem, w8, out_row, page * 64, n_vis, vis_hi, SENTINEL_KEY, False)
        else:
            for it in range(n_steps):  # no guard: its `outside` and `seen` are not used
                _score_step(ring, ready, empty, it, q_smem, w8, out_row, page_lo, n_vis, vis_hi, 0, 0, SENTINEL_KEY,
                            STAGES, SCORED_PAGES, False, False)

    # -- the general scan's queries (GENERAL): indexer_topk._scan_kernel's sums, bit for bit ----------

    @gluon.jit
    def _e2m1_value(code):
        """E2M1 codes (int32, 0-15) -> their float32 values, exactly (code 8 is -0.0)."""
        mag = code & 7
        bits = gl.where(mag >= 2, (((mag >> 1) + 126) << 23) | ((mag & 1) << 22), gl.where(mag == 1, 126 << 23, 0))
        return (bits | ((code & 8) << 28)).to(gl.float32, bitcast=True)

    @gluon.jit
    def _general_bytes(rows_ptr, table_row, page, vis_hi, page_stride):
        """A page's code bytes [64, Di/2] and each byte's block scale code [64, Di/2] (int32), not
        read past vis_hi (_general_operand's input; loaded a page ahead)."""
        c_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [_WARPS, 1], [1, 0])
        r = gl.arange(0, 64, layout=gl.SliceLayout(1, c_l))[:, None]
        j = gl.arange(0, _DI // 2, layout=gl.SliceLayout(0, c_l))[None, :]
        valid = page < vis_hi
        page_id = gl.load(table_row + page, mask=valid, other=0)
        row = rows_ptr + page_id.to(gl.int64) * page_stride + r * _ROW_BYTES
        ok = (r < 64 * valid.to(gl.int32)) & (j >= 0)
        codes = gl.load(row + j, mask=ok, other=0).to(gl.int32)
        e = gl.load(row + _DI // 2 + j // 16, mask=ok, other=127).to(gl.int32)  # the byte's block (16 bytes a block)
        return codes, e

    @gluon.jit
    def _general_operand(codes, e, a_l: gl.constexpr):
        """A page's keys as tl.dot_scaled's decomposition on Hopper makes them, [64, Di] BF16 in a_l:
        each E2M1 value times its block's UE8M0 scale taken as the BF16 with that exponent field
        (code 0 gives 0, not 2**-127 as kv_layout decodes it), NaN where the code is 255 (sm_90a PTX
        of the general scan, Triton 3.6: a table per nibble, then mul.bf16 and a select). Here the
        product is taken in float32 and rounded once to BF16: both are correctly rounded, so equal."""
        scale = (e << 23).to(gl.float32, bitcast=True)  # 2**(e - 127); 0 for code 0
        lo = gl.where(e == 255, float("nan"), _e2m1_value(codes & 15) * scale)
        hi = gl.where(e == 255, float("nan"), _e2m1_value(codes >> 4) * scale)
        # element 2j is byte j's low nibble, 2j + 1 its high one
        a = gl.join(lo, hi).reshape(64, _DI).to(gl.bfloat16)
        return gl.convert_layout(a, a_l)

    @gluon.jit
    def _score_general(parts_ptr, w_ptr, parts_stride_s, inv_sqrt_di, rows_ptr, table_row, page_stride, out_row, s,
                       page_lo, vis_hi, n_vis, HP: gl.constexpr, SENTINEL_KEY: gl.constexpr):
        """Query s's keys of pages [page_lo, vis_hi), page by page from global memory, as the general
        scan makes them (indexer_topk._scan_kernel, _page_keys and _keys_of): the three BF16 parts'
        dots chained on one accumulator, the first with none (the same 24 wgmma m64nHPk16 in the same
        order), then the ReLU'd heads times Di**-0.5, weighted and summed in the accumulator's layout.
        Slower than that scan (one program's pages in turn, and the keys' conversion through shared
        memory); its queries are none of the model's, and this saves the launch that scored them."""
        acc_l: gl.constexpr = _acc_layout(HP, 16)
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        parts = gl.allocate_shared_memory(gl.bfloat16, [3, HP, _DI],
                                          gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
        p_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [_WARPS, 1], [1, 0])
        h = gl.arange(0, HP, layout=gl.SliceLayout(1, p_l))[:, None]
        d = gl.arange(0, _DI, layout=gl.SliceLayout(0, p_l))[None, :]
        src = parts_ptr + s.to(gl.int64) * parts_stride_s + h * _DI + d
        for p in gl.static_range(3):
            parts.index(p).store(gl.load(src + p * HP * _DI))
        fence_async_shared()  # the stores, before the dots read them through the async proxy
        cta_barrier()
        w = gl.load(w_ptr + s * HP + gl.arange(0, HP, layout=gl.SliceLayout(0, acc_l)))
        zero = gl.zeros([64, HP], gl.float32, acc_l)
        rows = gl.arange(0, 64, layout=gl.SliceLayout(1, acc_l))
        codes, e = _general_bytes(rows_ptr, table_row, page_lo, vis_hi, page_stride)
        for page in range(page_lo, vis_hi):
            # the next page's bytes are requested before this page is scored, as the general scan does
            next_codes, next_e = _general_bytes(rows_ptr, table_row, page + 1, vis_hi, page_stride)
            a = _general_operand(codes, e, a_l)
            acc = warpgroup_mma(a, parts.index(0).permute((1, 0)), zero, use_acc=False)
            acc = warpgroup_mma(a, parts.index(1).permute((1, 0)), acc)
            acc = warpgroup_mma(a, parts.index(2).permute((1, 0)), acc)
            col = page * 64 + rows
            score = gl.sum(w[None, :] * (gl.maximum(acc, 0.0) * inv_sqrt_di), axis=1)
            gl.store(out_row + col, _key_bits(score, col, n_vis, SENTINEL_KEY))
            codes, e = next_codes, next_e

    @gluon.jit
    def _scan_kernel_ws(q8_ptr, w8_ptr, mode_ptr, pos_ptr, head_desc, tail_desc, rows_ptr, table_ptr, out_ptr,
                        q8_stride_s, table_stride_s, page_stride, out_stride_s, n_blk, n_cols, pages_per_prog, S,
                        len_ptr, parts_ptr, w_pad_ptr, parts_stride_s, inv_sqrt_di, HP: gl.constexpr,
                        SENTINEL_KEY: gl.constexpr, MODE: gl.constexpr, STAGES: gl.constexpr,
                        SCORED_PAGES: gl.constexpr, DEPENDENT: gl.constexpr, BLOCK_S: gl.constexpr,
                        SENTINELS: gl.constexpr, FACTORED: gl.constexpr, GENERAL: gl.constexpr):
        """The "bulk_ws" loader: one loader warp beside the scoring warp group. GENERAL: the queries
        of the general scan are scored here too, after the warp groups meet (_score_general)."""
        q_smem = _query_smem(HP)  # filled by the scorer, while the loader warp starts the first copies
        ring, ready = _ring(STAGES)
        empty = _barriers(STAGES)  # the scorer's hand-backs
        fence_async_shared()
        wait_for_previous_grid_gluon(DEPENDENT)  # before the first global read
        # only now may the general scan be scheduled, so it never runs beside the kernel before this
        # one (grid_dependency)
        let_next_grid_start()
        s, page_lo, page_hi, n_vis, vis_hi, first = _span(pos_ptr, mode_ptr, S, n_cols, n_blk, pages_per_prog, MODE,
                                                          BLOCK_S, SENTINELS, GENERAL)
        out_row = out_ptr + s.to(gl.int64) * out_stride_s
        # queries of the general scan score no step of the ring (GENERAL: they are scored below)
        ours = gl.load(mode_ptr + s) == MODE
        n_steps = gl.where(ours, gl.cdiv(gl.maximum(vis_hi - page_lo, 0), 2), 0)
        table_row = table_ptr + s.to(gl.int64) * table_stride_s
        gl.warp_specialize([
            (_score_pages, (ring, ready, empty, q_smem, q8_ptr, q8_stride_s, w8_ptr, out_row, s, page_lo, n_steps,
                            n_vis, vis_hi, rows_ptr, table_row, page_stride, HP, SENTINEL_KEY, STAGES, SCORED_PAGES,
                            FACTORED)),
            (_load_pages, (head_desc, tail_desc, ring, ready, empty, table_row, page_lo, n_steps, vis_hi, n_blk,
                           STAGES)),
        ], [1], [LOADER_REGS])
        if GENERAL:
            if not ours:
                _score_general(parts_ptr, w_pad_ptr, parts_stride_s, inv_sqrt_di, rows_ptr, table_row, page_stride,
                               out_row, s, page_lo, vis_hi, n_vis, HP, SENTINEL_KEY)
        _finish(out_row, len_ptr, s, first, page_lo, vis_hi, page_hi, n_vis, n_blk, n_cols, SENTINEL_KEY, SENTINELS)


@functools.cache
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def usable(q8: torch.Tensor, index_rows: torch.Tensor) -> bool:
    """Whether this kernel runs the FP8 scan: a Hopper GPU with Gluon (gluon_api.enabled), Di = 128,
    and rows whose scale bytes can be read as 32-bit words (kv_layout.index_scales_as_words)."""
    return (q8.is_cuda and _is_hopper(q8.device) and gluon_api.enabled() and q8.shape[1] * 32 == DI
            and index_scales_as_words(index_rows, DI))


LOADERS = ("registers", "bulk_ws")
# how a program's pages reach it (module docstring); bulk_ws where the pool allows it (H100, 1M x 32:
# 0.287 ms against the registers loader's 0.356, kernels/RESULTS.md)
LOADER = "bulk_ws"


def bulk_copy_usable(index_rows: torch.Tensor) -> bool:
    """Whether the bulk-copy engine can read these indexer pages (uint8 [P, 64, 68]) as [17, 64]
    words: a page's rows back to back, the base and every page on 16-byte boundaries."""
    return (index_rows.stride(2) == 1 and index_rows.stride(1) == index_rows.shape[2] == 4 * ROW_WORDS
            and index_rows.data_ptr() % 16 == 0 and index_rows.stride(0) % 16 == 0)


def loader_for(index_rows: torch.Tensor) -> str:
    """The loader that reads these pages: LOADER, except that bulk_ws takes the registers loader
    where the pool's pages do not suit the copy engine (bulk_copy_usable) or this Triton refuses
    the padded view its scorer reads a ring slot through (gluon_api.PADDED_VIEWS: 3.9 does)."""
    if LOADER == "bulk_ws" and bulk_copy_usable(index_rows) and gluon_api.PADDED_VIEWS:
        return "bulk_ws"
    return "registers"


def bulk_launch_options() -> dict:
    """The bulk_ws kernel's compile options: 2 x WARPS warps (the scoring group and the loader
    warp's group) of as many registers as lets PROGRAMS_PER_SM programs share an SM's 64K;
    setmaxnreg then gives the loader 24 and the scoring group the rest (232 at two an SM)."""
    return dict(num_warps=WARPS, maxnreg=65536 // (PROGRAMS_PER_SM * 2 * WARPS * 32) // 8 * 8)


def factored_from() -> int:
    """The bulk_ws kernel's FACTORED: the fewest steps a program takes the factored sums for
    (FACTORED_STEPS), or 0 where FIRST_SCALE_OUT is off."""
    if not (isinstance(FACTORED_STEPS, int) and FACTORED_STEPS >= 1):
        raise ValueError(f"FACTORED_STEPS must be an int >= 1 (FIRST_SCALE_OUT turns the factored sums off), "
                         f"got {FACTORED_STEPS!r}")
    return FACTORED_STEPS if FIRST_SCALE_OUT else 0


def _page_descriptors(index_rows: torch.Tensor):
    """Bulk-copy descriptors of the pages as [P, 17, 64] 32-bit words: words 0-1023 of a page (16
    x 64) and its last 64 (a box side is at most 256 elements)."""
    shape, strides = [index_rows.shape[0], PAGE_WORDS // 64, 64], [index_rows.stride(0) // 4, 64, 1]
    words = torch.empty(0, dtype=torch.int32, device=index_rows.device).set_(
        index_rows.untyped_storage(), index_rows.storage_offset() // 4, shape, strides)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
    return (TensorDescriptor(words, shape, strides, [1, 16, 64], layout),
            TensorDescriptor(words, shape, strides, [1, 1, 64], layout))


def _check_general(parts: torch.Tensor, w_pad: torch.Tensor, w8: torch.Tensor) -> None:
    """The general operands as _score_general reads them: BF16 parts [S, 3, hp, Di] whose parts and
    heads lie back to back (a query's own stride is free), float32 head weights [S, hp] contiguous."""
    S, hp = w8.shape
    back_to_back = parts.dim() == 4 and parts.stride()[1:] == (hp * DI, DI, 1)
    if (parts.dtype != torch.bfloat16 or tuple(parts.shape) != (S, 3, hp, DI) or not back_to_back
            or w_pad.dtype != torch.float32 or w_pad.shape != w8.shape or not w_pad.is_contiguous()):
        raise ValueError(f"the general operands must be BF16 parts [{S}, 3, {hp}, {DI}] (parts and heads back to "
                         f"back) and float32 head weights [{S}, {hp}] (contiguous), got {parts.dtype} "
                         f"{list(parts.shape)} and {w_pad.dtype} {list(w_pad.shape)}")


def scan_fp8(q8, w8, mode, positions, index_rows, table, out, n_cols: int, pages_per_prog: int, sentinel: int,
             fp8_mode: int, lengths: torch.Tensor | None = None, general: tuple | None = None) -> bool:
    """Write the FP8 scan's keys into out [S, n_cols] for the queries whose mode is fp8_mode, and the
    sentinel of every invisible page, or (`lengths` [S] int32 given) each row's count of the
    columns the scans write instead (indexer_topk.index_score_keys checks the operands; the pages
    are split over programs by the plan, or pages_per_prog a program: scan_plan.launch_split).
    `general` (BF16 parts [S, 3, hp, Di], padded head weights [S, hp], Di**-0.5): the other
    queries' operands, which the bulk_ws kernel scores too where GENERAL_HERE is on, with the
    general scan's keys. Returns whether it did (else the general scan must run)."""
    if LOADER not in LOADERS:
        raise ValueError(f"LOADER must be one of {LOADERS}, got {LOADER!r}")
    if SCORED_PAGES not in (1, 2):
        raise ValueError(f"SCORED_PAGES must be 1 or 2 (pages of a step), got {SCORED_PAGES!r}")
    factored = factored_from()
    S = q8.shape[0]
    sentinels = lengths is None
    grid, ppp, block_s = scan_plan.launch_split(S, n_cols, table.shape[1], 2, sentinels, q8.device, PROGRAMS_PER_SM,
                                                pages_per_prog + pages_per_prog % 2)  # whole steps of two pages
    table_stride = table.stride(0) if table.shape[0] > 1 else 0
    len_arg = out if sentinels else lengths  # not written with the sentinels
    if loader_for(index_rows) == "bulk_ws":
        # launched as a dependent of whatever kernel comes before it: its programs set up their shared
        # memory while that kernel ends, and wait for it before their first global read (grid_dependency)
        dependent = grid_dependency.enabled(q8)
        here = GENERAL_HERE and general is not None
        parts, w_pad, inv_sqrt_di = general if here else (q8, w8, 1.0)  # not read unless GENERAL
        if here:
            _check_general(parts, w_pad, w8)
        _scan_kernel_ws[grid](q8, w8, mode, positions, *_page_descriptors(index_rows), index_rows, table, out,
                              q8.stride(0), table_stride, index_rows.stride(0), out.stride(0), table.shape[1], n_cols,
                              ppp, S, len_arg, parts, w_pad, parts.stride(0), inv_sqrt_di, HP=w8.shape[1],
                              SENTINEL_KEY=sentinel, MODE=fp8_mode, STAGES=STAGES, SCORED_PAGES=SCORED_PAGES,
                              DEPENDENT=dependent, BLOCK_S=block_s, SENTINELS=sentinels, FACTORED=factored,
                              GENERAL=here, **bulk_launch_options(), **grid_dependency.launch_kwargs(dependent))
        return here
    _scan_kernel[grid](
        q8, w8, mode, positions, index_rows, table, out, q8.stride(0), table_stride,
        index_rows.stride(0), out.stride(0), table.shape[1], n_cols, ppp, S, len_arg, row_stride=index_rows.stride(1),
        HP=w8.shape[1], SENTINEL_KEY=sentinel, MODE=fp8_mode, BLOCK_S=block_s, SENTINELS=sentinels, num_warps=WARPS)
    return False
