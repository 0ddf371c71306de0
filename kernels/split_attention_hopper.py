"""The split programs of HCA and CSA decode attention for Hopper GPUs, in Gluon (Triton's
layout-explicit dialect).

The same attention as sparse_decode's `_split_attention`: for HCA the window plus every visible
entry, for CSA (SELECTED) the window plus the query's top-k picks, each slot past the window read
through its pick (`_entries`: -1, or an index past the pool's entries, is no key, as the Triton
kernel reads them); one online softmax per split, partials merged with the sink by
`_merge_splits`. The work is laid out for the tensor cores instead of as the Triton compiler chose
(255 registers, 214 KB of shared memory, spills, 218 warp instructions per key):

* a program is 8 warps (two warp groups) holding all 64 heads. The query [64, 512] sits in shared
  memory once; each 64-key tile of FP8 + BF16 rows is decoded to BF16 into one of two shared
  [64, 512] tiles, which both products read: scores S = Q K^T (each warp group forms 32 keys'
  columns) and O += P K (each warp group owns 256 of the 512 output dims: 128 float32 registers a
  thread, which never leave the registers until the end);
* the next tile is decoded into the other shared tile while this tile's output product runs
  (async wgmma; under the scores instead it was 1-2% slower), and the tile after it is loaded, as
  32-bit words, right after: each load has most of a step to land. The pages of the tile after
  that are read in the same step, so no row load waits for its page id;
* a block's 4 FP8 codes per word become BF16 by bit moves and BF16 products, 10 PTX instructions
  and no conversion (_FP8_WORD_TO_BF16_PTX), the softmax sums are kept per score element and
  added up across warps once, and the output is stored 16 bytes a thread.

H100, HCA at 1M x 32 queries: 0.17 ms against the Triton kernel's 0.31; CSA (640 keys a query
at the flash-attn preset) 0.019 ms at batch 1 and 0.022 at batch 32 against 0.032 and 0.040
(kernels/RESULTS.md, with what each part costs). Numerics are sparse_decode's: keys decoded
exactly to BF16, scores and softmax in float32 scaled by D**-0.5, the unnormalised probabilities
rounded to BF16 for P K with a float32 accumulator, the sum taken from the unrounded ones. The
float32 sums run in another order than the Triton kernel's (tiles of 64 keys, not 128), so the
two agree within sparse_decode's tolerance of the reference, not bit for bit; a process runs one
of them for every request.

Two schedules (SCHEDULE). "lockstep" (`_lockstep_split`) has every warp load, decode, score
and accumulate, so decode, scores, softmax and output product follow each other once per tile,
with barriers between, and one program per SM has nothing else to run while it waits (the
seventh session's profile: 29% of the warps' stalls in the decode, 34% waiting on the products).
"warp_specialized" (`_warp_specialized_split`) gives the loads and the decode a warp group of its own
(`_decode_tiles`: 16 keys a load, two loads in flight, 104 registers) filling the two decoded
tiles as a ring with barriers, while the 8 math warps (`_attend_tiles`, 200 registers) score each
full tile and start its output product asynchronously, so it runs under the next tile's scores.
The tiles, products and sums are the lockstep kernel's, so the bits are too (checked on an H100).
It is the slower one there (1M x 32: 0.199 ms against 0.172): a quarter of all the kernel's warp
samples are math warps waiting for a decoded tile, while the decoder (one warp a scheduler) waits
on its loads and, less, for a free slot (the tenth session's profile, kernels/RESULTS.md), and
ptxas serializes all its wgmma (C7514: its output product is in flight around the loop's back
edge; rotating the loop lifts that but spills, 0.190 ms), so "lockstep" ships.
A third, "async_copies" (twelfth session; deleted in the thirteenth), copied each tile's rows by
cp.async into two raw shared-memory slots two tiles ahead, for the lockstep profile's loads-not-in
wait (18% of its samples); beside the raw slots only one decoded tile fit, so each tile's decode
followed the previous output product: the lockstep bits, 1M x 32 0.204-0.208 ms (kernels/RESULTS.md).

Hopper only (wgmma), 64 BF16 heads of 512 dims with 448 FP8 dims and a window of whole tiles:
`usable` says so and hca_decode / sparse_mqa_decode keep the Triton kernel elsewhere (CPU, the
interpreter, other shapes, Blackwell).
"""

from __future__ import annotations

import functools

import torch
import triton.language as tl

from . import gluon_api

try:  # Gluon ships with Triton 3.4+; without it the Triton kernel runs everywhere
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_init, warpgroup_mma_wait)
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None
else:
    from .gluon_api import cta_barrier

