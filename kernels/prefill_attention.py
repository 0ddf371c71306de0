"""Attention of one request's prefill chunk: every query over its window band plus compressed
entries, one softmax with the per-head sink (v4-architecture.md §2 step 5, §5).

Inputs are decoded keys in the model dtype, as the model's attention holds them during a
prefill: `window_keys` [E, D] are the stored window tail followed by the chunk's own keys, and
query i's window is window_keys[base + i : base + i + window] (ext indices below 0 are before
position 0: invalid). Compressed entries [n, D] are then, per query at position t,
  CSA  entries[topk[i, j]] for every topk[i, j] >= 0 (the indexer's picks),
  HCA  entries[0 : (t + 1) // 128] (every visible one),
  SWA  none.

The kernel runs one program per (query, block of heads): MQA, so the BLOCK_H query rows of a
program share each key tile it loads, and the programs of one query run next to each other and
share the tile through L2. Softmax is online (running max and sum per head); the sink starts the
running sum as a key of logit `sink` and value 0, so it needs no extra pass. Each program reads
only its own query's keys in a fixed order, so a query's output does not depend on the chunk it
is in.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dispatch import use_triton
from .geometry import CSA, HCA, SWA
from .mqa_ref import QUERY_BLOCK, attend_window_and_entries

MODES = {SWA: 0, CSA: 1, HCA: 2}  # which compressed entries a query sees (kernel constexpr)


def prefill_attention(q: torch.Tensor, sink: torch.Tensor, window_keys: torch.Tensor, base: int,
                      entries: torch.Tensor | None, topk: torch.Tensor | None, positions: torch.Tensor,
                      ratio: int, window: int) -> torch.Tensor:
    """q [S, H, D], sink [H] float32, window_keys [E, D], entries [n, D] (CSA/HCA), topk [S, K]
    int32/int64 entry indices with -1 for none (CSA), positions [S] -> [S, H, D] in q's dtype."""
    if use_triton(q):
        return prefill_attention_triton(q, sink, window_keys, base, entries, topk, positions, ratio, window)
    return reference(q, sink, window_keys, base, entries, topk, positions, ratio, window)


def reference(q, sink, window_keys, base, entries, topk, positions, ratio, window) -> torch.Tensor:
    """What the model's reference path computes: per-query key lists, `mqa_ref.attend`."""
    S = q.shape[0]
    out = torch.empty_like(q)
    for b in range(0, S, QUERY_BLOCK):
        blk = torch.arange(b, min(S, b + QUERY_BLOCK), device=q.device)
        idx = base + blk[:, None] + torch.arange(window, device=q.device)[None, :]
        win_keys, win_valid = window_keys[idx.clamp(min=0)], idx >= 0
        picked = topk[blk].long() if ratio == CSA else None
        out[blk] = attend_window_and_entries(q[blk], positions[blk], win_keys, win_valid, entries, picked, ratio, sink)
    return out


def interpreted() -> bool:
    """Triton's interpreter (3.9) multiplies bf16 dot operands as raw integers; it gets float32
    operands instead (the same values: see _prefill_kernel)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def prefill_attention_triton(q, sink, window_keys, base, entries, topk, positions, ratio, window) -> torch.Tensor:
    S, H, D = q.shape
    if S == 0:
        return torch.empty_like(q)
    if ratio not in MODES:
        raise ValueError(f"compress ratio must be one of {sorted(MODES)}, got {ratio}")
    if window_keys.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and window_keys need a contiguous last dim")
    if entries is None or entries.shape[0] == 0 or ratio == SWA:
        entries = window_keys[:1]  # never read: every compressed slot is masked or absent
    if entries.dtype != window_keys.dtype:
        raise ValueError(f"entries are {entries.dtype}, window keys {window_keys.dtype}: the kernel reads both as one type")
    entries = entries.contiguous()
    topk = (topk if ratio == CSA else positions.new_full((S, 1), -1)).to(torch.int32).contiguous()
    positions = positions.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    BLOCK_D = triton.next_power_of_2(D)
    # [BLOCK_H, BLOCK_D] float32 accumulator per program: 32 x 512 is 64 KiB of registers (8 warps)
    BLOCK_H = max(16, min(triton.next_power_of_2(H), 32 if BLOCK_D >= 256 else 64))
    BLOCK_N = 32 if BLOCK_D >= 256 else 64
    if window % BLOCK_N:
        raise ValueError(f"window {window} is not a multiple of the key tile {BLOCK_N}")
    n_hb = triton.cdiv(H, BLOCK_H)
    _prefill_kernel[(S * n_hb,)](
        q, out, window_keys, entries, topk, positions, sink,
        H, D, base, window_keys.shape[0], topk.shape[1], n_hb,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), window_keys.stride(0), entries.stride(0),
        topk.stride(0), D**-0.5, ratio,
        WINDOW=window, MODE=MODES[ratio], BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        F32_DOT=q.dtype == torch.float32 or interpreted(), num_warps=8 if BLOCK_H * BLOCK_D >= 32 * 512 else 4,
        num_stages=2,  # a [32, 512] bf16 key tile is 32 KiB of shared memory per stage
    )
    return out


@triton.jit
def _prefill_kernel(q_ptr, o_ptr, win_ptr, ent_ptr, topk_ptr, pos_ptr, sink_ptr,
                    H, D, base, n_ext, K, n_hb,
                    sq_s, sq_h, so_s, so_h, s_win, s_ent, s_topk, scale, ratio,
                    WINDOW: tl.constexpr, MODE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """Key slot j of query i: j < WINDOW is ext row base+i+j, then compressed slot j-WINDOW (a top-k
    pick or an entry index). WINDOW is a multiple of BLOCK_N, so a tile is all window or all entries.

    Probabilities are rounded to the key dtype for PV, as the reference does. F32_DOT runs both
    products in float32 on the same (already rounded) operands: exact products, so the same
    numerics as a bf16 dot with float32 accumulation."""
    pid = tl.program_id(0)
    i = (pid // n_hb).to(tl.int64)  # query; its head blocks are consecutive programs
    heads = (pid % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    qmask = hmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + i * sq_s + heads[:, None] * sq_h + d[None, :], mask=qmask, other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
    # the sink as the first key: logit sink[h], weight exp(0) = 1, value 0
    m = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32)
    l = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)

    n_comp = 0
    if MODE == 1:
        n_comp = K
    if MODE == 2:
        n_comp = ((tl.load(pos_ptr + i) + 1) // ratio).to(tl.int32)
    for j0 in range(0, WINDOW + n_comp, BLOCK_N):
        if j0 < WINDOW:
            idx = base + i + j0 + n
            valid = (idx >= 0) & (idx < n_ext)
            rows = win_ptr + idx * s_win
        else:
            c = j0 - WINDOW + n
            if MODE == 1:
                e = tl.load(topk_ptr + i * s_topk + c, mask=c < K, other=-1).to(tl.int64)
                valid = e >= 0
            else:
                e = c.to(tl.int64)
                valid = e < n_comp
            rows = ent_ptr + e * s_ent
        k = tl.load(rows[:, None] + d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
        if F32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None]).to(k.dtype)
        l = l * alpha + tl.sum(p.to(tl.float32), axis=1)
        if F32_DOT:
            pv = tl.dot(p.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p, k)
        acc = acc * alpha[:, None] + pv
        m = m_new

    o = acc / l[:, None]
    tl.store(o_ptr + i * so_s + heads[:, None] * so_h + d[None, :], o.to(o_ptr.dtype.element_ty), mask=qmask)
