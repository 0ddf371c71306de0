"""The KV compressor of CSA (m=4, overlapping 8-slot windows) and HCA (m=128), v4-architecture.md §3.

Entry w pools, per channel, a softmax over its slots of (kv, gate + ape[pos mod m]):
  HCA: the m tokens of window w.
  CSA: the A-halves of window w-1 (4 slots) and the B-halves of window w (4 slots); for w=0 the
       A slots are absent (zero weight, as in the reference).
then RMSNorm, RoPE at position m*w, and (reference rounding) FP8 for main entries or
Hadamard + FP4 for indexer keys.

A call consumes the new tokens of one request, carries the open window and the overlap in the
request's CompressorState, and returns the entries that closed. Projections and pooling run in
float32, as in the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.block_quant import fp4_e2m1_block_qdq, fp8_e4m3_block_qdq, hadamard
from kernels.compressor_pool_ref import overlap_slots, softmax_pool
from kernels.dispatch import use_triton

from .config import CSA
from .modules import Norm, Proj, f32_param
from .rope import apply_rope, cos_sin
from .state import CompressorState


class Compressor(nn.Module):
    def __init__(self, hidden: int, width: int, ratio: int, eps: float):
        super().__init__()
        self.ratio, self.width = ratio, width
        self.overlap = ratio == CSA
        c = 2 if self.overlap else 1
        self.wkv = Proj(hidden, c * width, torch.float32)
        self.wgate = Proj(hidden, c * width, torch.float32)
        self.ape = f32_param(ratio, c * width)
        self.norm = Norm(width, eps)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token kv [S, c*w] and score [S, c*w] of tokens x [S, d] at `positions` [S]. A token's
        row does not depend on the others (numerics.linear), so a forward projects the tokens of
        all its requests in one call and hands each request its rows."""
        return self.wkv(x.float()), self.wgate(x.float()) + self.ape[positions % self.ratio]

    def forward(self, x: torch.Tensor, start: int, state: CompressorState, freqs: torch.Tensor,
                rounding: str | None, projected: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [S, d] are the tokens at positions start..start+S-1 (or `projected`: their project()
        rows, x then unused); returns closed entries [n, width]."""
        m = self.ratio
        if projected is None:
            projected = self.project(x, torch.arange(start, start + x.shape[0], device=x.device))
        kv, score = projected
        device = kv.device
        kv = torch.cat([state.open_kv, kv])
        score = torch.cat([state.open_score, score])
        n_win = kv.shape[0] // m
        used = n_win * m
        state.set_open(kv[used:].clone(), score[used:].clone())
        if n_win == 0:
            return kv.new_empty(0, self.width)
        kv = kv[:used].view(n_win, m, -1)
        score = score[:used].view(n_win, m, -1)
        pooled = self._pool(kv, score, state)
        first = start // m  # the open window carried in began at (start // m) * m
        return self.finish(pooled, torch.arange(n_win, device=device) + first, freqs, rounding)

    def finish(self, pooled: torch.Tensor, windows: torch.Tensor, freqs: torch.Tensor, rounding: str | None) -> torch.Tensor:
        """Pooled rows [n, w] of windows `windows` [n] -> entries: RMSNorm, RoPE at the window's
        first position, reference rounding. Row by row: requests may share a call."""
        entries = self.norm(pooled)
        cos, sin = cos_sin(freqs, windows * self.ratio)
        entries = apply_rope(entries, cos, sin)
        if rounding == "main":
            entries = round_main_key(entries, self.width - 2 * freqs.shape[0])
        elif rounding == "index":
            entries = round_index_key(entries)
        return entries

    def pool_closing(self, kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None,
                     prev_score: torch.Tensor | None) -> torch.Tensor:
        """One closing window per request, [C, m, c*w] each (CSA: with each request's overlap
        [C, m, w]) -> pooled [C, w]: the pooling forward does for a token that closes a window,
        for several requests in one call (csa_pool_step / hca_pool, or their references)."""
        if not self.overlap:
            if use_triton(kv):
                from kernels.compressor_pool import hca_pool

                return hca_pool(kv, score)
            return softmax_pool(kv, score)
        if use_triton(kv):
            from kernels.compressor_pool import csa_pool_step

            return csa_pool_step(kv, score, prev_kv, prev_score)
        # slots: the previous window's A-halves (the overlap), then this window's B-halves
        w = self.width
        return softmax_pool(torch.cat([prev_kv, kv[..., w:]], 1), torch.cat([prev_score, score[..., w:]], 1))

    def _pool(self, kv: torch.Tensor, score: torch.Tensor, state: CompressorState) -> torch.Tensor:
        """Windows [n, m, c*w] -> pooled [n, w]. CSA pools 8 slots: the A-halves of the previous
        window (carried in the state; absent for window 0) and the B-halves of this one, and
        leaves this call's last A-halves in the state. The Triton kernel where it runs."""
        if not self.overlap:  # HCA windows are independent: as if each closed alone
            return self.pool_closing(kv, score, None, None)
        w = self.width
        prev_kv, prev_sc = state.overlap_kv, state.overlap_score
        if prev_kv is not None:  # copies: the state may be a view of pool memory, overwritten just below
            prev_kv, prev_sc = prev_kv.clone(), prev_sc.clone()
        state.set_overlap(kv[-1, :, :w].clone(), score[-1, :, :w].clone())
        if use_triton(kv):
            from kernels.compressor_pool import csa_pool_windows

            return csa_pool_windows(kv, score, prev_kv, prev_sc)
        return softmax_pool(*overlap_slots(kv, score, prev_kv, prev_sc))


def round_main_key(x: torch.Tensor, nope: int) -> torch.Tensor:
    """Reference rounding of a main key: FP8 (block 64, power-of-two scales) on the non-RoPE dims,
    BF16 on the RoPE dims (the reference keeps keys in BF16). The result is exactly what the
    compact cache layout stores, so caching it loses nothing. On the kernel path that is how it is
    computed: the row encoder and decoder, two launches with the same bits as the ~25 torch
    operations below (kernels/quantize.py, tested bit-exact against them)."""
    if use_triton(x) and x.numel():
        from kernels.quantize import decode_main, encode_main

        rows = x.reshape(-1, x.shape[-1])
        return decode_main(encode_main(rows, nope), x.shape[-1], nope).to(x.dtype).view(x.shape)
    rope = x[..., nope:].to(torch.bfloat16).to(x.dtype)
    return torch.cat([fp8_e4m3_block_qdq(x[..., :nope], 64), rope], dim=-1)


def round_index_key(x: torch.Tensor) -> torch.Tensor:
    """Reference rounding of indexer queries and keys: Hadamard rotation, then FP4 E2M1 with a
    power-of-two scale per 32. On the kernel path one launch with the same bits as the ~45 torch
    operations (kernels/index_rounding.py, tested bit-exact against them)."""
    if use_triton(x) and x.dtype == torch.float32 and x.numel():
        from kernels.index_rounding import round_index

        return round_index(x)
    return fp4_e2m1_block_qdq(hadamard(x), 32)
