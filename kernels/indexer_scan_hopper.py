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

H100, 1M context x 32 queries: 0.35 ms against the Triton scan's 0.52 (kernels/RESULTS.md).
Hopper only (wgmma); indexer_topk uses it where `usable` says so and keeps the Triton scan
elsewhere, which is also what the CPU tests run in the interpreter (Gluon has no interpreter).
"""

from __future__ import annotations

import functools

import torch
import triton.language as tl

from .kv_layout import index_scales_as_words
from .scan_operands import E2M1_TO_E4M3_PTX

try:  # Gluon ships with Triton 3.4+; without it the Triton scan runs everywhere
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

ROWS_PER_STEP = 128  # two 64-entry pages: one [128, 32] x [32, heads] dot per block
WARPS = 4  # one warp group; about 250 registers a thread, so two programs per SM
PROGRAMS_PER_SM = 2  # H100 sweep: 2 programs (0.347 ms at 1M x 32); 64-row steps at 3 or 4 per SM 0.39-0.51
DI = 128  # the layouts below hold a row's 4 block scales in one word
# the same values as the kernels see them (a Gluon kernel reads only constexpr globals)
_ROWS, _WARPS, _DI = tl.constexpr(ROWS_PER_STEP), tl.constexpr(WARPS), tl.constexpr(DI)


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

    @gluon.jit
    def _scan_kernel(q8_ptr, w8_ptr, mode_ptr, pos_ptr, rows_ptr, table_ptr, out_ptr,
                     q8_stride_s, table_stride_s, page_stride, out_stride_s, n_blk, n_cols, pages_per_prog,
                     row_stride: gl.constexpr, HP: gl.constexpr, SENTINEL_KEY: gl.constexpr, MODE: gl.constexpr):
        ROWS: gl.constexpr = _ROWS
        NB: gl.constexpr = _DI // 32
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[_WARPS, 1],
                                                        instr_shape=[16, HP, 32])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=4)
        row_l: gl.constexpr = gl.SliceLayout(1, acc_l)
        # codes as [row, word, byte]: the thread holding a_l's K groups q and q + 4 of a row (lane
        # bits 0-1 = q, rows as a_l spreads them over lanes, warps and registers) holds word q
        raw3_l: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [8, 0, 0], [64, 0, 0]],
            lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[ROWS, 4, 4])
        word_l: gl.constexpr = gl.SliceLayout(2, raw3_l)
        q_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [_WARPS, 1], [1, 0])
        q_smem_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=8, rank=2)

        s = gl.program_id(0)
        page_lo = gl.program_id(1) * pages_per_prog
        page_hi = gl.minimum(page_lo + pages_per_prog, gl.cdiv(n_cols, 64))
        n_vis = (gl.load(pos_ptr + s).to(gl.int32) + 1) // 4
        vis_hi = gl.minimum(page_hi, gl.minimum(gl.cdiv(n_vis, 64), n_blk))
        out_row = out_ptr + s.to(gl.int64) * out_stride_s
        if gl.load(mode_ptr + s) == MODE:  # else the general scan scores this query
            # the query's blocks [HP, 32] (K contiguous, as an FP8 dot's shared operand must be), in
            # this kernel's K order: position 16p + 4j + i holds code 8j + 2i + p, which q8's order
            # (indexer_topk._fp8_query) keeps at 8j + 4p + i
            h = gl.arange(0, HP, layout=gl.SliceLayout(1, q_l))
            k = gl.arange(0, 32, layout=gl.SliceLayout(0, q_l))
            q_src = q8_ptr + s.to(gl.int64) * q8_stride_s + h[:, None] * 32 + (8 * ((k % 16) // 4) + 4 * (k // 16) + k % 4)[None, :]
            q_smem = gl.allocate_shared_memory(gl.float8e4nv, [NB, HP, 32], q_smem_l)
            for b in gl.static_range(NB):
                q_smem.index(b).store(gl.load(q_src + b * HP * 32))
            fence_async_shared()
            w8 = gl.load(w8_ptr + s * HP + gl.arange(0, HP, layout=gl.SliceLayout(0, acc_l)))
            table_row = table_ptr + s.to(gl.int64) * table_stride_s
            rows = gl.arange(0, ROWS, layout=row_l)
            zero = gl.zeros([ROWS, HP], gl.float32, acc_l)
            scales, blocks = _step_loads(rows_ptr, table_row, page_lo, vis_hi, n_blk, page_stride, row_stride, ROWS,
                                         row_l, word_l)
            for page in range(page_lo, vis_hi, 2):
                next_scales, next_blocks = _step_loads(rows_ptr, table_row, page + 2, vis_hi, n_blk, page_stride,
                                                       row_stride, ROWS, row_l, word_l)
                acc = zero
                for b in gl.static_range(NB):
                    # one block's exact sums (fresh accumulator), times the key's block scale
                    d = warpgroup_mma(_dot_operand(blocks[b], ROWS, a_l, raw3_l), q_smem.index(b).permute((1, 0)),
                                      zero, use_acc=False)
                    e = (scales >> (8 * b)) & 0xFF
                    acc = acc + d * gl.where(e == 0, 2.0**-127, (e << 23).to(gl.float32, bitcast=True))[:, None]
                # the score key as indexer_topk._keys_of forms it
                score = gl.sum(w8[None, :] * gl.maximum(acc, 0.0), axis=1)
                score = gl.where(score == 0.0, 0.0, score)
                bits = score.to(gl.int32, bitcast=True)
                ordered = gl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(gl.int64)
                col = page * 64 + rows
                key = gl.where(col < n_vis, ordered * 4294967296 + (2147483647 - col), SENTINEL_KEY)
                gl.store(out_row + col, key, mask=col < vis_hi * 64)
                scales, blocks = next_scales, next_blocks

        n = gl.arange(0, 64, layout=gl.BlockedLayout([1], [32], [_WARPS], [0]))
        for page in range(gl.maximum(vis_hi, page_lo), page_hi):
            gl.store(out_row + page * 64 + n, gl.full([64], SENTINEL_KEY, gl.int64, n.type.layout))


@functools.cache
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def usable(q8: torch.Tensor, index_rows: torch.Tensor) -> bool:
    """Whether this kernel runs the FP8 scan: a Hopper GPU with Gluon, Di = 128, and rows whose
    scale bytes can be read as 32-bit words (kv_layout.index_scales_as_words)."""
    return (gluon is not None and q8.is_cuda and _is_hopper(q8.device) and q8.shape[1] * 32 == DI
            and index_scales_as_words(index_rows, DI))


def scan_fp8(q8, w8, mode, positions, index_rows, table, out, n_cols: int, pages_per_prog: int, sentinel: int,
             fp8_mode: int) -> None:
    """Write the FP8 scan's keys into out [S, n_cols] for the queries whose mode is fp8_mode, and the
    sentinel of every invisible page (indexer_topk.index_score_keys checks the operands and splits
    each query's pages over programs, PROGRAMS_PER_SM per SM)."""
    S = q8.shape[0]
    n_pages = -(-n_cols // 64)
    ppp = pages_per_prog + pages_per_prog % 2  # whole steps of two pages
    _scan_kernel[(S, -(-n_pages // ppp))](
        q8, w8, mode, positions, index_rows, table, out, q8.stride(0), table.stride(0) if table.shape[0] > 1 else 0,
        index_rows.stride(0), out.stride(0), table.shape[1], n_cols, ppp, row_stride=index_rows.stride(1),
        HP=w8.shape[1], SENTINEL_KEY=sentinel, MODE=fp8_mode, num_warps=WARPS)
