"""The compressor's pooling step (v4-architecture.md §3; reference in compressor_pool_ref.py): per
channel, a softmax over a window's slots of kv weighted by score.

  hca_pool            HCA, 128 slots per window: the windows of a prefill chunk, or at decode the
                      one window per request that closes at this step.
  csa_pool_windows    CSA, consecutive windows of one request (a prefill chunk, or the one window
                      of a decode step): 8 slots, the A-halves of the previous window then the
                      B-halves of this one; the first window's previous A-halves come from the
                      request's overlap state, or are absent (window 0 of the sequence).
  csa_pool_step       CSA, one closing window per request of a decode batch, each with its own
                      overlap state (a request at window 0 passes kv 0 / score -inf, as the
                      reference does).

One program pools BLOCK_C channels of one window. It follows the reference's arithmetic: the max
over slots first, then exp(score - max) and the sums over slots in slot order; absent slots are
skipped, which equals the reference's zero weight (adding exp(-inf) * 0 = 0 changes no sum).
Results differ from the reference by the exp and division implementations only: about 1 ulp in
the interpreter (numpy against SLEEF); on the GPU exp goes through ex2.approx on a rounded
x * log2(e) and `/` may be approximate, a few ulp (tests allow 1e-5 of the pooled magnitude).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compressor_pool_ref import overlap_slots, softmax_pool
from .dispatch import use_triton

BLOCK_C = 128


@triton.jit
def _pool_kernel(own_kv, own_sc, prev_kv, prev_sc, out,
                 own_stride_w, own_stride_slot, prev_stride_w, prev_stride_slot, out_stride_w, C,
                 N_PREV: tl.constexpr, N_OWN: tl.constexpr, BLOCK: tl.constexpr):
    win = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    own_kv = own_kv + win * own_stride_w + c
    own_sc = own_sc + win * own_stride_w + c
    prev_kv = prev_kv + win * prev_stride_w + c
    prev_sc = prev_sc + win * prev_stride_w + c

    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for j in tl.static_range(N_PREV):
        mx = tl.maximum(mx, tl.load(prev_sc + j * prev_stride_slot, mask=mask, other=0.0))
    for j in range(N_OWN):
        mx = tl.maximum(mx, tl.load(own_sc + j * own_stride_slot, mask=mask, other=0.0))

    num = tl.zeros([BLOCK], tl.float32)
    den = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(N_PREV):
        e = tl.exp(tl.load(prev_sc + j * prev_stride_slot, mask=mask, other=0.0) - mx)
        num += e * tl.load(prev_kv + j * prev_stride_slot, mask=mask, other=0.0)
        den += e
    for j in range(N_OWN):
        e = tl.exp(tl.load(own_sc + j * own_stride_slot, mask=mask, other=0.0) - mx)
        num += e * tl.load(own_kv + j * own_stride_slot, mask=mask, other=0.0)
        den += e
    tl.store(out + win * out_stride_w + c, num / den, mask=mask)


def _launch(own_kv, own_sc, prev_kv, prev_sc, n_prev: int) -> torch.Tensor:
    """Pool windows [n, slots, C] of own slots, preceded by n_prev slots of prev [n, n_prev, C]
    (views of contiguous tensors: kv and score share strides, channels are contiguous)."""
    n, n_own, C = own_kv.shape
    out = torch.empty(n, C, dtype=torch.float32, device=own_kv.device)
    if n == 0 or C == 0:
        return out
    _pool_kernel[(n, triton.cdiv(C, BLOCK_C))](
        own_kv, own_sc, prev_kv, prev_sc, out,
        own_kv.stride(0), own_kv.stride(1), prev_kv.stride(0), prev_kv.stride(1), out.stride(0), C,
        N_PREV=n_prev, N_OWN=n_own, BLOCK=BLOCK_C)
    return out


def _check(kv: torch.Tensor, score: torch.Tensor, slots: int | None) -> None:
    if kv.dim() != 3 or (slots is not None and kv.shape[1] != slots) or score.shape != kv.shape:
        raise ValueError(f"kv {list(kv.shape)} / score {list(score.shape)}: "
                         f"expected equal shapes [n, {slots or 'slots'}, C]")
    if kv.dtype != torch.float32 or score.dtype != torch.float32:
        raise ValueError(f"pooling runs in float32, got {kv.dtype} / {score.dtype}")


def hca_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """HCA entries before normalisation: kv, score [n, 128, C] (score with the position bias
    added) -> [n, C]."""
    _check(kv, score, None)
    if not use_triton(kv):
        return softmax_pool(kv, score)
    kv, score = kv.contiguous(), score.contiguous()
    return _launch(kv, score, kv, score, 0)


def reference_csa_pool_windows(kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None,
                               prev_score: torch.Tensor | None) -> torch.Tensor:
    """The model's own slot assembly followed by its pooling."""
    return softmax_pool(*overlap_slots(kv, score, prev_kv, prev_score))


def csa_pool_windows(kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None,
                     prev_score: torch.Tensor | None) -> torch.Tensor:
    """CSA entries before normalisation for n consecutive windows of one request.

    kv, score [n, 4, 2C] (A-half | B-half per token, score with the position bias added);
    prev_kv, prev_score [4, C]: the A-halves of the window before the first one, or None when the
    first window is window 0 of the sequence. Returns [n, C]."""
    _check(kv, score, 4)
    if (prev_kv is None) != (prev_score is None):
        raise ValueError("prev_kv and prev_score must both be given or both be None")
    if not use_triton(kv):
        return reference_csa_pool_windows(kv, score, prev_kv, prev_score)
    kv, score = kv.contiguous(), score.contiguous()
    C = kv.shape[-1] // 2
    a_kv, a_sc, b_kv, b_sc = kv[..., :C], score[..., :C], kv[..., C:], score[..., C:]
    if prev_kv is None:
        first = _launch(b_kv[:1], b_sc[:1], b_kv[:1], b_sc[:1], 0)
    else:
        first = _launch(b_kv[:1], b_sc[:1], prev_kv.contiguous()[None], prev_score.contiguous()[None], 4)
    # window i > 0 takes its A slots from window i - 1 of the same tensors
    rest = _launch(b_kv[1:], b_sc[1:], a_kv[:-1], a_sc[:-1], 4)
    return torch.cat([first, rest])


def csa_pool_step(kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor,
                  prev_score: torch.Tensor) -> torch.Tensor:
    """CSA entries before normalisation for one closing window per request: kv, score
    [B, 4, 2C], prev_kv, prev_score [B, 4, C] (each request's overlap state; kv 0 and score -inf
    for a request whose window is window 0). Returns [B, C]."""
    _check(kv, score, 4)
    C = kv.shape[-1] // 2
    if prev_kv.shape != (kv.shape[0], 4, C) or prev_score.shape != prev_kv.shape:
        raise ValueError(f"prev_kv {list(prev_kv.shape)} / prev_score {list(prev_score.shape)}: "
                         f"expected [{kv.shape[0]}, 4, {C}]")
    if not use_triton(kv):
        return softmax_pool(torch.cat([prev_kv, kv[..., C:]], 1), torch.cat([prev_score, score[..., C:]], 1))
    kv, score, prev_kv, prev_score = kv.contiguous(), score.contiguous(), prev_kv.contiguous(), prev_score.contiguous()
    return _launch(kv[..., C:], score[..., C:], prev_kv, prev_score, 4)
