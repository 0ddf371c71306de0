"""HCA decode attention's split programs for Hopper GPUs, in Gluon (Triton's layout-explicit dialect).

The same attention as sparse_decode's `_split_attention` for HCA (window plus every visible entry,
one online softmax per split of HCA_KEYS_PER_SPLIT keys, partials merged with the sink by
`_merge_splits`), with the work laid out for the tensor cores instead of as the Triton compiler
chose (255 registers, 214 KB of shared memory, spills, 218 warp instructions per key):

* a program is 8 warps (two warp groups) holding all 64 heads. The query [64, 512] sits in shared
  memory once; each 64-key tile of FP8 + BF16 rows is decoded to BF16 into one of two shared
  [64, 512] tiles, which both products read: scores S = Q K^T (each warp group forms 32 keys'
  columns) and O += P K (each warp group owns 256 of the 512 output dims: 128 float32 registers a
  thread, which never leave the registers until the end);
* the next tile is decoded into the other shared tile while this tile's scores run (async
  wgmma), and the tile after it is loaded, as 32-bit words, before that: each load has a whole
  step to land. The pages of the tile after that are read in the same step, so no row load
  waits for its page id;
* a block's 4 FP8 codes per word are decoded to BF16 by 12 PTX instructions (the compiler took
  the bytes apart first: 3 more per code), the softmax sums are kept per score element and added
  up across warps once, and the output is stored 16 bytes a thread.

H100, 1M x 32 queries: 0.17 ms against the Triton kernel's 0.31 (kernels/RESULTS.md, with what
each part costs). Numerics are sparse_decode's: keys decoded exactly to BF16, scores and softmax
in float32 scaled by D**-0.5, the unnormalised probabilities rounded to BF16 for P K with a
float32 accumulator, the sum taken from the unrounded ones. The float32 sums run in another order
than the Triton kernel's (tiles of 64 keys, not 128), so the two agree within sparse_decode's
tolerance of the reference, not bit for bit; a process runs one of them for every request.

Hopper only (wgmma), 64 BF16 heads of 512 dims with 448 FP8 dims and a window of whole tiles:
`usable` says so and hca_decode keeps the Triton kernel elsewhere (CPU, the interpreter, other
shapes, Blackwell).
"""

from __future__ import annotations

import functools

import torch
import triton.language as tl

try:  # Gluon ships with Triton 3.4+; without it the Triton kernel runs everywhere
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

HEADS, HEAD_DIM, NOPE = 64, 512, 448  # the shape the layouts below are written for
KEYS_PER_TILE = 64
# Keys per program (hca_decode.HCA_KEYS_PER_SPLIT is the Triton kernel's), and a smaller split for
# queries of at most SHORT_QUERY_KEYS keys (the 1,152 keys of 128K: 4 programs instead of 3, one of
# them 2 tiles long). H100 sweep, ms at 1M x 32 / 128K x 32 / 1M x 1 / 128K x 1 with one split size
# for all: 320 keys 0.202 / 0.028 / 0.030 / 0.024, 512 0.174 / 0.037 / 0.037 / 0.034, 768 0.161 /
# 0.048 / 0.049 / 0.045 (fewer, longer programs win at 1M x 32: 3 waves of 132 instead of 5).
KEYS_PER_SPLIT, SHORT_QUERY_KEYS, SHORT_QUERY_SPLIT = 512, 1536, 320
WARPS = 8  # two warp groups: the [64, 512] float32 output is 128 registers a thread
# the same values as the kernels see them (a Gluon kernel reads only constexpr globals)
_H, _D, _NOPE, _N, _WARPS = (tl.constexpr(v) for v in (HEADS, HEAD_DIM, NOPE, KEYS_PER_TILE, WARPS))
_NEG_INIT = tl.constexpr(-1.0e30)  # finite running-max start, as sparse_decode.NEG_INIT
# 4 E4M3 codes (a 32-bit word) times a power-of-two scale -> 4 BF16 values as 2 words, each
# step exact: E4M3 -> F16 -> F32, the product (no flush of subnormals), F32 -> BF16 of a value
# with at most 4 significant bits. In PTX because the compiler took each code out of its word
# byte by byte first (3 operations per code more).
_FP8_WORD_TO_BF16_PTX = tl.constexpr("""{
    .reg .b16 l, h;
    .reg .b32 a, b;
    .reg .f16 a0, a1, b0, b1;
    .reg .f32 f0, f1, f2, f3;
    mov.b32 {l, h}, $2;
    cvt.rn.f16x2.e4m3x2 a, l;
    cvt.rn.f16x2.e4m3x2 b, h;
    mov.b32 {a0, a1}, a;
    mov.b32 {b0, b1}, b;
    cvt.f32.f16 f0, a0;
    cvt.f32.f16 f1, a1;
    cvt.f32.f16 f2, b0;
    cvt.f32.f16 f3, b1;
    mul.f32 f0, f0, $3;
    mul.f32 f1, f1, $3;
    mul.f32 f2, f2, $3;
    mul.f32 f3, f3, $3;
    cvt.rn.bf16x2.f32 $0, f1, f0;
    cvt.rn.bf16x2.f32 $1, f3, f2;
}""")


