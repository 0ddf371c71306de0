"""V4 attention (v4-architecture.md §2, §5): low-rank query with an unweighted per-head RMSNorm,
one shared K=V head, partial interleaved RoPE, one softmax over the sliding window plus the
layer's compressed entries (top-k by the indexer for CSA, all visible for HCA) with a per-head
sink, inverse RoPE on the output, grouped low-rank output projection.

Each query attends over its own fixed-shape key list [window W slots | compressed slots] so its
result does not depend on which other queries share the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .compressor import Compressor, round_main_key
from .config import CSA, HCA, SWA, ModelConfig
from .indexer import Indexer
from .modules import Norm, Proj, f32_param
from .numerics import linear, rms_norm
from .rope import apply_rope, cos_sin, inv_freq
from .state import CompressorState, LayerState, empty_compressor

QUERY_BLOCK = 256  # queries per attention call: bounds the per-query key gather [G, keys, D]


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
        self.cfg, self.ratio = cfg, cfg.compress_ratios[layer]
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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segments: list[Segment],
                states: list[LayerState], rounding: bool) -> torch.Tensor:
        """x [N, d] flat tokens of several requests; appends to each request's layer state."""
        cfg = self.cfg
        H, D = cfg.num_attention_heads, cfg.head_dim
        cos, sin = cos_sin(self.freqs, positions)
        qr = self.q_norm(self.wq_a(x))
        q = rms_norm(self.wq_b(qr).view(-1, H, D), None, cfg.rms_norm_eps)
        q = apply_rope(q, cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        if rounding:
            kv = round_main_key(kv, cfg.nope_head_dim)
        if self.ratio == CSA:
            iq, iw = self.indexer.queries(qr, x, cos, sin, rounding)
        out = torch.empty_like(q)
        for seg, ls in zip(segments, states, strict=True):
            rows = slice(seg.row, seg.row + seg.length)
            ext, base = self._extend_window(kv[rows], ls)
            compressors = [("main", self.compressor, "main")] if self.ratio != SWA else []
            if self.ratio == CSA:
                compressors.append(("index", self.indexer.compressor, "index"))
            for family, comp, rnd in compressors:
                if seg.replay_end is None:
                    new = comp(x[rows], seg.start, ls.compressors[family], self.freqs, rnd if rounding else None)
                    ls.append_entries(family, new.to(kv.dtype))
                elif seg.start + seg.length == seg.replay_end:
                    ls.compressors[family].copy_from(replayed_compressor_state(comp, x[rows], seg.start, self.freqs))
            for b in range(0, seg.length, QUERY_BLOCK):
                blk = torch.arange(b, min(seg.length, b + QUERY_BLOCK), device=x.device)
                flat = blk + seg.row
                idx = base + blk[:, None] + torch.arange(cfg.sliding_window, device=x.device)[None, :]
                win_keys, win_valid = ext[idx.clamp(min=0)], idx >= 0
                out[flat] = self._attend(q[flat], positions[flat], win_keys, win_valid, ls,
                                         (iq[flat], iw[flat]) if self.ratio == CSA else None)
        out = apply_rope(out, cos, sin, inverse=True)
        return self.wo_b(self._grouped_out(out))

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
        if self.ratio == SWA:
            return attend(q, win_keys, win_valid, self.attn_sink)
        entries = ls.entries("main")
        if self.ratio == CSA:
            iq, iw = index_queries
            picked = self.indexer.select(iq, iw, ls.entries("index"), pos)
            if entries.shape[0] == 0:  # nothing to pick yet; every compressed slot is masked anyway
                entries = entries.new_zeros(1, entries.shape[1])
            keys = torch.cat([win_keys, entries[picked.clamp(min=0)]], dim=1)
            return attend(q, keys, torch.cat([win_valid, picked >= 0], dim=1), self.attn_sink)
        # HCA: every entry w with 128w+127 <= t; queries that see the same count share a call.
        visible = (pos + 1) // HCA
        out = torch.empty_like(q)
        for n in visible.unique().tolist():
            sel = (visible == n).nonzero().squeeze(1)
            g = sel.shape[0]
            keys = torch.cat([win_keys[sel], entries[:n].expand(g, n, -1)], dim=1)
            valid = torch.cat([win_valid[sel], win_valid.new_ones(g, n)], dim=1)
            out[sel] = attend(q[sel], keys, valid, self.attn_sink)
        return out

    def _grouped_out(self, o: torch.Tensor) -> torch.Tensor:
        """o [N, H, D] -> [N, groups*o_lora]: each head group has its own low-rank projection."""
        cfg = self.cfg
        g, r = cfg.o_groups, cfg.o_lora_rank
        grouped = o.reshape(o.shape[0], g, -1)
        w = self.wo_a.weight.view(g, r, -1)
        return torch.cat([linear(grouped[:, i].to(w.dtype), w[i]) for i in range(g)], dim=-1)


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


def attend(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Reference sparse MQA: q [G, H, D], per-query keys [G, N, D] (K = V), valid [G, N], sink [H].

    o = sum_j exp(s_j) k_j / (sum_j exp(s_j) + exp(sink)),  s_j = q.k_j / sqrt(D).
    Scores and softmax in float32 (as the reference); probabilities back in the key dtype for PV.
    """
    G, H, D = q.shape
    s = torch.bmm(q.float(), keys.float().transpose(1, 2)) * D**-0.5
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    logits = torch.cat([s, sink.float().view(1, H, 1).expand(G, H, 1)], dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)
    p = torch.softmax(logits, dim=-1)[..., :-1]
    return torch.bmm(p.to(keys.dtype), keys).to(q.dtype)
