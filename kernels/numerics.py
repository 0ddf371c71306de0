"""Row-invariant building blocks.

Our paths (one-shot prefill, chunked prefill, decode, batched with other requests) must give
bit-identical results for a token. A token's row therefore may never be reduced in an order that
depends on how many other rows share the call. Two things break that on CPU BLAS:
  * MKL runs a different (differently-ordered) kernel for matrices with fewer than ~16 rows, so
    `linear` pads its input to at least MIN_ROWS rows;
  * reductions over small middle dimensions may be vectorised differently for different outer
    sizes, so the few we need (over hc streams, compressor slots, experts) are explicit
    sequential sums, whose order is fixed by construction.
Reductions over the innermost dimension (norms, softmax) are per row and safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` over the last dim, with a result per row that does not depend on the row count.

    Written to dispatch few operations (a decode step calls it over a hundred times): 2-D inputs
    are not reshaped, the zero rows come from one pad, and rows are sliced off only if added."""
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows < MIN_ROWS:
        out = F.linear(F.pad(flat, (0, 0, 0, MIN_ROWS - rows)), weight)[:rows]
    else:
        out = F.linear(flat, weight)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], weight.shape[0])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, g, k] with one weight [r, k] per group (weight [g, r, k]) -> [N, g*r], group i's
    columns x[:, i] @ weight[i].T: one batched matmul (a decode step's grouped output projection
    was g GEMMs with their split-K reductions and a concatenation), padded like `linear`."""
    rows = x.shape[0]
    padded = F.pad(x, (0, 0, 0, 0, 0, MIN_ROWS - rows)) if rows < MIN_ROWS else x
    out = torch.bmm(padded.transpose(0, 1), weight.transpose(1, 2))  # [g, N, r]
    return out.transpose(0, 1)[:rows].reshape(rows, -1)


def seq_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over `dim` left to right, one slice at a time (fixed order; for small dims)."""
    slices = x.unbind(dim)
    acc = slices[0]
    for s in slices[1:]:
        acc = acc + s
    return acc


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 (the reference keeps norm weights in float32)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


_VEC = 64  # a multiple of every CPU vector loop's stride (2 x 16 floats with AVX-512)
_PIECE = 8192  # below ATen's parallel grain size: one piece is never split across threads


def pointwise(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a transcendental elementwise `fn` (exp, sigmoid, sin, ...) position-invariantly.

    ATen's CPU loops run full vector chunks through SLEEF and the leftover tail through the scalar
    libm function, and the two can differ in the last bit; which elements land in the tail
    depends on the tensor's size (and on how it is split across threads). Padding to whole
    vector chunks and feeding fixed pieces puts every element on the vector path.
    """
    if x.device.type != "cpu":
        return fn(x)
    n = x.numel()
    flat = x.reshape(-1)
    size = _PIECE if n > _PIECE else _VEC
    pad = (-n) % size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    out = torch.cat([fn(p) for p in flat.split(_PIECE)]) if flat.numel() > _PIECE else fn(flat)
    return out[:n].view(x.shape)