if gluon is not None:

    @gluon.jit
    def _slots(start, t, hi, W: gl.constexpr, row_l: gl.constexpr):
        """Key slots [start, start + N) of a query at position t: slot i < W is the window's
        position p = t-W+1+i, slot W+j is HCA entry j (sparse_decode's key list). Returns the
        slots, their positions and which are keys."""
        i = start + gl.arange(0, _N, layout=row_l)
        p = t - (W - 1) + i
        return i, p, (i < hi) & ((p >= 0) | (i >= W))

    @gluon.jit
    def _tile_pages(start, t, b, hi, tables, W: gl.constexpr, PER_PAGE: gl.constexpr, SWA_PAGE: gl.constexpr,
                    row_l: gl.constexpr):
        """The page of each slot's row (a window page or an HCA block page; 0 where no key), from
        tables = (window table, its row stride, block table, its row stride). Read a step before
        the rows themselves: the rows' addresses depend on them, and read together each row load
        waited for its page's."""
        swa_tab_ptr, swa_tab_stride, blk_tab_ptr, blk_tab_stride = tables
        i, p, valid = _slots(start, t, hi, W, row_l)
        first = gl.maximum(t - (W - 1), 0) // SWA_PAGE
        win_page = gl.load(swa_tab_ptr + b.to(gl.int64) * swa_tab_stride + p // SWA_PAGE - first,
                           mask=valid & (i < W), other=0)
        ent_page = gl.load(blk_tab_ptr + b.to(gl.int64) * blk_tab_stride + gl.maximum(i - W, 0) // PER_PAGE,
                           mask=valid & (i >= W), other=0)
        return gl.where(i < W, win_page, ent_page)

    @gluon.jit
    def _load_tile(start, pages, t, hi, pools, W: gl.constexpr, PER_PAGE: gl.constexpr, SWA_PAGE: gl.constexpr,
                   ROW_STRIDE: gl.constexpr, word_l: gl.constexpr):
        """Key slots [start, start + N)'s rows (on `pages`, in pools = (window pages, their stride,
        HCA pages, their stride)) as 32-bit words: per 64-dim FP8 block its codes [N, 16], the RoPE
        dims' BF16 pairs [N, 16] twice, and the scale words [N] (block c's byte in bits
        8(c%4)..). Slots that are not keys are not read (zeros)."""
        swa_ptr, swa_page_stride, ent_ptr, ent_page_stride = pools
        i, p, valid = _slots(start, t, hi, W, gl.SliceLayout(1, word_l))
        win_row = swa_ptr + pages.to(gl.int64) * swa_page_stride + (p % SWA_PAGE) * ROW_STRIDE
        ent_row = ent_ptr + pages.to(gl.int64) * ent_page_stride + (gl.maximum(i - W, 0) % PER_PAGE) * ROW_STRIDE
        rows = gl.where(i < W, win_row, ent_row)
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
        return codes, rope_lo, rope_hi, scales.to(gl.int32), (scales >> 32).to(gl.int32)

    @gluon.jit
    def _bf16_pairs(words):
        """[N, W] words of BF16 pairs -> [N, W, 2] BF16, the low half first."""
        lo = (words & 0xFFFF).to(gl.uint16).to(gl.bfloat16, bitcast=True)
        hi = ((words >> 16) & 0xFFFF).to(gl.uint16).to(gl.bfloat16, bitcast=True)
        return gl.join(lo, hi)

    @gluon.jit
    def _decode_block(words, scale):
        """A 64-code block's words [N, 16] times its rows' scales [N] -> [N, 64] BF16."""
        lo, hi = gl.inline_asm_elementwise(_FP8_WORD_TO_BF16_PTX, "=r,=r,r,r", [words, scale[:, None]],
                                           dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
        # [N, 16 words, 2 (within a pair), 2 (which pair)] -> column 4 word + 2 pair + within
        return gl.join(_bf16_pairs(lo), _bf16_pairs(hi)).permute(0, 1, 3, 2).reshape(_N, 64)

    @gluon.jit
    def _decode_to_smem(tile, k_smem):
        """Decode a loaded tile exactly to BF16 into k_smem [N, 512]: code x 2**(byte - 127) per
        64-dim block (main_rows.load_main_chunk's arithmetic), then the RoPE dims as stored."""
        codes, rope_lo, rope_hi, s0, s1 = tile
        for c in gl.static_range(_NOPE // 64):
            word = s0 if c < 4 else s1
            e = (word >> (8 * (c % 4))) & 0xFF
            k_smem.slice(c * 64, 64, dim=1).store(_decode_block(codes[c], (e << 23).to(gl.float32, bitcast=True)))
        rope = gl.join(_bf16_pairs(rope_lo).reshape(_N, 32), _bf16_pairs(rope_hi).reshape(_N, 32))
        k_smem.slice(_NOPE, 64, dim=1).store(rope.permute(0, 2, 1).reshape(_N, 64))

    @gluon.jit
    def _split_kernel(
        q_ptr, sink_ptr, pos_ptr, sm_scale,
        swa_ptr, swa_page_stride, swa_tab_ptr, swa_tab_stride,
        ent_ptr, ent_page_stride, blk_tab_ptr, blk_tab_stride, n_comp,
        out_ptr, part_o_ptr, part_ml_ptr, n_splits,
        W: gl.constexpr, PER_PAGE: gl.constexpr, RATIO: gl.constexpr, SPLIT: gl.constexpr,
        SHORT_KEYS: gl.constexpr, SHORT_SPLIT: gl.constexpr,
        ROW_STRIDE: gl.constexpr, SWA_PAGE: gl.constexpr,
    ):
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, _N // 2, 16])
        o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, _D // 2, 16])
        p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
        smem_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        # raw rows: a thread loads 2 words (8 bytes; rows are 8-byte aligned) of 2 rows per block
        word_l: gl.constexpr = gl.BlockedLayout([1, 2], [4, 8], [_WARPS, 1], [1, 0])
        q_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [_WARPS, 1], [1, 0])

        sp, b = gl.program_id(0), gl.program_id(1)
        t = gl.load(pos_ptr + b).to(gl.int32)
        n_keys = W + gl.minimum((t + 1) // RATIO, n_comp)
        split = gl.where(n_keys <= SHORT_KEYS, SHORT_SPLIT, SPLIT)  # sparse_decode._split_size
        lo = sp * split
        if lo < n_keys:
            hi = gl.minimum(lo + split, n_keys)
            # the first two tiles' loads go out before the query is staged, so their latency overlaps it
            tables = (swa_tab_ptr, swa_tab_stride, blk_tab_ptr, blk_tab_stride)
            pools = (swa_ptr, swa_page_stride, ent_ptr, ent_page_stride)
            row_l: gl.constexpr = gl.SliceLayout(1, word_l)
            pages = _tile_pages(lo, t, b, hi, tables, W, PER_PAGE, SWA_PAGE, row_l)
            tile = _load_tile(lo, pages, t, hi, pools, W, PER_PAGE, SWA_PAGE, ROW_STRIDE, word_l)
            pages = _tile_pages(lo + _N, t, b, hi, tables, W, PER_PAGE, SWA_PAGE, row_l)
            tile2 = _load_tile(lo + _N, pages, t, hi, pools, W, PER_PAGE, SWA_PAGE, ROW_STRIDE, word_l)
            pages = _tile_pages(lo + 2 * _N, t, b, hi, tables, W, PER_PAGE, SWA_PAGE, row_l)
            # the query, once: [64 heads, 512] BF16 in the layout wgmma reads
            qh = gl.arange(0, _H, layout=gl.SliceLayout(1, q_l))
            qd = gl.arange(0, _D, layout=gl.SliceLayout(0, q_l))
            q_smem = gl.allocate_shared_memory(gl.bfloat16, [_H, _D], smem_l)
            q_smem.store(gl.load(q_ptr + (b.to(gl.int64) * _H + qh)[:, None] * _D + qd[None, :]))

            o = gl.zeros([_H, _D], gl.float32, o_l)
            s_zero = gl.zeros([_H, _N], gl.float32, s_l)
            m_i = gl.full([_H], _NEG_INIT, gl.float32, gl.SliceLayout(1, s_l))
            # the softmax sums, kept per score element and added up across the warps once at the end
            l_acc = gl.zeros([_H, _N], gl.float32, s_l)

            # two key tiles in shared memory: the next one is decoded while this one's scores run
            k_smem = gl.allocate_shared_memory(gl.bfloat16, [2, _N, _D], smem_l)
            _decode_to_smem(tile, k_smem.index(0))
            tile = tile2
            fence_async_shared()
            gl.thread_barrier()
            for start in range(lo, hi, _N):
                buf = ((start - lo) // _N) % 2
                cur = k_smem.index(buf)
                s_tok = warpgroup_mma(q_smem, cur.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                if start + _N < hi:
                    # the buffer's last readers, the previous tile's products, finished before the
                    # barrier that ended the previous step
                    _decode_to_smem(tile, k_smem.index(1 - buf))
                    tile = _load_tile(start + 2 * _N, pages, t, hi, pools, W, PER_PAGE, SWA_PAGE, ROW_STRIDE, word_l)
                    pages = _tile_pages(start + 3 * _N, t, b, hi, tables, W, PER_PAGE, SWA_PAGE, row_l)
                s = warpgroup_mma_wait(0, deps=[s_tok])
                _, _, is_key = _slots(start, t, hi, W, gl.SliceLayout(0, s_l))
                s = gl.where(is_key[None, :], s * sm_scale, float("-inf"))
                m_new = gl.maximum(m_i, gl.max(s, axis=1))
                alpha = gl.exp(m_i - m_new)
                p = gl.exp(s - m_new[:, None])
                l_acc = l_acc * alpha[:, None] + p
                m_i = m_new
                p_op = gl.convert_layout(p.to(gl.bfloat16), p_l)
                o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
                o = warpgroup_mma(p_op, cur, o)
                fence_async_shared()  # the decoded tile's stores, before the next step's products read them
                gl.thread_barrier()

            l_i = gl.sum(l_acc, axis=1)
            if n_keys <= split:
                # the only split: the sink (a logit that only adds to the denominator) is applied here
                sink = gl.load(sink_ptr + gl.arange(0, _H, layout=gl.SliceLayout(1, s_l)))
                mx = gl.maximum(m_i, sink)
                a = gl.exp(m_i - mx)
                factor = a / (l_i * a + gl.exp(sink - mx))
                dst = out_ptr + b.to(gl.int64) * (_H * _D)
            else:
                row = (b.to(gl.int64) * n_splits + sp) * _H  # [B, n_splits, H] rows of this split's partials
                factor = 1.0 / gl.where(l_i > 0, l_i, 1.0)
                dst = part_o_ptr + row * _D
                hs = gl.arange(0, _H, layout=gl.SliceLayout(1, s_l))
                gl.store(part_ml_ptr + (row + hs) * 2, m_i)
                gl.store(part_ml_ptr + (row + hs) * 2 + 1, l_i)
            # out and the partials are BF16 (usable): stored 16 bytes a thread, not wgmma's pairs
            factor = gl.convert_layout(factor, gl.SliceLayout(1, o_l))
            res = gl.convert_layout((o * factor[:, None]).to(gl.bfloat16), q_l)
            gl.store(dst + qh[:, None] * _D + qd[None, :], res)


@functools.cache
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def rows_aligned(*pools: torch.Tensor) -> bool:
    """Whether every row of these page pools ([pages, rows, row_bytes] uint8 views) starts on an
    8-byte boundary: the kernel reads a row's scale bytes as one 8-byte word and its codes in
    8-byte pieces, which fault on a misaligned address."""
    return all(t.data_ptr() % 8 == 0 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0 for t in pools)


def usable(q: torch.Tensor, swa: torch.Tensor, entries: torch.Tensor, window: int, nope_dim: int) -> bool:
    """Whether this kernel runs the HCA split attention: a Hopper GPU with Gluon, a BF16 query of
    64 heads x 512 dims with 448 FP8 dims, 8-byte aligned rows and a window of whole tiles."""
    return (gluon is not None and q.is_cuda and q.dtype == torch.bfloat16 and _is_hopper(q.device)
            and tuple(q.shape[1:]) == (HEADS, HEAD_DIM) and nope_dim == NOPE and window % KEYS_PER_TILE == 0
            and rows_aligned(swa, entries))


def launch(args: tuple, consts: dict, n_splits: int, batch: int) -> None:
    """Run the split kernel with sparse_decode.launch_split_attention's arguments (HCA: no top-k)."""
    (q, sink, positions, _, sm_scale, swa, swa_page_stride, swa_table, swa_tab_stride, entries, ent_page_stride,
     block_table, blk_tab_stride, _, _, _, n_comp, out, part_o, part_ml, _) = args
    if consts["SPLIT"] % KEYS_PER_TILE or consts["SHORT_SPLIT"] % KEYS_PER_TILE:
        raise ValueError(f"keys per split {consts['SPLIT']}, {consts['SHORT_SPLIT']} are not multiples of the "
                         f"tile {KEYS_PER_TILE}")
    _split_kernel[(n_splits, batch)](
        q, sink, positions, sm_scale, swa, swa_page_stride, swa_table, swa_tab_stride, entries, ent_page_stride,
        block_table, blk_tab_stride, n_comp, out, part_o, part_ml, n_splits,
        W=consts["W"], PER_PAGE=consts["PER_PAGE"], RATIO=consts["RATIO"], SPLIT=consts["SPLIT"],
        SHORT_KEYS=consts["SHORT_KEYS"], SHORT_SPLIT=consts["SHORT_SPLIT"],
        ROW_STRIDE=consts["ROW_STRIDE"], SWA_PAGE=consts["SWA_PAGE"], num_warps=WARPS)
