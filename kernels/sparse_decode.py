"""Sparse MQA decode attention over compact paged keys (v4-architecture.md §2 step 5, §5, §9).

One decode query per batch row at position t attends, in one softmax with a per-head sink, over
  * its window: the keys of positions max(0, t-W+1)..t, read through its window's SWA pages
    (row b of swa_table: column j is the page of positions 64 (f + j) .. 64 (f + j) + 63, where
    f = max(0, t-W+1) // 64 is the query's first window page; W / 64 + 1 columns hold any
    window), and
  * compressed entries: for CSA the indexer's top-k (-1 = none), for HCA (hca_decode.py, same
    kernel) every entry e < (t+1)/ratio; both read through the request's block table.
All H query heads share every key (MQA), so a program loads a key tile once and multiplies it with
a [BLOCK_H, D] query tile on tensor cores. It does so in 64-column chunks (one FP8 scale block, or
the BF16 RoPE dims; main_rows.load_main_chunk): the query, the decoded tile and the output
accumulator are tuples of chunks, so a tile is decoded a chunk at a time and never holds the
float32 intermediates of all its columns at once.

The key list [window | compressed] is cut into splits of a fixed number of keys (by key index, so
a query's result never depends on the batch it shares a launch with). Each split program keeps an
online softmax (running max, sum, accumulator) over its keys; a query with more than one split
writes per-split partials that a second kernel merges with the sink. A query that fits in one
split is finished by the split kernel itself. On Hopper the split programs are a Gluon kernel
(split_attention_hopper.py, shared with hca_decode: its own split size, the same partials and
merge).

Numerics (same as mqa_ref.attend up to rounding order): scores and softmax in float32,
scaled by D**-0.5; keys decoded exactly to the query dtype; probabilities rounded to the query
dtype for P@V with a float32 accumulator. Differences from the reference: the reference rounds the
normalised probabilities, here the unnormalised exp(s - running max) are rounded and the sum is
divided at the end; with several splits the per-split outputs are stored in the query dtype.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from . import split_attention_hopper as hopper
from .dispatch import gluon_ran, use_triton
from .geometry import SWA_PAGE
from .main_rows import check_dims, load_main_chunk, reference as decode_rows_reference
from .mqa_ref import attend

log = logging.getLogger(__name__)

SPARSE_KEYS_PER_SPLIT = 256  # 128 window + 512 top-k = 640 keys -> 3 splits per query
# Hopper GPUs take the split programs in Gluon (split_attention_hopper.py, its own split size);
# False after a Gluon kernel failed to compile or launch here, or to run the Triton kernel there
HOPPER_SPARSE = True
MERGE_BLOCK_H, MERGE_BLOCK_D = 16, 64  # merge programs: 16 heads x 64 dims, so B=1 still gets H/16 * D/64
# Running-max start: finite, so an all-masked tile gives exp(-inf - NEG_INIT) = 0, not NaN.
NEG_INIT = tl.constexpr(-1.0e30)

# Launch shape on CUDA per kernel kind (SELECTED: CSA top-k, else HCA), fixed rather than
# autotuned: the heads per program and keys per tile change the result's rounding (measured on an
# H100), so an autotuner picking per process would let two decode replicas give one request
# different tokens. Both take all 64 heads and 128 keys per tile with 8 warps: the scores are
# formed keys x heads, so the two warp groups each take 64 keys (_attend_tile). H100, batch 32,
# `python -m load_tests.sweep_kernel_launch --only hca|csa`: HCA at 1M 0.31 ms (64 keys per tile
# 0.48, 32 keys 0.58; the kernel before the chunked tiles, 32 keys: 0.45); CSA 0.041 ms (16 heads
# x 16 keys, what it ran before: 0.25 ms). CSA splits of 256 keys: 0.041 ms at batch 32 against
# 0.051 with 128 (which wins at batch 1, 0.020 against 0.032 ms).
_GPU_LAUNCH = {
    True: dict(BLOCK_H=64, BLOCK_N=128, num_warps=8, num_stages=1),
    False: dict(BLOCK_H=64, BLOCK_N=128, num_warps=8, num_stages=1),
}
# float32 queries (tests and debugging: the model serves bf16) multiply on CUDA cores, where the
# bf16 shapes' 64 x 128 tiles are far slower than the small ones they ran before
_GPU_LAUNCH_F32 = {
    True: dict(BLOCK_H=16, BLOCK_N=16, num_warps=8, num_stages=1),
    False: dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=1),
}
INTERPRET_BLOCK_H, INTERPRET_BLOCK_N = 16, 32  # tl.dot needs >= 16 rows (fewer heads are masked); small tiles


@triton.jit
def _num_keys(t, n_comp, W: tl.constexpr, SELECTED: tl.constexpr, RATIO: tl.constexpr):
    """Length of query t's key list [window W | compressed]: every top-k slot, or the visible entries."""
    n = n_comp
    if not SELECTED:
        n = tl.minimum((t + 1) // RATIO, n_comp)
    return W + n


@triton.jit
def _split_size(n_keys, SPLIT: tl.constexpr, SHORT_KEYS: tl.constexpr, SHORT_SPLIT: tl.constexpr):
    """Keys per split of a query with n_keys keys: SHORT_SPLIT up to SHORT_KEYS keys, else SPLIT
    (a rule of the query's own length, so its result never depends on its batch)."""
    return tl.where(n_keys <= SHORT_KEYS, SHORT_SPLIT, SPLIT)


@triton.jit
def _attend_tile(qts, m_i, l_i, accs, base, row_off, valid, sm_scale, KEY: tl.constexpr, NOPE: tl.constexpr,
                 ROPE: tl.constexpr):
    """One online-softmax step over BLOCK_N keys (rows at base + row_off, invalid ones masked).

    Keys, transposed query and accumulator are tuples of 64-column chunks
    (main_rows.load_main_chunk). The scores are formed transposed, keys x heads (one dot per chunk
    chained into them): with the keys as the dot's M, the warps split the keys and nobody computes
    the same scores twice (a heads x keys dot at 64 heads and 8 warps gives every warp group all
    the scores, since they feed the next dot). PV adds one dot per chunk. Keys and probabilities
    are rounded to KEY (the query dtype) and handed to tl.dot in the query chunks' dtype: KEY on
    GPU, float32 in the interpreter (exact for bf16 values, see F32_DOT).
    """
    ks = ()
    st = tl.zeros([row_off.shape[0], qts[0].shape[1]], tl.float32)  # [keys, heads]
    for c in tl.static_range(len(qts)):
        k = load_main_chunk(base, row_off, valid, c, KEY, NOPE, ROPE).to(qts[c].dtype)
        ks = ks + (k,)
        st = tl.dot(k, qts[c], st, input_precision="ieee")
    st = tl.where(valid[:, None], st * sm_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(st, 0))
    alpha = tl.exp(m_i - m_new)
    pt = tl.exp(st - m_new[None, :])
    l_i = l_i * alpha + tl.sum(pt, 0)
    p = tl.trans(pt.to(KEY).to(qts[0].dtype))
    out = ()
    for c in tl.static_range(len(qts)):
        out = out + (tl.dot(p, ks[c], accs[c] * alpha[:, None], input_precision="ieee"),)
    return m_new, l_i, out


@triton.jit
def _split_attention(
    q_ptr, sink_ptr, pos_ptr, H, sm_scale,
    swa_ptr, swa_page_stride, swa_tab_ptr, swa_tab_stride,
    ent_ptr, ent_page_stride, blk_tab_ptr, blk_tab_stride, n_blk,
    topk_ptr, topk_stride, n_comp,
    out_ptr, part_o_ptr, part_ml_ptr, n_splits,
    W: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, PER_PAGE: tl.constexpr, RATIO: tl.constexpr,
    SELECTED: tl.constexpr, SPLIT: tl.constexpr, SHORT_KEYS: tl.constexpr, SHORT_SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, ROW_STRIDE: tl.constexpr, SWA_PAGE: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    # Head blocks vary fastest so the programs reading the same key tiles run together (L2 reuse).
    hb, sp, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = tl.load(pos_ptr + b).to(tl.int32)
    n_keys = _num_keys(t, n_comp, W, SELECTED, RATIO)
    split = _split_size(n_keys, SPLIT, SHORT_KEYS, SHORT_SPLIT)
    lo = sp * split
    if lo >= n_keys:
        return
    hi = tl.minimum(lo + split, n_keys)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    col = tl.arange(0, 64)
    D: tl.constexpr = NOPE + ROPE
    q_off = (b.to(tl.int64) * H + h)[:, None] * D + col[None, :]  # chunk c at q_off + 64c
    KEY = q_ptr.dtype.element_ty
    qts = ()  # the query's chunks transposed, [64, BLOCK_H]
    accs = ()
    for c in tl.static_range(D // 64):
        q = tl.load(q_ptr + q_off + c * 64, mask=h_ok[:, None], other=0.0)
        qts = qts + (tl.trans(q.to(tl.float32) if F32_DOT else q),)
        accs = accs + (tl.zeros([BLOCK_H, 64], tl.float32),)
    m_i = tl.full([BLOCK_H], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)

    # window slots [lo, min(hi, W)): slot i holds position t-W+1+i, in window page
    # p // SWA_PAGE - first of the query's table row
    w_hi = tl.minimum(hi, W)
    first = tl.maximum(t - (W - 1), 0) // SWA_PAGE
    for start in range(lo, w_hi, BLOCK_N):
        i = start + tl.arange(0, BLOCK_N)
        p = t - (W - 1) + i
        valid = (i < w_hi) & (p >= 0)
        page = tl.load(swa_tab_ptr + b.to(tl.int64) * swa_tab_stride + p // SWA_PAGE - first, mask=valid, other=0)
        row_off = page.to(tl.int64) * swa_page_stride + (p % SWA_PAGE) * ROW_STRIDE
        m_i, l_i, accs = _attend_tile(qts, m_i, l_i, accs, swa_ptr, row_off, valid, sm_scale, KEY, NOPE, ROPE)

    # compressed slots [max(lo, W), hi): slot W+j holds entry topk[j] (CSA) or entry j (HCA)
    for start in range(tl.maximum(lo, W), hi, BLOCK_N):
        j = start - W + tl.arange(0, BLOCK_N)
        valid = j < hi - W
        if SELECTED:
            e = tl.load(topk_ptr + b.to(tl.int64) * topk_stride + j, mask=valid, other=-1)
            valid = valid & (e >= 0) & (e < n_blk * PER_PAGE)
        else:
            e = j
        e = tl.where(valid, e, 0)
        page = tl.load(blk_tab_ptr + b.to(tl.int64) * blk_tab_stride + e // PER_PAGE, mask=valid, other=0)
        row_off = page.to(tl.int64) * ent_page_stride + (e % PER_PAGE) * ROW_STRIDE
        m_i, l_i, accs = _attend_tile(qts, m_i, l_i, accs, ent_ptr, row_off, valid, sm_scale, KEY, NOPE, ROPE)

    if n_keys <= split:
        # the only split: apply the sink (an extra logit that only adds to the denominator) here
        sink = tl.load(sink_ptr + h, mask=h_ok, other=0.0)
        mx = tl.maximum(m_i, sink)
        a = tl.exp(m_i - mx)
        norm = (a / (l_i * a + tl.exp(sink - mx)))[:, None]
        for c in tl.static_range(D // 64):
            tl.store(out_ptr + q_off + c * 64, (accs[c] * norm).to(out_ptr.dtype.element_ty), mask=h_ok[:, None])
    else:
        row = (b.to(tl.int64) * n_splits + sp) * H + h  # [B, n_splits, H] row of this split's partials
        inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)[:, None]
        part_o = part_o_ptr + row[:, None] * D + col[None, :]
        for c in tl.static_range(D // 64):
            tl.store(part_o + c * 64, (accs[c] * inv_l).to(part_o_ptr.dtype.element_ty), mask=h_ok[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=h_ok)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=h_ok)


@triton.jit
def _merge_splits(
    sink_ptr, pos_ptr, H, n_comp, out_ptr, part_o_ptr, part_ml_ptr, n_splits,
    W: tl.constexpr, D: tl.constexpr, RATIO: tl.constexpr, SELECTED: tl.constexpr, SPLIT: tl.constexpr,
    SHORT_KEYS: tl.constexpr, SHORT_SPLIT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """o = (sum_s l_s e^(m_s-M) o_s) / (sum_s l_s e^(m_s-M) + e^(sink-M)) over the query's splits."""
    hb, db, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = tl.load(pos_ptr + b).to(tl.int32)
    n_keys = _num_keys(t, n_comp, W, SELECTED, RATIO)
    used = tl.cdiv(n_keys, _split_size(n_keys, SPLIT, SHORT_KEYS, SHORT_SPLIT))
    if used <= 1:
        return
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    col = db * BLOCK_D + tl.arange(0, BLOCK_D)
    mx = tl.load(sink_ptr + h, mask=h_ok, other=0.0)
    denom = tl.full([BLOCK_H], 1.0, tl.float32)  # e^(sink - mx) with mx = sink
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for sp in range(0, used):
        row = (b.to(tl.int64) * n_splits + sp) * H + h
        m_s = tl.load(part_ml_ptr + row * 2, mask=h_ok, other=NEG_INIT)
        l_s = tl.load(part_ml_ptr + row * 2 + 1, mask=h_ok, other=0.0)
        o_s = tl.load(part_o_ptr + row[:, None] * D + col[None, :], mask=h_ok[:, None], other=0.0).to(tl.float32)
        m_new = tl.maximum(mx, m_s)
        alpha = tl.exp(mx - m_new)
        w = l_s * tl.exp(m_s - m_new)
        denom = denom * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        mx = m_new
    out = out_ptr + (b.to(tl.int64) * H + h)[:, None] * D + col[None, :]
    tl.store(out, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=h_ok[:, None])


def launch_split_attention(q, sink, swa, swa_table, positions, entries, block_table, topk,
                           window: int, nope_dim: int, ratio: int, keys_per_split: int,
                           short_query: tuple[int, int] = (0, 0), split_kernel=None) -> torch.Tensor | None:
    """Shared launcher of sparse_mqa_decode (topk given) and hca_decode (topk None: all visible).

    Queries are cut into splits of keys_per_split keys, or of short_query[1] keys where they have
    at most short_query[0] keys (more programs for a query that would have few; by the query's own
    length, so results do not depend on the batch).

    split_kernel(args, consts, n_splits, B) -> bool, if given, runs the split programs in place of
    `_split_attention` (same arguments and partials; hca_decode's Gluon kernel on Hopper, which
    checks keys_per_split against its own tile) and says whether it did; the merge is shared.
    Where it did not, nothing ran and None is returned: the caller launches again without it."""
    B, H, D = q.shape
    check_dims(D, nope_dim, entries.shape[-1])
    if swa.shape[-1] != entries.shape[-1] or swa.shape[1] != SWA_PAGE:
        raise ValueError(f"swa pages {list(swa.shape)} do not match entry rows {list(entries.shape)}")
    if swa.stride(-1) != 1 or entries.stride(-1) != 1 or swa.stride(1) != entries.stride(1):
        raise ValueError(f"swa {swa.stride()} and entries {entries.stride()} need contiguous rows of one stride")
    launch = (_GPU_LAUNCH if q.dtype != torch.float32 else _GPU_LAUNCH_F32)[topk is not None]
    if not q.is_cuda:  # the interpreter: small tiles, so the CPU tests can cut splits small
        launch = dict(BLOCK_H=INTERPRET_BLOCK_H, BLOCK_N=INTERPRET_BLOCK_N)
    if split_kernel is None and keys_per_split % launch["BLOCK_N"]:
        raise ValueError(f"keys_per_split {keys_per_split} is not a multiple of the tile {launch['BLOCK_N']}")
    q = q.contiguous()
    sink = sink.float().contiguous()
    positions = positions.contiguous()
    swa_table, block_table = swa_table.to(torch.int32).contiguous(), block_table.to(torch.int32).contiguous()
    selected = topk is not None
    per_page = entries.shape[1]
    if selected:
        topk = topk.to(torch.int32).contiguous()
        n_comp = topk.shape[1]
    else:
        topk = block_table  # never read
        n_comp = block_table.shape[1] * per_page
    short_keys, short_split = short_query
    n_splits = triton.cdiv(window + n_comp, keys_per_split)
    if short_keys:
        n_splits = max(n_splits, triton.cdiv(min(window + n_comp, short_keys), short_split))
    out = torch.empty_like(q)
    if B == 0:
        return out
    # partials only exist for queries longer than one split; with one split nothing writes them
    n_part = n_splits if n_splits > 1 else 0
    part_o = torch.empty(B, n_part, H, D, dtype=q.dtype, device=q.device)
    part_ml = torch.empty(B, n_part, H, 2, dtype=torch.float32, device=q.device)
    common = dict(W=window, RATIO=ratio, SELECTED=selected, SPLIT=keys_per_split, SHORT_KEYS=short_keys,
                  SHORT_SPLIT=short_split or keys_per_split)
    args = (q, sink, positions, H, D**-0.5,
            swa, swa.stride(0), swa_table, swa_table.stride(0),
            entries, entries.stride(0), block_table, block_table.stride(0), block_table.shape[1],
            topk, topk.stride(0), n_comp, out, part_o, part_ml, n_splits)
    consts = dict(common, NOPE=nope_dim, ROPE=D - nope_dim, PER_PAGE=per_page, SWA_PAGE=SWA_PAGE,
                  # a compile-time row stride lets Triton see 8-byte aligned rows (584 = 8 * 73) and
                  # vectorise the code and RoPE loads; a runtime one leaves them byte by byte
                  ROW_STRIDE=entries.stride(1),
                  # the interpreter's tl.dot multiplies bf16 bit patterns as integers; float32
                  # operands holding the same bf16 values give what a bf16 tensor-core dot gives
                  F32_DOT=not q.is_cuda)
    if split_kernel is None:
        _split_attention[(triton.cdiv(H, launch["BLOCK_H"]), n_splits, B)](*args, **consts, **launch)
    elif not split_kernel(args, consts, n_splits, B):
        return None
    if n_splits > 1:
        _merge_splits[(triton.cdiv(H, MERGE_BLOCK_H), D // MERGE_BLOCK_D, B)](
            sink, positions, H, n_comp, out, part_o, part_ml, n_splits, D=D, BLOCK_H=MERGE_BLOCK_H,
            BLOCK_D=MERGE_BLOCK_D, **common)
    return out


def gather_reference(q, sink, swa, swa_table, positions, entries, block_table, entry_ids, entry_valid,
                     window: int, nope_dim: int) -> torch.Tensor:
    """Decode each query's key list [window | entries entry_ids [B, n]] and call attend."""
    B, H, D = q.shape
    per_page = entries.shape[1]
    pos = positions.long()[:, None] - (window - 1) + torch.arange(window, device=q.device)[None, :]
    win_valid = pos >= 0
    pos = pos.clamp(min=0)
    first = (positions.long() - (window - 1)).clamp(min=0) // SWA_PAGE
    win_pages = torch.gather(swa_table.long(), 1, pos // SWA_PAGE - first[:, None])
    e = entry_ids.long().clamp(min=0)
    ent_pages = torch.gather(block_table.long(), 1, e // per_page)
    rows = torch.cat([swa[win_pages, pos % SWA_PAGE], entries[ent_pages, e % per_page]], dim=1)
    keys = decode_rows_reference(rows, D, nope_dim, q.dtype)
    return attend(q, keys, torch.cat([win_valid, entry_valid], dim=1), sink)


def reference(q, sink, swa, swa_table, positions, entries, block_table, topk, window: int, nope_dim: int):
    return gather_reference(q, sink, swa, swa_table, positions, entries, block_table, topk, topk >= 0,
                            window, nope_dim)


def sparse_mqa_decode(q: torch.Tensor, sink: torch.Tensor, swa: torch.Tensor, swa_table: torch.Tensor,
                      positions: torch.Tensor, entries: torch.Tensor, block_table: torch.Tensor,
                      topk: torch.Tensor, window: int, nope_dim: int) -> torch.Tensor:
    """CSA decode attention: q [B, H, D] at positions [B] over its window and its top-k entries.

    sink [H] float32; swa [P_swa, 64, row_bytes] uint8 (pools.swa[:, layer]) with swa_table
    [B, n_win] the page ids of each query's window pages (module docstring); entries [P_blk, 64, row_bytes] uint8
    (pools.csa_main[:, slot]) with block_table [B, n_blk]; topk [B, K] entry indices, -1 = none.
    Returns [B, H, D] in q.dtype. Keys are decoded to q.dtype.
    """
    if not use_triton(q):
        return reference(q, sink, swa, swa_table, positions, entries, block_table, topk, window, nope_dim)
    common = (q, sink, swa, swa_table, positions, entries, block_table, topk, window, nope_dim, 1)
    return dispatch_split_attention(common, HOPPER_SPARSE, dict(keys_per_split=hopper.SPARSE_KEYS_PER_SPLIT),
                                    _hopper_split, SPARSE_KEYS_PER_SPLIT)


def dispatch_split_attention(common: tuple, gluon: bool, gluon_splits: dict, gluon_split_kernel,
                             keys_per_split: int) -> torch.Tensor:
    """launch_split_attention(*common) through Hopper's Gluon split programs (split_attention_hopper.py,
    with gluon_splits) where `gluon` is on and they take these shapes, else through the Triton
    kernel with keys_per_split (also where the Gluon kernel turned out not to run here)."""
    q, swa, entries, window, nope_dim = common[0], common[2], common[5], common[8], common[9]
    if gluon and hopper.usable(q, swa, entries, window, nope_dim):
        out = launch_split_attention(*common, **gluon_splits, split_kernel=gluon_split_kernel)
        if out is not None:  # else the Gluon kernel could not run here: the Triton one, with its splits
            return out
    return launch_split_attention(*common, keys_per_split=keys_per_split)


def _hopper_split(args, consts, n_splits: int, batch: int) -> bool:
    """Run the Gluon split programs; False, and the Triton ones from then on, where this Triton
    cannot compile or launch them (dispatch.gluon_ran)."""
    global HOPPER_SPARSE
    HOPPER_SPARSE = gluon_ran(lambda: hopper.launch(args, consts, n_splits, batch), "CSA decode kernel", "kernel",
                              log)
    return HOPPER_SPARSE


def decode_traffic(B: int, context: int, heads: int = 64, head_dim: int = 512, row_bytes: int = 584,
                   topk: int = 512, window: int = 128, ratio: int = 4, q_bytes: int = 2) -> tuple[int, int]:
    """(bytes read and written, FLOPs) of one call for B queries at position context-1.

    Bytes: every attended key row once, the top-k indices, q in and out in q's dtype; the split
    partials are the kernel's own overhead and are not counted. FLOPs: QK and PV, 2*H*D each per key.
    """
    n_sel = min(topk, context // ratio)
    keys = window + n_sel
    moved = B * (keys * row_bytes + topk * 4 + 2 * heads * head_dim * q_bytes)
    return moved, B * 4 * heads * head_dim * keys
