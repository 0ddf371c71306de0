"""Int32 page tables of paged requests, for the kernels that read the pools directly.

  block_table [B, n_blk]  row b: request b's block pages (block i holds positions [256 i, 256 i + 256)),
                          padded with page 0 (never read: kernels mask by entry count);
  swa_table   [B, n_win]  row b: the pages of the window of a query at positions[b], from its
                          first, f = max(0, t - W + 1) // 64: column j holds positions
                          [64 (f + j), 64 (f + j) + 64); W / 64 + 1 columns hold any window;
  positions   [B]         int32 position of row b's query.

A graphed decode step (workers/decode_graphs.py) asks for tables of fixed shapes: `rows` rows
(the padding rows have position -1, which the kernels read as "no key visible" and answer with
zeros, reading nothing) and a block table `width` rounded up by `width_bucket`, so a step at a
new length replays the graph of its bucket instead of recording one per 256 positions. Extra
columns change no result: HCA counts entries from the position, the indexer sees entries below
(t+1)//4 only, and CSA attends the top-k it picked. Such tables also say where each row's window
key goes (`win_page`, `win_offset`; a padding row repeats row 0's write).

Everything but the block table is built on the host and copied in one transfer per step. The
block table changes only when a request gains a block or the batch changes: it is rebuilt then
only, from each request's block row, which lives on the device and grows by the blocks added
since it was last built (blocks only ever get appended to the same list; a reset replaces it).
A forward reserves its pages before it starts and frees old ones after it ends, so the tables
are the same for every layer of one forward: `decode_tables` hands them out again while the
requests, their positions and their page lists are the same objects and lengths.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .host_index import to_device
from .paged_state import PagedRequestState
from .pools import SWA_PAGE


@dataclass(frozen=True)
class DecodeTables:
    block_table: torch.Tensor  # [B, n_blk] int32
    swa_table: torch.Tensor  # [B, n_win] int32
    positions: torch.Tensor  # [B] int32
    win_page: torch.Tensor | None = None  # [B] int32 SWA page of the key at positions[b] (fixed shapes only)
    win_offset: torch.Tensor | None = None  # [B] int32 its row in that page
    win_source: torch.Tensor | None = None  # [B] int32 the key row written there (padding rows: row 0)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.block_table, self.swa_table, self.positions, self.win_page, self.win_offset,
                                 self.win_source) if t is not None)


# request -> (its blocks list, that list's device copy); weak so finished requests drop out
_rows: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# (shape key, signature, tables) of the last decode_tables call; (shape key, signature, block table)
# of the last _block_table call
_last: tuple[tuple, list, DecodeTables] | None = None
_last_blocks: tuple[tuple, list, torch.Tensor] | None = None


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


def _unchanged(last: tuple | None, key: tuple, sig: list[tuple]) -> bool:
    """Does the cached (key, signature, ...) still hold? Keys equal; in the signatures (one tuple
    per request) the same objects and equal counts."""
    return (last is not None and last[0] == key and len(last[1]) == len(sig) and all(
        len(x) == len(y) and all(u is v or (type(u) is int and u == v) for u, v in zip(x, y))
        for x, y in zip(last[1], sig)))


def width_bucket(n: int) -> int:
    """The block-table width a graphed step uses for `n` blocks: the next of 1, 2, 3, 4, 6, 8, 12,
    16, 24, ... (two per octave: at most half the columns are padding, and a request decoding from
    8K to 1M passes 15 widths)."""
    if n <= 4:
        return max(n, 1)
    top = 1 << (n - 1).bit_length()
    return 3 * top // 4 if n <= 3 * top // 4 else top


def window_columns(window: int) -> int:
    """Columns of a swa_table: the most SWA pages a window of `window` positions touches."""
    return -(-window // SWA_PAGE) + 1


def decode_tables(reqs: list[PagedRequestState], window: int, device: torch.device, rows: int | None = None,
                  width: int | None = None, stage: Callable | None = None) -> DecodeTables:
    """Tables of one query per request, at position req.num_tokens (whose key is written before
    the kernels read it). With `rows` and `width`: the fixed shapes of a graphed step (module
    docstring), window-key destinations included. `stage(values, dtype, device, views)` copies
    the host part to the device (a graphed step: DecodeGraphs.stage, into buffers its graphs
    read in place); to_device by default."""
    global _last
    key = (rows, width, device, stage is not None)
    sig = [(r, r.num_tokens, r.blocks, len(r.blocks), r.swa, len(r.swa)) for r in reqs]
    if _unchanged(_last, key, sig):
        return _last[2]
    n_rows = len(reqs) if rows is None else rows
    pad, n_win = n_rows - len(reqs), window_columns(window)
    pos = [r.num_tokens for r in reqs]
    host = pos + [-1] * pad
    for r, t in zip(reqs, pos):
        pages = [r.swa[p] for p in range(max(0, t - window + 1) // SWA_PAGE, t // SWA_PAGE + 1)]
        host += pages + [0] * (n_win - len(pages))
    host += [0] * (n_win * pad)
    if rows is not None:  # where each row's window key goes; a padding row repeats row 0's write
        dest = [(r.swa[t // SWA_PAGE], t % SWA_PAGE) for r, t in zip(reqs, pos)]
        host += ([d[0] for d in dest] + [dest[0][0]] * pad + [d[1] for d in dest] + [dest[0][1]] * pad
                 + list(range(len(reqs))) + [0] * pad)
    def cut(dev: torch.Tensor) -> tuple[torch.Tensor, ...]:  # one copy, sliced on the device
        positions, swa_table = dev[:n_rows], dev[n_rows : n_rows * (n_win + 1)].view(n_rows, n_win)
        return (swa_table, positions) if rows is None else (swa_table, positions, *dev[n_rows * (n_win + 1) :].view(3, n_rows))

    parts = cut(to_device(host, device, torch.int32)) if stage is None else stage(host, torch.int32, device, cut)
    tables = DecodeTables(_block_table(reqs, device, n_rows, width), *parts)
    _last = (key, sig, tables)
    return tables


def _block_table(reqs: list[PagedRequestState], device: torch.device, rows: int, width: int | None) -> torch.Tensor:
    """[rows, width or the most blocks] block pages of reqs (rows beyond them: zeros), rebuilt only
    when a request's block list changed or the batch did."""
    global _last_blocks
    key, sig = (rows, width, device), [(r, r.blocks, len(r.blocks)) for r in reqs]
    if _unchanged(_last_blocks, key, sig):
        return _last_blocks[2]
    # the last, dropped row gives the table >= 1 column (or `width`); padding rows are zeros
    seqs = [block_row(r, device) for r in reqs] + [torch.zeros(width or 1, dtype=torch.int32, device=device)]
    table = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)[:-1]
    if width is not None and table.shape[1] != width:
        raise ValueError(f"a request has more than {width} blocks")
    if rows > len(reqs):
        table = F.pad(table, (0, 0, 0, rows - len(reqs)))
    _last_blocks = (key, sig, table)
    return table