HEADS, HEAD_DIM, NOPE = 64, 512, 448  # the shape the layouts below are written for
KEYS_PER_TILE = 64
# Keys per program (hca_decode.HCA_KEYS_PER_SPLIT is the Triton kernel's), and a smaller split for
# queries of at most SHORT_QUERY_KEYS keys (the 1,152 keys of 128K: 4 programs instead of 3, one of
# them 2 tiles long). H100 sweep, ms at 1M x 32 / 128K x 32 / 1M x 1 / 128K x 1 with one split size
# for all: 320 keys 0.202 / 0.028 / 0.030 / 0.024, 512 0.174 / 0.037 / 0.037 / 0.034, 768 0.161 /
# 0.048 / 0.049 / 0.045 (fewer, longer programs win at 1M x 32: 3 waves of 132 instead of 5).
KEYS_PER_SPLIT, SHORT_QUERY_KEYS, SHORT_QUERY_SPLIT = 512, 1536, 320
# CSA decode's keys per split: its lists are the window and the top-k picks (640 keys at the
# flash-attn preset's top-512, whatever the context), so one size serves every query. H100, ms at
# 128K x 1 / 128K x 32 (x 32 the same at 8K and 1M): 128 keys 0.015 / 0.031, 192 0.019 / 0.022,
# 320 0.026 / 0.028, 640 0.043 / 0.044; the Triton kernel's 256-key splits 0.032 / 0.040
SPARSE_KEYS_PER_SPLIT = 192
WARPS = 8  # two warp groups: the [64, 512] float32 output is 128 registers a thread
# who loads and decodes the key tiles (module docstring): "lockstep", all 8 warps between the
# products, "warp_specialized", a decoder warp group of its own (H100, 1M x 32: 0.172 against
# 0.199 ms, kernels/RESULTS.md)
SCHEDULES = ("lockstep", "warp_specialized")
SCHEDULE = "lockstep"
# the same values as the kernels see them (a Gluon kernel reads only constexpr globals)
_H, _D, _NOPE, _N, _WARPS = (tl.constexpr(v) for v in (HEADS, HEAD_DIM, NOPE, KEYS_PER_TILE, WARPS))
_NEG_INIT = tl.constexpr(-1.0e30)  # finite running-max start, as sparse_decode.NEG_INIT
# the warp-specialized schedule: keys a decoder load covers, the decoder's warps and registers
# (setmaxnreg; the math warps take the rest of 168 a thread over 12 warps)
SUB_TILE, DECODER_WARPS, DECODER_REGS = 16, 4, 104
_SUB, _DEC_WARPS, _DEC_REGS = (tl.constexpr(v) for v in (SUB_TILE, DECODER_WARPS, DECODER_REGS))
# 4 E4M3 codes (a 32-bit word) times a power-of-two scale -> 4 BF16 values as 2 words, with no
# conversion instruction (those share a pipe a quarter as fast as the integer and BF16 ones): each
# code's sign goes to bit 15 of a 16-bit lane and its other 7 bits 4 up, which read as BF16 is the
# code times 2**-120 exactly (E4M3 subnormals as BF16 subnormals); two BF16 products then apply the
# scale, 2**(min(e, 134) - 7) and 2**(max(e, 134) - 134) for the scale byte e (one factor would
# pass BF16's largest exponent above e = 134). Each product is exact or the round-to-nearest of
# the exact value, as the F32 product and its conversion were, so the bits are the same (a GPU
# test checks every code under every scale). The E4M3 NaN codes, which the encoder never writes
# (block scales keep codes within 448), come out as 480 x the scale instead of NaN.
_FP8_WORD_TO_BF16_PTX = tl.constexpr("""{
    .reg .b32 x, y;
    prmt.b32 x, $2, 0, 0x9180;
    prmt.b32 y, $2, 0, 0xB3A2;
    shl.b32 x, x, 4;
    shl.b32 y, y, 4;
    and.b32 x, x, 0x87F087F0;
    and.b32 y, y, 0x87F087F0;
    mul.rn.bf16x2 x, x, $3;
    mul.rn.bf16x2 y, y, $3;
    mul.rn.bf16x2 $0, x, $4;
    mul.rn.bf16x2 $1, y, $4;
}""")
# the BF16 pair 2**(k - 127), 2**(k - 127) for a biased exponent k: k * this
_BF16_PAIR_EXPONENT = tl.constexpr(0x00800080)


