"""Moving a request's pages between a pool and one contiguous transfer buffer.

`pack_pages(pool, page_ids)` gathers pages pool[page_ids[0]], pool[page_ids[1]], ... into a
flat byte buffer, page after page, each in its row-major byte order; `unpack_pages(buf, pool,
page_ids)` scatters such a buffer back. `pool` is [P, ...] and may be a strided per-layer view
(pools.csa_main[:, slot], pools.swa[:, layer]) of any dtype: a page is viewed as rows [R, W]
(W = the last dim, which must be contiguous; R rows at a uniform stride).

The copy moves the widest words (8, 4, 2 or 1 bytes) that the pool's strides, its offset and the
buffer allow, so each program issues wide coalesced loads; one program copies BLOCK words of one
page, and offsets are int64 (a pool can exceed 2**31 bytes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import use_triton

BLOCK = 1024
_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


@triton.jit
def _copy_pages_kernel(pool_ptr, buf_ptr, ids_ptr, page_stride, row_stride, row_words, page_words,
                       PACK: tl.constexpr, CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < page_words
    page = tl.load(ids_ptr + i).to(tl.int64)
    if CONTIGUOUS:
        pool_offs = page * page_stride + offs
    else:
        pool_offs = page * page_stride + (offs // row_words).to(tl.int64) * row_stride + offs % row_words
    buf_offs = i.to(tl.int64) * page_words + offs
    if PACK:
        tl.store(buf_ptr + buf_offs, tl.load(pool_ptr + pool_offs, mask=mask), mask=mask)
    else:
        tl.store(pool_ptr + pool_offs, tl.load(buf_ptr + buf_offs, mask=mask), mask=mask)


def page_bytes(pool: torch.Tensor) -> int:
    return pool[0].numel() * pool.element_size()


def _as_rows(pool: torch.Tensor) -> torch.Tensor:
    """pool [P, ...] -> byte view [P, R, W * element_size], without copying."""
    if pool.dim() < 2 or pool.stride(-1) != 1:
        raise ValueError(f"pool {list(pool.shape)} with strides {pool.stride()}: "
                         "need [P, ..., W] with a contiguous last dim")
    try:
        rows = pool.view(pool.shape[0], -1, pool.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"pool {list(pool.shape)} with strides {pool.stride()}: the rows of a page "
                         "are not at one uniform stride") from e
    return rows.view(torch.uint8)


def _words(rows: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The widest integer views of the pool rows and the flat buffer that both allow: every
    stride, the row width, both tensors' addresses and the buffer size divisible by the word."""
    for dtype in _WORDS:
        w = dtype.itemsize
        sizes = (rows.shape[-1], rows.stride(0), rows.stride(1), rows.data_ptr(), buf.data_ptr(), buf.numel())
        if all(v % w == 0 for v in sizes):
            return rows.view(dtype), buf.view(dtype)
    raise AssertionError("uint8 words always fit")


def _launch(rows: torch.Tensor, buf: torch.Tensor, page_ids: torch.Tensor, pack: bool) -> None:
    n = page_ids.numel()
    if n == 0 or rows[0].numel() == 0:
        return
    pool_w, buf_w = _words(rows, buf)
    _, R, W = pool_w.shape
    # ids on the host are checked (the kernel does not bound-check); ids on the GPU are trusted
    if not page_ids.is_cuda and page_ids.numel() and not 0 <= int(page_ids.min()) <= int(page_ids.max()) < len(rows):
        raise IndexError(f"page ids {page_ids.tolist()} outside the pool's {rows.shape[0]} pages")
    ids = page_ids.to(device=rows.device, dtype=torch.int64)
    _copy_pages_kernel[(n, triton.cdiv(R * W, BLOCK))](
        pool_w, buf_w, ids, pool_w.stride(0), pool_w.stride(1), W, R * W,
        PACK=pack, CONTIGUOUS=pool_w.stride(1) == W or R == 1, BLOCK=BLOCK)


def reference_pack(pool: torch.Tensor, page_ids: torch.Tensor) -> torch.Tensor:
    return pool.index_select(0, page_ids.long().to(pool.device)).reshape(-1).view(torch.uint8)


def reference_unpack(buf: torch.Tensor, pool: torch.Tensor, page_ids: torch.Tensor) -> None:
    pages = buf.view(pool.dtype).view(page_ids.numel(), *pool.shape[1:])
    pool.index_copy_(0, page_ids.long().to(pool.device), pages)


def _check_buf(buf: torch.Tensor, pool: torch.Tensor, n: int) -> None:
    want = n * page_bytes(pool)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != want or buf.stride(0) != 1:
        raise ValueError(f"buffer {buf.dtype} {list(buf.shape)}: expected contiguous uint8 [{want}]")
    if buf.device != pool.device:
        raise ValueError(f"buffer on {buf.device}, pool on {pool.device}")


def pack_pages(pool: torch.Tensor, page_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """pool[page_ids] as bytes: uint8 [len(page_ids) * page_bytes(pool)] (written into `out` if given)."""
    n = page_ids.numel()
    if out is None:
        out = torch.empty(n * page_bytes(pool), dtype=torch.uint8, device=pool.device)
    _check_buf(out, pool, n)
    if not use_triton(pool):
        out.copy_(reference_pack(pool, page_ids))
        return out
    _launch(_as_rows(pool), out, page_ids, pack=True)
    return out


def unpack_pages(buf: torch.Tensor, pool: torch.Tensor, page_ids: torch.Tensor) -> None:
    """Inverse of pack_pages: write buf's pages into pool[page_ids] (ids distinct)."""
    _check_buf(buf, pool, page_ids.numel())
    if not use_triton(pool):
        reference_unpack(buf, pool, page_ids)
        return
    _launch(_as_rows(pool), buf, page_ids, pack=False)
