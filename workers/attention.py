"""V4 attention (v4-architecture.md §2, §5): low-rank query with an unweighted per-head RMSNorm,
one shared K=V head, partial interleaved RoPE, one softmax over the sliding window plus the
layer's compressed entries (top-k by the indexer for CSA, all visible for HCA) with a per-head
sink, inverse RoPE on the output, grouped low-rank output projection.

Each query attends over its own fixed-shape key list [window W slots | compressed slots] so its
result does not depend on which other queries share the call.

Two paths compute the same thing. The reference (pure torch, any device and state) decodes keys,
gathers per-query key lists and attends with kernels/mqa_ref.py. The kernel path (kernels/, when
Triton runs and every state is paged in the compact layout) sends all decode rows of the batch
through one call per layer that reads FP8/FP4 rows straight from the pages through int32 tables
(workers/page_tables.py), and each prefill segment through the chunk attention kernel.
Compressors and state updates are shared.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.dispatch import use_triton
from kernels.mqa_ref import QUERY_BLOCK, attend_window_and_entries
from kernels.numerics import grouped_linear

from .compressor import Compressor, round_main_key
from .config import CSA, HCA, SWA, ModelConfig
from .decode_graphs import DecodeGraphs, attention_rows, bucket
from .host_index import to_device
from .indexer import Indexer
from .modules import Norm, Proj, f32_param, rms_norm
from .page_tables import DecodeTables, block_row, decode_tables, width_bucket
from .paged_state import (PLAN_CLOSING, PLAN_INDEX, PLAN_OPEN, PagedLayerState, advance_compressors,
                          append_decode_entries, append_open_rows, close_windows, compress_plan, planned_windows,
                          push_decode_keys, write_open_rows, write_planned_entries)
from .rope import apply_rope, cos_sin, inv_freq
from .state import CompressorState, LayerState, empty_compressor

INDEX_QUERY_BLOCK = 512  # prefill queries per indexer kernel call (kernel path)


@dataclass
class Segment:
    """Rows [row, row+length) of the flat token batch belong to one request starting at `start`."""

    row: int
    length: int
    start: int
    replay_end: int | None = None  # entries below this position exist already (prefix-cache replay)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.layer, self.ratio = cfg, layer, cfg.compress_ratios[layer]
        H, D = cfg.num_attention_heads, cfg.head_dim
        self.wq_a = Proj(cfg.hidden_size, cfg.q_lora_rank, dtype)
        self.q_norm = Norm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Proj(cfg.q_lora_rank, H * D, dtype)
        self.wkv = Proj(cfg.hidden_size, D, dtype)
        self.kv_norm = Norm(D, cfg.rms_norm_eps)
        self.wo_a = Proj(H * D // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, dtype)
        self.wo_b = Proj(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, dtype)
        self.attn_sink = f32_param(H)
        if self.ratio != SWA:
            self.compressor = Compressor(cfg.hidden_size, D, self.ratio, cfg.rms_norm_eps)
        if self.ratio == CSA:
            self.indexer = Indexer(cfg, dtype)
        self.register_buffer("freqs", inv_freq(cfg, self.ratio != SWA), persistent=False)

    # No forward(): a block calls prepare -> attend_states -> output, so that the first and last
    # can be recorded in a decode step's CUDA graphs (model.Block.forward).

    def prepare(self, x: torch.Tensor, positions: torch.Tensor, rounding: bool) -> dict:
        """Everything computed per token before the state is touched: rotary angles, queries, the
        new main keys, indexer queries and compressor projections. Row by row, no host sync: a
        decode step captures it in a CUDA graph (workers/decode_graphs.py)."""
        cfg = self.cfg
        H, D = cfg.num_attention_heads, cfg.head_dim
        cos, sin = cos_sin(self.freqs, positions)
        qr = self.q_norm(self.wq_a(x))
        q = rms_norm(self.wq_b(qr).view(-1, H, D), None, cfg.rms_norm_eps)
        q = apply_rope(q, cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        if rounding:
            kv = round_main_key(kv, cfg.nope_head_dim)
        index_queries = None
        if self.ratio == CSA:
            index_queries = self.indexer.queries(qr, x, cos, sin, rounding)
            # the scan's operands too, inside a decode step's graph rather than per call; for one
            # query block at most (a long chunk's operands would take 768 B per head per token)
            if use_triton(x) and x.shape[0] <= INDEX_QUERY_BLOCK:
                from kernels.indexer_topk import query_operands

                index_queries = (*index_queries, *query_operands(*index_queries))
        return {"cos": cos, "sin": sin, "q": q, "kv": kv, "index_queries": index_queries,
                "projected": self._project(x, positions)}

    def output(self, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output [N, H, D] -> [N, d]: inverse RoPE, grouped low-rank projection."""
        return self.wo_b(self._grouped_out(apply_rope(out, cos, sin, inverse=True)))

    def attend_states(self, x: torch.Tensor, positions: torch.Tensor, segments: list[Segment], states: list[LayerState],
                      rounding: bool, p: dict, graphs: DecodeGraphs | None = None) -> torch.Tensor:
        """The state-dependent part: append each request's keys and compressed entries to its
        state and attend over it -> [N, H, D]. Rows of x beyond the segments (a graphed step's
        padding) come out 0. With `graphs`, entries of windows that close are finished in a
        graph (_finish_closing)."""
        cfg = self.cfg
        q, kv, index_queries, projected = p["q"], p["kv"], p["index_queries"], p["projected"]
        # Kernels read the compact pages directly: every decode row of the batch goes in one call.
        kernel_path = use_kernels(x, states)
        decode_rows, decode_segs, decode_states = [], [], []
        covered = sum(seg.length for seg in segments)
        out = torch.empty_like(q) if covered == q.shape[0] else torch.zeros_like(q)
        for seg, ls in zip(segments, states, strict=True):
            rows = slice(seg.row, seg.row + seg.length)
            if kernel_path and seg.length == 1 and whole_window_stored(ls, seg.start, cfg.sliding_window):
                decode_rows.append(seg.row)  # written and attended below, all decode rows at once
                decode_segs.append(seg)
                decode_states.append(ls)
                continue
            ext, base = self._extend_window(kv[rows], ls)
            self._compress(x, seg, ls, rounding, kv.dtype, projected, rows)
            if kernel_path:
                iqw = tuple(t[rows] for t in index_queries) if self.ratio == CSA else None
                out[rows] = self._prefill_kernels(q[rows], positions[rows], ext, base, ls, iqw)
                continue
            for b in range(0, seg.length, QUERY_BLOCK):
                blk = torch.arange(b, min(seg.length, b + QUERY_BLOCK), device=x.device)
                flat = blk + seg.row
                idx = base + blk[:, None] + torch.arange(cfg.sliding_window, device=x.device)[None, :]
                win_keys, win_valid = ext[idx.clamp(min=0)], idx >= 0
                out[flat] = self._attend(q[flat], positions[flat], win_keys, win_valid, ls,
                                         tuple(t[flat] for t in index_queries) if self.ratio == CSA else None)
        if decode_rows:
            # a decode step's rows are 0..n-1: views instead of gathers and scatters
            lo, hi = decode_rows[0], decode_rows[-1] + 1
            contiguous = hi - lo == len(decode_rows)
            flat = slice(lo, hi) if contiguous else to_device(decode_rows, x.device)
            if graphs is not None and len(decode_rows) == len(segments) and self._plannable(decode_segs, decode_states):
                return self._decode_piece(q, kv, index_queries, projected, decode_states, rounding, graphs)
            push_decode_keys(decode_states, kv[flat])  # each page holds its query's own key now
            self._compress_decode_rows(x, decode_rows, flat, decode_segs, decode_states, rounding, kv.dtype, projected,
                                       graphs)
            iqw = tuple(t[flat] for t in index_queries) if self.ratio == CSA else None
            t = decode_tables([s.req for s in decode_states], self.cfg.sliding_window, q.device)
            out[flat] = self._decode_kernels(q[flat], decode_states[0], t, iqw)
        return out

    def _plannable(self, segs: list[Segment], states: list[PagedLayerState]) -> bool:
        """Can every row's compressor update run in a graphed step's piece (compress_plan)? Not a
        prefix-cache replay's token, nor one closing CSA window 0 (no overlap to pool with): those
        go through the compressor alone (_compress_decode_rows), and the step's layer eagerly."""
        return all(seg.replay_end is None for seg in segs) and all(
            not comp.overlap or ls.compressors[family].has_overlap or ls.compressors[family].n_open + 1 < comp.ratio
            for family, comp in self._compressors() for ls in states)

    def _decode_piece(self, q, kv, index_queries, projected: dict, states: list[PagedLayerState], rounding: bool,
                      graphs: DecodeGraphs) -> torch.Tensor:
        """A graphed step's state updates and decode kernels, as one piece over all the bucket's
        rows: every compressor's update (compress_plan), the window keys, then the kernels (the
        padding rows, at position -1, come out 0). Its tables have fixed shapes (page_tables.py),
        so it is recorded once per bucket and table width and replayed at every position; it
        reads and writes the pools where they were when it was recorded, so their serial is part
        of its name. The host then only moves its counters (advance_compressors)."""
        ls, reqs, rows = states[0], [s.req for s in states], attention_rows(len(states))
        pools, families = ls.req.pools, self._compressors()
        width = width_bucket(max(len(r.blocks) for r in reqs))
        # staged once per step into buffers every layer's graph reads in place
        t = decode_tables(reqs, self.cfg.sliding_window, q.device, rows=rows, width=width,
                          stage=functools.partial(graphs.stage, "decode_tables"))
        tables = (*graphs.fixed("block_table", (t.block_table,)), *t.tensors()[1:])
        iq = tuple(index_queries) if self.ratio == CSA else ()
        args = [q, kv, *iq, *tables, *(p for family, _ in families for p in projected[family])]
        closes = False  # does a window close in the step? If not, the piece only appends (a variant of its own)
        if families:  # one copy for the layer's plans
            plans = [r for family, _ in families for r in compress_plan(states, family, rows)]
            closes = any(any(r) for r in plans[PLAN_CLOSING :: PLAN_CLOSING + 1])
            args += graphs.stage("compress_plans", plans, torch.long, q.device,
                                 lambda buf: (buf.view(len(families), PLAN_CLOSING + 1, rows),))

        def piece(q_all, kv, *rest):
            # the graphs' inputs have the step's bucket of rows, the kernels run on the first `rows`
            n_iq = len(iq)
            block_table, swa_table, positions, win_page, win_offset, win_source = rest[n_iq : n_iq + 6]
            proj = rest[n_iq + 6 : n_iq + 6 + 2 * len(families)]
            q, index_queries = q_all[:rows], tuple(t[:rows] for t in rest[:n_iq])
            for f, (family, comp) in enumerate(families):
                plan, slot = rest[-1][f], ls.compressors[family]
                write_open_rows(pools.comp, plan[PLAN_OPEN], proj[2 * f][win_source], proj[2 * f + 1][win_source],
                                slot)
                if closes:
                    windows = planned_windows(pools.comp, plan, slot)
                    entries = comp.finish(comp.pool_closing(*windows), plan[PLAN_INDEX], self.freqs,
                                          family if rounding else None)
                    write_planned_entries(ls, family, plan, entries.to(kv.dtype))
            # the padding rows write row 0's key again, to row 0's place: the same bytes
            pools.swa[win_page, ls.layer, win_offset] = pools.encode_main(kv[win_source])
            out = torch.zeros_like(q_all)
            out[:rows] = self._decode_kernels(q, ls, DecodeTables(block_table, swa_table, positions),
                                              index_queries or None)
            return out

        def no_window_closes(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            # the warm-up before recording must not move an overlap: the real run pools with it
            plan = inputs[-1].clone()
            plan[:, PLAN_CLOSING] = 0
            return inputs[:-1] + [plan]

        out = graphs.run(f"layer{self.layer}.decode{'.closing' * closes}.rounding{int(rounding)}.pools{pools.serial}",
                         piece, *args, warmup_args=no_window_closes if closes else None)
        for family, _ in families:
            advance_compressors(states, family)
        return out

    def _compressors(self) -> list[tuple[str, Compressor]]:
        """(family, compressor) of this layer: main entries (CSA, HCA), indexer keys (CSA)."""
        out = [("main", self.compressor)] if self.ratio != SWA else []
        if self.ratio == CSA:
            out.append(("index", self.indexer.compressor))
        return out

    def _project(self, x: torch.Tensor, positions: torch.Tensor) -> dict:
        """Every compressor's projections of all the forward's tokens, per family: two matmuls per
        compressor per forward, not per request. The float32 copy of x is made once for all of
        them (project's own conversion is then a no-op): 7 fewer kernels per flash-attn step."""
        comps = self._compressors()
        xf = x.float() if comps else x
        return {family: comp.project(xf, positions) for family, comp in comps}

    def _compress(self, x: torch.Tensor, seg: Segment, ls: LayerState, rounding: bool, dtype: torch.dtype,
                  projected: dict, rows: slice) -> None:
        """Feed the segment's tokens (their rows of `projected`) to the layer's compressors;
        append the entries that closed."""
        for family, comp in self._compressors():
            self._compress_family(family, comp, x, seg, ls, rounding, dtype, projected, rows)

    def _compress_family(self, family: str, comp: Compressor, x: torch.Tensor, seg: Segment, ls: LayerState,
                         rounding: bool, dtype: torch.dtype, projected: dict, rows: slice) -> None:
        if seg.replay_end is None:
            kv, score = projected[family]
            new = comp(x[rows], seg.start, ls.compressors[family], self.freqs, family if rounding else None,
                       projected=(kv[rows], score[rows]))
            ls.append_entries(family, new.to(dtype))
        elif seg.start + seg.length == seg.replay_end:
            ls.compressors[family].copy_from(replayed_compressor_state(comp, x[rows], seg.start, self.freqs))

    def _compress_decode_rows(self, x: torch.Tensor, rows: list[int], flat: torch.Tensor | slice, segs: list[Segment],
                              states: list[PagedLayerState], rounding: bool, dtype: torch.dtype,
                              projected: dict, graphs: DecodeGraphs | None = None) -> None:
        """_compress for one token per request (the kernel path's decode rows `rows`, also as
        `flat`: their device index, or a slice where they are contiguous), batched over the
        requests: tokens that leave their compressor's window open are appended in one write (3
        steps in 4 for CSA, 127 in 128 for HCA); tokens that close one are pooled, finished and
        appended as entries together. A replayed token, or one closing CSA window 0 (no overlap
        yet), goes through the compressor alone."""
        comp_pool = states[0].req.pools.comp

        def on_device(picked: list[int]) -> torch.Tensor | slice:  # rows of x for the picked requests
            return flat if len(picked) == len(rows) else to_device([rows[i] for i in picked], x.device)

        for family, comp in self._compressors():
            kv, score = projected[family]
            opened, closing, alone = [], [], []
            for i, (seg, ls) in enumerate(zip(segs, states)):
                sc = ls.compressors[family]
                if seg.replay_end is not None:
                    alone.append(i)
                elif sc.n_open + 1 < comp.ratio:
                    opened.append(i)
                elif not comp.overlap or sc.has_overlap:
                    closing.append(i)
                else:
                    alone.append(i)
            if opened:
                idx = on_device(opened)
                append_open_rows(comp_pool, [states[i].compressors[family] for i in opened], kv[idx], score[idx])
            if closing:
                idx = on_device(closing)
                windows = close_windows(comp_pool, [states[i].compressors[family] for i in closing], kv[idx], score[idx])
                entries = self._finish_closing(family, comp, comp.pool_closing(*windows),
                                               to_device([segs[i].start // comp.ratio for i in closing], x.device),
                                               rounding, dtype, graphs)
                append_decode_entries([states[i] for i in closing], family, entries)
            for i in alone:
                self._compress_family(family, comp, x, segs[i], states[i], rounding, dtype, projected,
                                      slice(rows[i], rows[i] + 1))

    def _finish_closing(self, family: str, comp: Compressor, pooled: torch.Tensor, windows: torch.Tensor,
                        rounding: bool, dtype: torch.dtype, graphs: DecodeGraphs | None) -> torch.Tensor:
        """Compressor.finish of the pooled rows of closing windows -> entries in `dtype`. In a
        graphed step through a graph (RMSNorm, RoPE and the key rounding are about 40 operations,
        over 100 with the indexer's Hadamard and FP4), rows padded to a bucket like the step's."""
        def finish(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return comp.finish(p, w, self.freqs, family if rounding else None).to(dtype)

        n = pooled.shape[0]
        if graphs is None:
            return finish(pooled, windows)
        pad = bucket(n) - n  # n <= the step's rows, which fit a bucket
        return graphs.run(f"layer{self.layer}.{family}.finish.rounding{int(rounding)}", finish,
                          F.pad(pooled, (0, 0, 0, pad)), F.pad(windows, (0, pad)))[:n]

    def _extend_window(self, kv: torch.Tensor, ls: LayerState) -> tuple[torch.Tensor, int]:
        """Keys [stored tail | new] and the ext index of query 0's oldest window slot (may be < 0).

        Query i's window is ext[base + i : base + i + W]; slots before position 0 are invalid.
        Advances the stored tail to the last W-1 keys.
        """
        W = self.cfg.sliding_window
        prev = ls.window()
        ext = torch.cat([prev, kv])
        ls.push_window(kv, W)
        return ext, prev.shape[0] - (W - 1)

    def _attend(self, q, pos, win_keys, win_valid, ls: LayerState, index_queries) -> torch.Tensor:
        entries = ls.entries("main") if self.ratio != SWA else None
        picked = None
        if self.ratio == CSA:
            iq, iw = index_queries[:2]
            picked = self.indexer.select(iq, iw, ls.entries("index"), pos)
        return attend_window_and_entries(q, pos, win_keys, win_valid, entries, picked, self.ratio, self.attn_sink)

    def _prefill_kernels(self, q, pos, ext, base, ls: PagedLayerState, index_queries) -> torch.Tensor:
        """A prefill segment through the kernels: indexer top-k read from the FP4 pages (CSA),
        then chunk attention over the decoded window band and entries."""
        from kernels.prefill_attention import prefill_attention

        topk = None
        if self.ratio == CSA:
            from kernels.indexer_topk import indexer_topk

            iq, iw, *operands = index_queries
            pools, table = ls.req.pools, block_row(ls.req, q.device)[None]  # one table row for the chunk
            # query blocks bound the kernel's int64 score scratch [queries, entries]; picks are per query
            blocks = [slice(b, b + INDEX_QUERY_BLOCK) for b in range(0, q.shape[0], INDEX_QUERY_BLOCK)]
            topk = torch.cat([
                indexer_topk(iq[b], iw[b], pools.csa_index[:, ls.slot], table, pos[b], self.cfg.index_topk,
                             tuple(t[b] for t in operands) or None)
                for b in blocks])
        entries = ls.entries("main") if self.ratio != SWA else None
        return prefill_attention(q, self.attn_sink, ext, base, entries, topk, pos, self.ratio, self.cfg.sliding_window)

    def _decode_kernels(self, q, ls: PagedLayerState, t: DecodeTables, index_queries) -> torch.Tensor:
        """One query per row of the tables t, all in one call, keys read from the compact pages
        (ls: any of the requests' states of this layer: the pools and the layer's slot)."""
        from kernels.hca_decode import hca_decode
        from kernels.sparse_decode import sparse_mqa_decode

        cfg = self.cfg
        pools, W = ls.req.pools, cfg.sliding_window
        swa = pools.swa[:, ls.layer]
        if self.ratio == HCA:
            return hca_decode(q, self.attn_sink, swa, t.swa_table, t.positions, pools.hca_main[:, ls.slot],
                              t.block_table, W, cfg.nope_head_dim)
        if self.ratio == CSA:
            from kernels.indexer_topk import indexer_topk

            iq, iw, *operands = index_queries
            topk = indexer_topk(iq, iw, pools.csa_index[:, ls.slot], t.block_table, t.positions, cfg.index_topk,
                                tuple(operands) or None)
            entries = pools.csa_main[:, ls.slot]
        else:  # window only: no entry is picked, so the entry pages are never read
            topk = torch.full((q.shape[0], 1), -1, dtype=torch.int32, device=q.device)
            entries = swa
        return sparse_mqa_decode(q, self.attn_sink, swa, t.swa_table, t.positions, entries, t.block_table, topk,
                                 W, cfg.nope_head_dim)

    def _grouped_out(self, o: torch.Tensor) -> torch.Tensor:
        """o [N, H, D] -> [N, groups*o_lora]: each head group has its own low-rank projection."""
        cfg = self.cfg
        g, r = cfg.o_groups, cfg.o_lora_rank
        w = self.wo_a.weight.view(g, r, -1)
        return grouped_linear(o.reshape(o.shape[0], g, -1).to(w.dtype), w)


def use_kernels(x: torch.Tensor, states: list) -> bool:
    """The Triton path: kernels are chosen for x, every state keeps compact pages they can read and
    the widths are ones they tile. (Kernel modules are imported only on this path: the reference
    runs without triton.)"""
    return (use_triton(x) and all(isinstance(ls, PagedLayerState) and ls.req.pools.layout == "compact"
                                  for ls in states)
            and kernel_widths(states[0].req.cfg))


def kernel_widths(cfg: ModelConfig) -> bool:
    """A main key is head_dim columns (a power of two) split into nope and RoPE dims, both in FP8
    scale blocks of 64; an indexer key is a power of two >= 32 (two nibble halves of >= 16 for
    tl.dot); the window is whole 64-key tiles of the prefill kernel."""
    D, r, Di = cfg.head_dim, cfg.qk_rope_head_dim, cfg.index_head_dim
    return (D & (D - 1) == 0 and r > 0 and r % 64 == 0 and (D - r) % 64 == 0
            and Di & (Di - 1) == 0 and Di >= 32 and cfg.sliding_window % 64 == 0)


def whole_window_stored(ls: PagedLayerState, t: int, window: int) -> bool:
    """Are the keys of every window position of a query at t in the pages? Not at the start of a
    prefix-cache replay (window_start > t - W + 1), where the reference treats the missing keys as
    invalid slots; the decode kernels would read them as stored, so those rows take the prefill path."""
    return ls.req.window_start <= max(0, t - (window - 1))


def replayed_compressor_state(comp: Compressor, x: torch.Tensor, start: int, freqs: torch.Tensor) -> CompressorState:
    """The compressor state at the end of x (positions start..start+len-1) without its history.

    The state at position T is the open window (T mod m tokens) plus, for CSA, the A-halves of the
    last complete window; both are projections of the last tokens only. Feeding those tokens to
    an empty compressor rebuilds it exactly (the entries it emits on the way are discarded: they
    lack their overlap, and the cached ones are the real ones).
    """
    end = start + x.shape[0]
    first = max(0, (end // comp.ratio) * comp.ratio - (comp.ratio if comp.overlap else 0))
    if first < start:
        raise ValueError(f"replay segment [{start}, {end}) does not reach back to position {first}")
    state = empty_compressor(comp.ratio, comp.width, x.device)
    comp(x[first - start :], first, state, freqs, None)
    return state
