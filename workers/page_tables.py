"""Int32 page tables of paged requests, for the kernels that read the pools directly.

  block_table [B, n_blk]  row b: request b's block pages (block i holds positions [256 i, 256 i + 256)),
                          padded with page 0 (never read: kernels mask by entry count);
  swa_table   [B, n_swa]  column p: the page holding window positions [64 p, 64 p + 64) (the
                          absolute page index of PagedRequestState.swa), for the pages a query at
                          `positions[b]` sees; 0 elsewhere;
  positions   [B]         int32 position of row b's query.

A forward reserves its pages before it starts and frees old ones after it ends, so the tables are
the same for every layer of one forward: `decode_tables` hands the last batch's tables out again
while the requests, their positions and their page lists are the same objects and lengths. A
request's block row lives on the device and grows by the blocks added since it was last built
(blocks only ever get appended to the same list; a reset replaces the list).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .host_index import to_device
from .paged_state import PagedRequestState
from .pools import SWA_PAGE


@dataclass(frozen=True)
class DecodeTables:
    block_table: torch.Tensor  # [B, n_blk] int32
    swa_table: torch.Tensor  # [B, n_swa] int32
    positions: torch.Tensor  # [B] int32


# request -> (its blocks list, that list's device copy); weak so finished requests drop out
_rows: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_last: tuple[list, DecodeTables] | None = None


def block_row(req: PagedRequestState, device: torch.device) -> torch.Tensor:
    """Request's block pages [len(blocks)] int32 on `device`."""
    cached = _rows.get(req)
    if cached is None or cached[0] is not req.blocks or cached[1].device != device:
        row = to_device(req.blocks, device, torch.int32)
    else:
        row = cached[1]
        if row.numel() < len(req.blocks):
            row = torch.cat([row, to_device(req.blocks[row.numel():], device, torch.int32)])
    _rows[req] = (req.blocks, row)
    return row


def _signature(reqs: list[PagedRequestState]) -> list[tuple]:
    return [(r, r.num_tokens, r.blocks, len(r.blocks), r.swa, len(r.swa)) for r in reqs]


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        x[0] is y[0] and x[1] == y[1] and x[2] is y[2] and x[3] == y[3] and x[4] is y[4] and x[5] == y[5]
        for x, y in zip(a, b))


def decode_tables(reqs: list[PagedRequestState], window: int, device: torch.device) -> DecodeTables:
    """Tables of one query per request, at position req.num_tokens (whose key is already written)."""
    global _last
    sig = _signature(reqs)
    if _last is not None and _same(_last[0], sig):
        return _last[1]
    rows = [block_row(r, device) for r in reqs]
    one = torch.zeros(1, dtype=torch.int32, device=device)  # an extra row: the table has >= 1 column
    block_table = torch.nn.utils.rnn.pad_sequence(rows + [one], batch_first=True)[:-1]
    pos = [r.num_tokens for r in reqs]
    swa_table = torch.zeros(len(reqs), max(pos) // SWA_PAGE + 1, dtype=torch.int32, device=device)
    b_idx, p_idx, pages = [], [], []
    for b, (r, t) in enumerate(zip(reqs, pos)):
        for p in range(max(0, t - window + 1) // SWA_PAGE, t // SWA_PAGE + 1):
            b_idx.append(b)
            p_idx.append(p)
            pages.append(r.swa[p])
    swa_table[to_device(b_idx, device), to_device(p_idx, device)] = to_device(pages, device, torch.int32)
    tables = DecodeTables(block_table, swa_table, to_device(pos, device, torch.int32))
    _last = (sig, tables)
    return tables