if gluon is not None:

    @gluon.jit
    def _slots(start, t, hi, W: gl.constexpr, row_l: gl.constexpr, ROWS: gl.constexpr):
        """Key slots [start, start + ROWS) of a query at position t: slot i < W is the window's
        position p = t-W+1+i, slot W+j the j-th compressed slot (sparse_decode's key list). Returns
        the slots, their positions and which are keys (before a top-k slot's own check, _entries)."""
        i = start + gl.arange(0, ROWS, layout=row_l)
        p = t - (W - 1) + i
        return i, p, (i < hi) & ((p >= 0) | (i >= W))

    @gluon.jit
    def _entries(i, b, valid, tables, W: gl.constexpr, SELECTED: gl.constexpr):
        """The entry each slot i >= W reads and which slots are keys: HCA's slot W+j is entry j; a
        CSA slot (SELECTED) the query's top-k pick j, a key where it is one of the pool's entries
        (-1 marks no pick), as sparse_decode's kernel reads them."""
        if SELECTED:
            topk_ptr, topk_stride, n_ent = tables[4], tables[5], tables[6]
            e = gl.load(topk_ptr + b.to(gl.int64) * topk_stride + gl.maximum(i - W, 0), mask=valid & (i >= W),
                        other=-1)
            valid = valid & ((i < W) | ((e >= 0) & (e < n_ent)))
            e = gl.maximum(e, 0)
        else:
            e = gl.maximum(i - W, 0)
        return e, valid

    @gluon.jit
    def _tile_pages(start, t, b, hi, tables, W: gl.constexpr, PER_PAGE: gl.constexpr, SWA_PAGE: gl.constexpr,
                    row_l: gl.constexpr, ROWS: gl.constexpr, SELECTED: gl.constexpr):
        """The page of each slot's row (a window page or an entry's block page; 0 where no key), from
        tables = (window table, its row stride, block table, its row stride[, top-k picks, their row
        stride, entries in the pool]). Read a step before the rows themselves: the rows' addresses
        depend on them, and read together each row load waited for its page's. With SELECTED, the
        pages, the picked entries and which slots are keys (the picks are read here, once)."""
        swa_tab_ptr, swa_tab_stride, blk_tab_ptr, blk_tab_stride = tables[0], tables[1], tables[2], tables[3]
        i, p, valid = _slots(start, t, hi, W, row_l, ROWS)
        e, valid = _entries(i, b, valid, tables, W, SELECTED)
        first = gl.maximum(t - (W - 1), 0) // SWA_PAGE
        win_page = gl.load(swa_tab_ptr + b.to(gl.int64) * swa_tab_stride + p // SWA_PAGE - first,
                           mask=valid & (i < W), other=0)
        ent_page = gl.load(blk_tab_ptr + b.to(gl.int64) * blk_tab_stride + e // PER_PAGE,
                           mask=valid & (i >= W), other=0)
        pages = gl.where(i < W, win_page, ent_page)
        if SELECTED:
            return pages, e, valid
        else:
            return pages

    @gluon.jit
    def _tile_rows(start, pages, t, hi, pools, W: gl.constexpr, PER_PAGE: gl.constexpr, SWA_PAGE: gl.constexpr,
                   ROW_STRIDE: gl.constexpr, row_l: gl.constexpr, ROWS: gl.constexpr, SELECTED: gl.constexpr):
        """Key slots [start, start + ROWS)'s row addresses (bytes, on `pages` from _tile_pages, in
        pools = (window pages, their stride, entry pages, their stride)) and which slots are keys."""
        swa_ptr, swa_page_stride, ent_ptr, ent_page_stride = pools
        i, p, valid = _slots(start, t, hi, W, row_l, ROWS)
        if SELECTED:
            page, e, valid = pages
        else:
            page, e = pages, gl.maximum(i - W, 0)
        win_row = swa_ptr + page.to(gl.int64) * swa_page_stride + (p % SWA_PAGE) * ROW_STRIDE
        ent_row = ent_ptr + page.to(gl.int64) * ent_page_stride + (e % PER_PAGE) * ROW_STRIDE
        return gl.where(i < W, win_row, ent_row), valid

    @gluon.jit
    def _load_tile(start, pages, t, hi, pools, W: gl.constexpr, PER_PAGE: gl.constexpr, SWA_PAGE: gl.constexpr,
                   ROW_STRIDE: gl.constexpr, word_l: gl.constexpr, ROWS: gl.constexpr, SELECTED: gl.constexpr):
        """Key slots [start, start + ROWS)'s rows (on `pages`, in pools = (window pages, their stride,
        entry pages, their stride)) as 32-bit words: per 64-dim FP8 block its codes [N, 16], the RoPE
        dims' BF16 pairs [N, 16] twice, and the scale words [N] (block c's byte in bits
        8(c%4)..). Slots that are not keys are not read (zeros)."""
        rows, valid = _tile_rows(start, pages, t, hi, pools, W, PER_PAGE, SWA_PAGE, ROW_STRIDE,
                                 gl.SliceLayout(1, word_l), ROWS, SELECTED)
        return _row_words(rows, valid, word_l)

    @gluon.jit
    def _row_words(rows, valid, word_l: gl.constexpr):
        """_load_tile's words of the rows at byte addresses `rows` [N] where `valid` (zeros elsewhere)."""
        w = gl.arange(0, 16, layout=gl.SliceLayout(0, word_l))
        base = rows.to(gl.pointer_type(gl.int32))
        m = valid[:, None]
        codes = ()
        for c in gl.static_range(_NOPE // 64):
            codes = codes + (gl.load(base[:, None] + (c * 16) + w[None, :], mask=m, other=0),)
        rope_lo = gl.load(base[:, None] + (_NOPE // 4) + w[None, :], mask=m, other=0)
        rope_hi = gl.load(base[:, None] + (_NOPE // 4 + 16) + w[None, :], mask=m, other=0)
        # the 7 scale bytes and the pad, one 8-byte load (rows are 8-byte aligned)
        scales = gl.load(rows.to(gl.pointer_type(gl.int64)) + (_NOPE + 2 * (_D - _NOPE)) // 8, mask=valid, other=0)
        s0, s1 = _scale_words(scales)
        return codes, rope_lo, rope_hi, s0, s1

    @gluon.jit
    def _first_two_tiles(lo, t, b, hi, tables, pools, W: gl.constexpr, PER_PAGE: gl.constexpr,
                         SWA_PAGE: gl.constexpr, ROW_STRIDE: gl.constexpr, word_l: gl.constexpr, ROWS: gl.constexpr,
                         SELECTED: gl.constexpr):
        """A split's first two tiles of ROWS slots, loaded (_load_tile), and the pages of the third:
        the loop then loads each tile two ahead of its decode, its pages three ahead."""
        row_l: gl.constexpr = gl.SliceLayout(1, word_l)
        pages = _tile_pages(lo, t, b, hi, tables, W, PER_PAGE, SWA_PAGE, row_l, ROWS, SELECTED)
        first = _load_tile(lo, pages, t, hi, pools, W, PER_PAGE, SWA_PAGE, ROW_STRIDE, word_l, ROWS, SELECTED)
        pages = _tile_pages(lo + ROWS, t, b, hi, tables, W, PER_PAGE, SWA_PAGE, row_l, ROWS, SELECTED)
        second = _load_tile(lo + ROWS, pages, t, hi, pools, W, PER_PAGE, SWA_PAGE, ROW_STRIDE, word_l, ROWS, SELECTED)
        return first, second, _tile_pages(lo + 2 * ROWS, t, b, hi, tables, W, PER_PAGE, SWA_PAGE, row_l, ROWS, SELECTED)

    @gluon.jit
    def _bf16_pairs(words):
        """[N, W] words of BF16 pairs -> [N, W, 2] BF16, the low half first."""
        lo = (words & 0xFFFF).to(gl.uint16).to(gl.bfloat16, bitcast=True)
        hi = ((words >> 16) & 0xFFFF).to(gl.uint16).to(gl.bfloat16, bitcast=True)
        return gl.join(lo, hi)

    @gluon.jit
    def _decode_block(words, e):
        """A 64-code block's words [N, 16] times its rows' scales 2**(e - 127) [N] -> [N, 64] BF16."""
        lo_factor = (gl.minimum(e, 134) + 120) * _BF16_PAIR_EXPONENT
        hi_factor = (gl.maximum(e, 134) - 7) * _BF16_PAIR_EXPONENT
        lo, hi = gl.inline_asm_elementwise(_FP8_WORD_TO_BF16_PTX, "=r,=r,r,r,r",
                                           [words, lo_factor[:, None], hi_factor[:, None]],
                                           dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
        # [N, 16 words, 2 (within a pair), 2 (which pair)] -> column 4 word + 2 pair + within
        return gl.join(_bf16_pairs(lo), _bf16_pairs(hi)).permute(0, 1, 3, 2).reshape(words.shape[0], 64)

    @gluon.jit
    def _decode_to_smem(tile, k_smem):
        """Decode a loaded tile exactly to BF16 into k_smem [N, 512]: code x 2**(byte - 127) per
        64-dim block (main_rows.load_main_chunk's arithmetic), then the RoPE dims as stored."""
        codes, rope_lo, rope_hi, s0, s1 = tile
        for c in gl.static_range(_NOPE // 64):
            _store_block(k_smem, c, codes[c], s0, s1)
        _store_rope(k_smem, rope_lo, rope_hi)

    @gluon.jit
    def _store_block(k_smem, c: gl.constexpr, words, s0, s1):
        """FP8 block c's code words [N, 16], times its scale (byte c % 4 of the rows' scale word s0
        for c < 4, else of s1), as BF16 into k_smem's columns [64 c, 64 c + 64)."""
        word = s0 if c < 4 else s1
        e = (word >> (8 * (c % 4))) & 0xFF
        k_smem.slice(c * 64, 64, dim=1).store(_decode_block(words, e))

    @gluon.jit
    def _store_rope(k_smem, rope_lo, rope_hi):
        """The RoPE dims' BF16 pairs [N, 16] twice, as stored, into k_smem's last 64 columns."""
        ROWS: gl.constexpr = rope_lo.shape[0]
        rope = gl.join(_bf16_pairs(rope_lo).reshape(ROWS, 32), _bf16_pairs(rope_hi).reshape(ROWS, 32))
        k_smem.slice(_NOPE, 64, dim=1).store(rope.permute(0, 2, 1).reshape(ROWS, 64))

    @gluon.jit
    def _scale_words(scales):
        """A row's 8-byte scale word -> its two 32-bit halves (blocks 0-3, blocks 4-6 and the pad)."""
        return scales.to(gl.int32), (scales >> 32).to(gl.int32)

    # the programs' layouts: scores [64 heads, 64 keys] and output [64 heads, 512] over two warp
    # groups (each 32 keys' columns, each 256 dims), the probabilities as the output product's
    # register operand, the query and key tiles in shared memory as wgmma reads them
    _S_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, _N // 2, 16]))
    _O_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, _D // 2, 16]))
    _P_L = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_O_L.value, k_width=2))
    _SMEM_L = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
    _Q_L = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [_WARPS, 1], [1, 0]))

    @gluon.jit
    def _store_query(q_smem, q_ptr, b):
        """Query b [64 heads, 512] BF16 into q_smem, once."""
        qh = gl.arange(0, _H, layout=gl.SliceLayout(1, _Q_L))
        qd = gl.arange(0, _D, layout=gl.SliceLayout(0, _Q_L))
        q_smem.store(gl.load(q_ptr + (b.to(gl.int64) * _H + qh)[:, None] * _D + qd[None, :]))

    @gluon.jit
    def _attention_start():
        """A split's running state before its first tile: the output [64, 512], a zero score tile
        (the scores' product starts from it), the running maxima and the softmax sums, kept per
        score element and added up across the warps once at the end."""
        return (gl.zeros([_H, _D], gl.float32, _O_L), gl.zeros([_H, _N], gl.float32, _S_L),
                gl.full([_H], _NEG_INIT, gl.float32, gl.SliceLayout(1, _S_L)), gl.zeros([_H, _N], gl.float32, _S_L))

    @gluon.jit
    def _softmax_step(s, start, t, b, hi, tables, m_i, l_acc, sm_scale, W: gl.constexpr, SELECTED: gl.constexpr):
        """One tile's raw scores [64, N] -> its probabilities as the output product's operand, the
        factor the output is rescaled by, the new running maxima and the per-element sums."""
        i, _, is_key = _slots(start, t, hi, W, gl.SliceLayout(0, _S_L), _N)
        # CSA: the picks again, in the scores' layout (64 ints from L1 or L2; _tile_pages' copy, in the
        # rows' layout, was read two steps ago and would take registers the loop has none of)
        _, is_key = _entries(i, b, is_key, tables, W, SELECTED)
        s = gl.where(is_key[None, :], s * sm_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp(m_i - m_new)
        p = gl.exp(s - m_new[:, None])
        l_acc = l_acc * alpha[:, None] + p
        p_op = gl.convert_layout(p.to(gl.bfloat16), _P_L)
        return p_op, gl.convert_layout(alpha, gl.SliceLayout(1, _O_L)), m_new, l_acc

    @gluon.jit
    def _store_output(o, m_i, l_acc, span, dest):
        """The split's result: with the sink, the normalised output where the split is the query's
        only one; else the output over its own sum, with the maxima and sums _merge_splits needs."""
        sp, b, _, n_keys, split, _, _ = span
        sink_ptr, out_ptr, part_o_ptr, part_ml_ptr, n_splits = dest
        l_i = gl.sum(l_acc, axis=1)
        if n_keys <= split:
            # the only split: the sink (a logit that only adds to the denominator) is applied here
            sink = gl.load(sink_ptr + gl.arange(0, _H, layout=gl.SliceLayout(1, _S_L)))
            mx = gl.maximum(m_i, sink)
            a = gl.exp(m_i - mx)
            factor = a / (l_i * a + gl.exp(sink - mx))
            dst = out_ptr + b.to(gl.int64) * (_H * _D)
        else:
            row = (b.to(gl.int64) * n_splits + sp) * _H  # [B, n_splits, H] rows of this split's partials
            factor = 1.0 / gl.where(l_i > 0, l_i, 1.0)
            dst = part_o_ptr + row * _D
            hs = gl.arange(0, _H, layout=gl.SliceLayout(1, _S_L))
            gl.store(part_ml_ptr + (row + hs) * 2, m_i)
            gl.store(part_ml_ptr + (row + hs) * 2 + 1, l_i)
        # out and the partials are BF16 (usable): stored 16 bytes a thread, not wgmma's pairs
        qh = gl.arange(0, _H, layout=gl.SliceLayout(1, _Q_L))
        qd = gl.arange(0, _D, layout=gl.SliceLayout(0, _Q_L))
        factor = gl.convert_layout(factor, gl.SliceLayout(1, _O_L))
        res = gl.convert_layout((o * factor[:, None]).to(gl.bfloat16), _Q_L)
        gl.store(dst + qh[:, None] * _D + qd[None, :], res)

    # n_comp is never specialized: at 1 (SWA layers' window-only call: one -1 pick) Triton 3.6's
    # lowering of the folded key count fails an LLVM assertion (checked compiling for sm_90a)
    @gluon.jit(do_not_specialize=["n_comp"])
    def _split_kernel(
        q_ptr, sink_ptr, pos_ptr, sm_scale,
        swa_ptr, swa_page_stride, swa_tab_ptr, swa_tab_stride,
        ent_ptr, ent_page_stride, blk_tab_ptr, blk_tab_stride, n_comp, topk_ptr, topk_stride, n_ent,
        out_ptr, part_o_ptr, part_ml_ptr, n_splits,
        W: gl.constexpr, PER_PAGE: gl.constexpr, RATIO: gl.constexpr, SPLIT: gl.constexpr,
        SHORT_KEYS: gl.constexpr, SHORT_SPLIT: gl.constexpr,
        ROW_STRIDE: gl.constexpr, SWA_PAGE: gl.constexpr, SCHEDULE_ID: gl.constexpr, SELECTED: gl.constexpr,
    ):
        """Program (sp, b): split sp of query b's keys, under the schedule SCHEDULES[SCHEDULE_ID];
        the keys are the window and the visible HCA entries, or (SELECTED) the window and the
        query's n_comp top-k picks (sparse_decode._num_keys)."""
        sp, b = gl.program_id(0), gl.program_id(1)
        t = gl.load(pos_ptr + b).to(gl.int32)
        if SELECTED:
            n_keys = W + n_comp
        else:
            n_keys = W + gl.minimum((t + 1) // RATIO, n_comp)
        split = gl.where(n_keys <= SHORT_KEYS, SHORT_SPLIT, SPLIT)  # sparse_decode._split_size
        lo = sp * split
        # this split's keys [lo, hi) and what the schedules need of the query
        span = (sp, b, t, n_keys, split, lo, gl.minimum(lo + split, n_keys))
        tables = (swa_tab_ptr, swa_tab_stride, blk_tab_ptr, blk_tab_stride, topk_ptr, topk_stride, n_ent)
        pools = (swa_ptr, swa_page_stride, ent_ptr, ent_page_stride)
        dest = (sink_ptr, out_ptr, part_o_ptr, part_ml_ptr, n_splits)
        if SCHEDULE_ID == 1:
            _warp_specialized_split(q_ptr, sm_scale, span, tables, pools, dest, W, PER_PAGE, SWA_PAGE, ROW_STRIDE,
                                    SELECTED)
        else:
            _lockstep_split(q_ptr, sm_scale, span, tables, pools, dest, W, PER_PAGE, SWA_PAGE, ROW_STRIDE, SELECTED)

    @gluon.jit
    def _lockstep_split(q_ptr, sm_scale, span, tables, pools, dest, W: gl.constexpr, PER_PAGE: gl.constexpr,
                        SWA_PAGE: gl.constexpr, ROW_STRIDE: gl.constexpr, SELECTED: gl.constexpr):
        """The "lockstep" schedule: all 8 warps load, decode, score and accumulate each tile."""
        _, b, t, n_keys, _, lo, hi = span
        # raw rows: a thread loads 2 words (8 bytes; rows are 8-byte aligned) of 2 rows per block
        word_l: gl.constexpr = gl.BlockedLayout([1, 2], [4, 8], [_WARPS, 1], [1, 0])
        if lo < n_keys:
            # the first two tiles' loads go out before the query is staged, so their latency overlaps it
            row_l: gl.constexpr = gl.SliceLayout(1, word_l)
            tile, tile2, pages = _first_two_tiles(lo, t, b, hi, tables, pools, W, PER_PAGE, SWA_PAGE, ROW_STRIDE,
                                                  word_l, _N, SELECTED)
            # the query, once: [64 heads, 512] BF16 in the layout wgmma reads
            q_smem = gl.allocate_shared_memory(gl.bfloat16, [_H, _D], _SMEM_L)
            _store_query(q_smem, q_ptr, b)

            o, s_zero, m_i, l_acc = _attention_start()

            # two key tiles in shared memory: the next one is decoded while this one's output product runs
            k_smem = gl.allocate_shared_memory(gl.bfloat16, [2, _N, _D], _SMEM_L)
            _decode_to_smem(tile, k_smem.index(0))
            tile = tile2
            fence_async_shared()
            cta_barrier()
            for start in range(lo, hi, _N):
                buf = ((start - lo) // _N) % 2
                cur = k_smem.index(buf)
                s_tok = warpgroup_mma(q_smem, cur.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(0, deps=[s_tok])
                p_op, alpha, m_i, l_acc = _softmax_step(s, start, t, b, hi, tables, m_i, l_acc, sm_scale, W, SELECTED)
                o = o * alpha[:, None]
                o_tok = warpgroup_mma(p_op, cur, o, is_async=True)
                if start + _N < hi:
                    # under the output product: the buffer's last readers, the previous tile's
                    # products, finished before the barrier that ended the previous step
                    _decode_to_smem(tile, k_smem.index(1 - buf))
                    tile = _load_tile(start + 2 * _N, pages, t, hi, pools, W, PER_PAGE, SWA_PAGE, ROW_STRIDE, word_l, _N,
                                      SELECTED)
                    pages = _tile_pages(start + 3 * _N, t, b, hi, tables, W, PER_PAGE, SWA_PAGE, row_l, _N,
                                        SELECTED)
                o = warpgroup_mma_wait(0, deps=[o_tok])
                fence_async_shared()  # the decoded tile's stores, before the next step's products read them
                cta_barrier()
            _store_output(o, m_i, l_acc, span, dest)

    # -- the "warp_specialized" schedule: a decoder warp group fills a ring of two decoded tiles
    #    while the two math warp groups score and accumulate -------------------------------------

    @gluon.jit
    def _decode_tiles(k_smem, ready, free, span, n_tiles, tables, pools, W: gl.constexpr, PER_PAGE: gl.constexpr,
                      SWA_PAGE: gl.constexpr, ROW_STRIDE: gl.constexpr, SELECTED: gl.constexpr):
        """The decoder warp group: each tile's rows, SUB keys at a time (two sub-tiles' loads in
        flight: the registers of a whole tile's loads would not fit beside the math), decoded into
        ring slot tile % 2 once the math has handed it back, then the slot marked full."""
        _, b, t, _, _, lo, hi = span
        SUB: gl.constexpr = _SUB
        word_l: gl.constexpr = gl.BlockedLayout([1, 2], [4, 8], [_DEC_WARPS, 1], [1, 0])
        row_l: gl.constexpr = gl.SliceLayout(1, word_l)
        raw_a, raw_b, pages = _first_two_tiles(lo, t, b, hi, tables, pools, W, PER_PAGE, SWA_PAGE, ROW_STRIDE,
                                               word_l, SUB, SELECTED)
        for tile in range(n_tiles):
            slot = tile % 2
            # the math's products of tile - 2 have read this slot (passes at once for tiles 0, 1)
            mbarrier.wait(free.index(slot), ((tile // 2) & 1) ^ 1)
            dst = k_smem.index(slot)
            for j in gl.static_range(_N // SUB):
                start = lo + tile * _N + (j + 2) * SUB  # the sub-tile two ahead (no keys past hi: not read)
                raw_next = _load_tile(start, pages, t, hi, pools, W, PER_PAGE, SWA_PAGE, ROW_STRIDE, word_l, SUB,
                                      SELECTED)
                pages = _tile_pages(start + SUB, t, b, hi, tables, W, PER_PAGE, SWA_PAGE, row_l, SUB, SELECTED)
                _decode_to_smem(raw_a, dst.slice(j * SUB, SUB, dim=0))
                raw_a = raw_b
                raw_b = raw_next
            fence_async_shared()  # the decoded stores, before the math's products read them
            mbarrier.arrive(ready.index(slot), count=1)

    @gluon.jit
    def _attend_tiles(q_smem, k_smem, ready, free, q_ptr, sm_scale, span, tables, dest, n_tiles, W: gl.constexpr,
                      SELECTED: gl.constexpr):
        """The math warp groups: the query into shared memory, then per full slot the scores, the
        softmax and the output product, each tile's output product running on the tensor cores
        under the next tile's scores (the slot is handed back once it is done)."""
        _, b, t, _, _, lo, hi = span
        if n_tiles > 0:
            _store_query(q_smem, q_ptr, b)
            fence_async_shared()
            cta_barrier()
            o, s_zero, m_i, l_acc = _attention_start()
            o_tok = warpgroup_mma_init(o)
            for tile in range(n_tiles):
                slot = tile % 2
                mbarrier.wait(ready.index(slot), (tile // 2) & 1)
                cur = k_smem.index(slot)
                s_tok = warpgroup_mma(q_smem, cur.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                # the previous tile's output product (issued before these scores) is done: its slot
                # goes back to the decoder
                o = warpgroup_mma_wait(1, deps=[o_tok])
                mbarrier.arrive(free.index(1 - slot), count=1, pred=tile > 0)
                s = warpgroup_mma_wait(0, deps=[s_tok])
                p_op, alpha, m_i, l_acc = _softmax_step(s, lo + tile * _N, t, b, hi, tables, m_i, l_acc, sm_scale, W,
                                                        SELECTED)
                o = o * alpha[:, None]
                o_tok = warpgroup_mma(p_op, cur, o, is_async=True)
            o = warpgroup_mma_wait(0, deps=[o_tok])
            _store_output(o, m_i, l_acc, span, dest)

    @gluon.jit
    def _warp_specialized_split(q_ptr, sm_scale, span, tables, pools, dest, W: gl.constexpr, PER_PAGE: gl.constexpr,
                                SWA_PAGE: gl.constexpr, ROW_STRIDE: gl.constexpr, SELECTED: gl.constexpr):
        """The "warp_specialized" schedule: the lockstep kernel's math in its 8 warps, the loads and
        the decode in a warp group of their own (the same tiles, products and sums, so the same bits)."""
        _, _, _, n_keys, _, lo, hi = span
        n_tiles = gl.where(lo < n_keys, gl.cdiv(hi - lo, _N), 0)
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [_H, _D], _SMEM_L)
        k_smem = gl.allocate_shared_memory(gl.bfloat16, [2, _N, _D], _SMEM_L)
        ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(free.index(i), count=1)
        fence_async_shared()
        gl.warp_specialize([
            (_attend_tiles, (q_smem, k_smem, ready, free, q_ptr, sm_scale, span, tables, dest, n_tiles, W, SELECTED)),
            (_decode_tiles, (k_smem, ready, free, span, n_tiles, tables, pools, W, PER_PAGE, SWA_PAGE, ROW_STRIDE,
                             SELECTED)),
        ], [_DEC_WARPS], [_DEC_REGS])

    @gluon.jit
    def _decode_rows_kernel(rows_ptr, out_ptr, n_rows, ROW_STRIDE: gl.constexpr):
        """Rows [64 p, 64 p + 64) of a [n_rows, ROW_STRIDE] byte array decoded as the split programs
        decode a tile (_row_words, _decode_to_smem), written out [n_rows, 512] BF16."""
        word_l: gl.constexpr = gl.BlockedLayout([1, 2], [4, 8], [_WARPS, 1], [1, 0])
        i = gl.program_id(0) * _N + gl.arange(0, _N, layout=gl.SliceLayout(1, word_l))
        tile = _row_words(rows_ptr + i.to(gl.int64) * ROW_STRIDE, i < n_rows, word_l)
        k_smem = gl.allocate_shared_memory(gl.bfloat16, [_N, _D], _SMEM_L)
        _decode_to_smem(tile, k_smem)
        cta_barrier()
        qh = gl.arange(0, _N, layout=gl.SliceLayout(1, _Q_L))
        qd = gl.arange(0, _D, layout=gl.SliceLayout(0, _Q_L))
        r = gl.program_id(0) * _N + qh
        gl.store(out_ptr + r.to(gl.int64)[:, None] * _D + qd[None, :], k_smem.load(_Q_L), mask=(r < n_rows)[:, None])


@functools.cache
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def rows_aligned(*pools: torch.Tensor) -> bool:
    """Whether every row of these page pools ([pages, rows, row_bytes] uint8 views) starts on an
    8-byte boundary: the kernel reads a row's scale bytes as one 8-byte word and its codes in
    8-byte pieces, which fault on a misaligned address."""
    return all(t.data_ptr() % 8 == 0 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0 for t in pools)


def usable(q: torch.Tensor, swa: torch.Tensor, entries: torch.Tensor, window: int, nope_dim: int) -> bool:
    """Whether this kernel runs the HCA split attention: a Hopper GPU with Gluon (gluon_api.enabled),
    a BF16 query of 64 heads x 512 dims with 448 FP8 dims, 8-byte aligned rows and a window of
    whole tiles."""
    return (q.is_cuda and q.dtype == torch.bfloat16 and _is_hopper(q.device) and gluon_api.enabled()
            and tuple(q.shape[1:]) == (HEADS, HEAD_DIM) and nope_dim == NOPE and window % KEYS_PER_TILE == 0
            and rows_aligned(swa, entries))


def launch_options(schedule: str) -> dict:
    """The split kernel's compile options under `schedule`: WARPS warps, and for the
    warp-specialized one as many registers a thread as lets its 12 warps share an SM's 64K
    (setmaxnreg then gives the decoder warps DECODER_REGS and the math warps the rest, 200)."""
    if schedule == "warp_specialized":
        return dict(num_warps=WARPS, maxnreg=65536 // ((WARPS + DECODER_WARPS) * 32) // 8 * 8)
    return dict(num_warps=WARPS)


def launch(args: tuple, consts: dict, n_splits: int, batch: int) -> None:
    """Run the split kernel with sparse_decode.launch_split_attention's arguments: HCA's (every
    visible entry) or, with consts["SELECTED"], CSA's (the top-k picks)."""
    (q, sink, positions, _, sm_scale, swa, swa_page_stride, swa_table, swa_tab_stride, entries, ent_page_stride,
     block_table, blk_tab_stride, n_blk, topk, topk_stride, n_comp, out, part_o, part_ml, _) = args
    if consts["SPLIT"] % KEYS_PER_TILE or consts["SHORT_SPLIT"] % KEYS_PER_TILE:
        raise ValueError(f"keys per split {consts['SPLIT']}, {consts['SHORT_SPLIT']} are not multiples of the "
                         f"tile {KEYS_PER_TILE}")
    if SCHEDULE not in SCHEDULES:
        raise ValueError(f"SCHEDULE must be one of {SCHEDULES}, got {SCHEDULE!r}")
    _split_kernel[(n_splits, batch)](
        q, sink, positions, sm_scale, swa, swa_page_stride, swa_table, swa_tab_stride, entries, ent_page_stride,
        block_table, blk_tab_stride, n_comp, topk, topk_stride, n_blk * consts["PER_PAGE"], out, part_o, part_ml,
        n_splits,
        W=consts["W"], PER_PAGE=consts["PER_PAGE"], RATIO=consts["RATIO"], SPLIT=consts["SPLIT"],
        SHORT_KEYS=consts["SHORT_KEYS"], SHORT_SPLIT=consts["SHORT_SPLIT"],
        ROW_STRIDE=consts["ROW_STRIDE"], SWA_PAGE=consts["SWA_PAGE"], SCHEDULE_ID=SCHEDULES.index(SCHEDULE),
        SELECTED=consts["SELECTED"], **launch_options(SCHEDULE))


def decode_rows(rows: torch.Tensor) -> torch.Tensor:
    """Compact main rows uint8 [n, 584] (8-byte aligned) -> [n, 512] BF16, decoded by the split
    programs' own code: what the GPU test holds against kv_layout.decode_main bit for bit."""
    n, row_bytes = rows.shape
    if rows.stride(1) != 1 or rows.stride(0) != row_bytes or not rows_aligned(rows.view(1, n, row_bytes)):
        raise ValueError("rows must be contiguous [n, row bytes] uint8 on 8-byte boundaries")
    out = torch.empty(n, HEAD_DIM, dtype=torch.bfloat16, device=rows.device)
    _decode_rows_kernel[(-(-n // KEYS_PER_TILE),)](rows, out, n, ROW_STRIDE=row_bytes, num_warps=WARPS)
    return out
