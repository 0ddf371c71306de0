"""The DeepSeek-V4 model: embeddings -> blocks (mHC + attention, mHC + MoE) -> hc_head -> norm -> head.

`forward` takes a batch of requests, each with new tokens and its RequestState, runs them as one
flat token batch (projections, MoE, mHC) and per request where state is involved (attention,
compressors), appends to every state, and returns logits. A token's logits are the same bits
whether its request is prefilled in one call, in chunks of any size, decoded, or batched with
other requests (numerics.py, attention.py say how).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, Segment
from .config import ModelConfig
from .decode_graphs import DecodeGraphs, bucket, graphs_enabled, run_eagerly
from .host_index import to_device
from .mhc import collapse, expand, hc_head, hc_weights
from .modules import Norm, Proj, f32_param
from .moe import MoE, routes_on_device
from .state import RequestState


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype):
        super().__init__()
        hc, d = cfg.hc_mult, cfg.hidden_size
        self.cfg, self.index = cfg, layer
        self.attn_norm, self.ffn_norm = Norm(d, cfg.rms_norm_eps), Norm(d, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer, dtype)
        self.ffn = MoE(cfg, layer, dtype)
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", f32_param((2 + hc) * hc, hc * d))
            setattr(self, f"hc_{site}_base", f32_param((2 + hc) * hc))
            setattr(self, f"hc_{site}_scale", f32_param(3))

    def _hc(self, site: str, streams: torch.Tensor):
        c = self.cfg
        return hc_weights(streams, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                          getattr(self, f"hc_{site}_scale"), c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def forward(self, streams, token_ids, positions, segments, states, rounding, graphs: DecodeGraphs | None = None):
        """The two state-free pieces around attention's state updates and kernels; with `graphs`
        (a decode step) they are recorded once and replayed, and the MoE runs dense."""
        run = graphs.run if graphs is not None else run_eagerly
        tag = f"layer{self.index}.rounding{int(rounding)}"
        h = run(f"{tag}.attention_in", lambda s, p: self.attention_in(s, p, rounding), streams, positions)
        out = self.attn.attend_states(h["x"], positions, segments, states, rounding, h["attn"], graphs)
        return run(f"{tag}.attention_out_and_ffn", lambda *t: self.attention_out_and_ffn(*t, dense=graphs is not None),
                   streams, out, h["post"], h["comb"], h["attn"]["cos"], h["attn"]["sin"], token_ids)

    def attention_in(self, streams, positions, rounding) -> dict:
        """mHC weights, collapse and norm, then attention's per-token work (Attention.prepare)."""
        pre, post, comb = self._hc("attn", streams)
        x = self.attn_norm(collapse(streams, pre))
        return {"x": x, "post": post, "comb": comb, "attn": self.attn.prepare(x, positions, rounding)}

    def attention_out_and_ffn(self, streams, out, post, comb, cos, sin, token_ids, dense: bool = False):
        """Attention's output projection, mHC expand, then the MoE sub-layer with its own mHC."""
        streams = expand(streams, self.attn.output(out, cos, sin), post, comb)
        pre, post, comb = self._hc("ffn", streams)
        f = self.ffn(self.ffn_norm(collapse(streams, pre)), token_ids, dense)
        return expand(streams, f, post, comb)


class V4Model(nn.Module):
    """`rounding=True` reproduces the reference's FP8 window/compressed keys and FP4 indexer."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, rounding: bool = False):
        super().__init__()
        self.cfg, self.dtype, self.rounding = cfg, dtype, rounding
        d, hc = cfg.hidden_size, cfg.hc_mult
        self.embed = Proj(d, cfg.vocab_size, dtype)  # used as a table: weight [V, d]
        self.layers = nn.ModuleList(Block(cfg, i, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = Norm(d, cfg.rms_norm_eps)
        self.head = Proj(d, cfg.vocab_size, dtype)
        self.hc_head_fn = f32_param(hc, hc * d)
        self.hc_head_base = f32_param(hc)
        self.hc_head_scale = f32_param(1)
        # Decode steps replay CUDA graphs of their state-free pieces (decode_graphs.py) when this
        # is set, the model is on a GPU and the preset has few enough experts; None: eager.
        self.cuda_graphs = True
        self.graphs: DecodeGraphs | None = None

    def new_state(self) -> RequestState:
        return RequestState(self.cfg, dtype=self.dtype, device=self.head.weight.device)

    @torch.no_grad()
    def forward(self, batch: list[tuple[RequestState, torch.Tensor]], all_logits: bool = False) -> list[torch.Tensor]:
        """batch: (state, new token ids [S]) per request. Returns per request the float32 logits of
        its last token [V] (or of every new token [S, V] with all_logits)."""
        device = self.head.weight.device
        segments, pos, ids, states = [], [], [], []
        row = 0
        for state, tokens in batch:
            # ids and positions are gathered on the host and copied once, without a stream sync;
            # a list of ints (a decode step's one token) is taken as it is
            if not (type(tokens) is list and all(type(t) is int for t in tokens)):
                tokens = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1).tolist()
            n = len(tokens)
            if n == 0:
                raise ValueError("a request in the batch has no new tokens")
            if state.num_tokens + n > self.cfg.max_position_embeddings:
                raise ValueError(f"position {state.num_tokens + n} exceeds max_position_embeddings={self.cfg.max_position_embeddings}")
            if state.replay_end is not None and state.num_tokens + n > state.replay_end:
                raise ValueError("a replay segment must end at or before replay_end")
            segments.append(Segment(row=row, length=n, start=state.num_tokens, replay_end=state.replay_end))
            pos.extend(range(state.num_tokens, state.num_tokens + n))
            ids.extend(tokens)
            states.append(state)
            row += n
        if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
            raise ValueError(f"token id outside [0, {self.cfg.vocab_size})")
        graphs = self._decode_graphs(segments, all_logits)
        if graphs is None:
            ids_t, pos_t = to_device(ids, device), to_device(pos, device)
        else:
            # padded on the host to the graphs' row count (position 0, token 0: decode_graphs.py),
            # copied in one piece into buffers every layer's graphs read in place
            pad = [0] * (bucket(row) - row)
            ids_t, pos_t = graphs.stage("tokens", [ids + pad, pos + pad], torch.long, device, torch.unbind)
        # in a graph of its own on a decode step: layer 0 then reads the streams in place
        streams = (graphs.run if graphs is not None else run_eagerly)("embed", self._embed, ids_t)
        for i, block in enumerate(self.layers):
            streams = block(streams, ids_t, pos_t, segments, [s.layers[i] for s in states], self.rounding, graphs)
        for state, seg in zip(states, segments):
            state.num_tokens += seg.length
            if state.replay_end == state.num_tokens:
                state.replay_end = None
        if graphs is not None:  # one row per request; a copy, since the graph's buffer is reused
            return list(graphs.run("head", self._head, streams)[:row].clone())
        if all_logits:
            keep = torch.arange(row, device=device)
        else:
            keep = to_device([s.row + s.length - 1 for s in segments], device)
        logits = self._head(streams[keep])
        if all_logits:
            return [logits[s.row : s.row + s.length] for s in segments]
        return list(logits)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() may move the parameters: recorded graphs would still read the
        # old buffers, so they are dropped and recorded again on the next decode step
        self.graphs = None
        return super()._apply(fn, *args, **kwargs)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N] -> the hc_mult residual streams [N, hc, d], each the token's embedding."""
        return self.embed.weight[ids][:, None, :].expand(-1, self.cfg.hc_mult, -1).contiguous()

    def _head(self, streams: torch.Tensor) -> torch.Tensor:
        """Final mHC collapse, norm and output head -> float32 logits [N, V]."""
        c = self.cfg
        h = hc_head(streams, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, c.hc_eps, c.rms_norm_eps)
        return self.head(self.norm(h)).float()

    def _decode_graphs(self, segments: list[Segment], all_logits: bool) -> DecodeGraphs | None:
        """The graphs for this step, or None to run it eagerly: not a decode step (one token per
        request), more requests than the largest bucket, graphs off (`cuda_graphs`, or
        V4SERVE_CUDA_GRAPHS=0), no GPU, or an MoE that would read its picks on the host
        (moe.routes_on_device). Tests may set `graphs` themselves (DecodeGraphs(capture=False)
        runs the same pieces without graphs)."""
        if all_logits or not self.cuda_graphs or bucket(len(segments)) is None or any(s.length != 1 for s in segments):
            return None
        if self.graphs is None:
            if not (graphs_enabled() and self.head.weight.is_cuda and routes_on_device(self.cfg, self.head.weight)):
                return None
            self.graphs = DecodeGraphs(capture=True)
        return self.graphs

    def load_weights(self, weights: dict[str, torch.Tensor]) -> "V4Model":
        """Copy native-named tensors in (cast to each parameter's dtype); names and shapes must match."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if missing or unexpected:
            raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, dst in own.items():
            src = weights[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{name}: shape {list(src.shape)} != expected {list(dst.shape)}")
            dst.copy_(src.to(dst.dtype))
        return self
