"""A request's state held in the shared pools, read and appended through its page tables.

It offers the model the same methods as the in-memory RequestState (state.py), so the forward is
the same code; only where the bytes live differs. Pages must be reserved by the scheduler before a
forward (`pages_needed` / `reserve`); the forward itself never allocates.
"""

from __future__ import annotations

import functools

import torch

from .config import CSA, HCA
from .host_index import to_device
from .pools import BLOCK, SWA_PAGE, KVPools, OutOfPages
from .state import CompressorState


class SlotCompressor:
    """One compressor's state inside the request's float32 slot of the `comp` pool."""

    def __init__(self, buf: torch.Tensor, ratio: int, width: int):
        c = 2 if ratio == CSA else 1
        m = ratio
        sizes = [m * c * width, m * c * width] + ([m * width, m * width] if ratio == CSA else [])
        views = list(torch.split(buf, sizes))
        # where buf starts in the comp pool seen flat (buf is a view of it, and the pool owns its
        # storage from element 0): the batched writes below address many slots at once
        self.flat_base, self.row_width, self.ratio = buf.storage_offset(), c * width, ratio
        self._open_kv, self._open_score = views[0].view(m, c * width), views[1].view(m, c * width)
        self._ov_kv = views[2].view(m, width) if ratio == CSA else None
        self._ov_score = views[3].view(m, width) if ratio == CSA else None
        self.n_open, self.has_overlap = 0, False

    # CompressorState's fields, as properties over the slot
    @property
    def open_kv(self):
        return self._open_kv[: self.n_open]

    @property
    def open_score(self):
        return self._open_score[: self.n_open]

    @property
    def overlap_kv(self):
        return self._ov_kv if self.has_overlap else None

    @property
    def overlap_score(self):
        return self._ov_score if self.has_overlap else None

    def set_open(self, kv: torch.Tensor, score: torch.Tensor) -> None:
        self.n_open = kv.shape[0]
        self._open_kv[: self.n_open] = kv
        self._open_score[: self.n_open] = score

    def set_overlap(self, kv: torch.Tensor | None, score: torch.Tensor | None) -> None:
        self.has_overlap = kv is not None
        if self.has_overlap:
            self._ov_kv.copy_(kv)
            self._ov_score.copy_(score)

    def copy_from(self, other: CompressorState) -> None:
        self.set_open(other.open_kv, other.open_score)
        self.set_overlap(other.overlap_kv, other.overlap_score)

    def open_row_index(self) -> tuple[int, int]:
        """Flat comp-pool element indices of the next open kv row and score row."""
        kv = self.flat_base + self.n_open * self.row_width
        return kv, kv + self.ratio * self.row_width


def append_open_rows(comp_pool: torch.Tensor, slots: list[SlotCompressor], kv: torch.Tensor,
                     score: torch.Tensor) -> None:
    """Append one token's projections (row i of kv / score) to the open window of slots[i], for
    slots whose window stays open: what Compressor.forward does for such a token, as one write
    for every request of a decode step instead of a few operations per request."""
    if not slots:
        return
    assert all(sc.n_open + 1 < sc.ratio for sc in slots), "a closing window needs the compressor's pooling"
    write_open_rows(comp_pool, to_device([sc.open_row_index()[0] for sc in slots], kv.device), kv, score, slots[0])
    for sc in slots:
        sc.n_open += 1


def write_open_rows(comp_pool: torch.Tensor, at: torch.Tensor, kv: torch.Tensor, score: torch.Tensor,
                    slot: SlotCompressor) -> None:
    """Row i of kv / score to the open kv row at flat comp-pool index at[i] and to its score row,
    in one write (`slot`: any of the slots, of one layer and family: the rows' width and where a
    window's scores sit after its kv rows)."""
    starts = torch.cat([at, at + slot.ratio * slot.row_width])
    comp_pool.view(-1)[starts[:, None] + _offsets(slot.row_width, kv.device)] = torch.cat([kv, score])


def _spans(starts: list[int], length: int, device: torch.device) -> torch.Tensor:
    """Flat indices [len(starts), length] of the spans start .. start + length - 1."""
    return to_device(starts, device)[:, None] + _offsets(length, device)


@functools.cache
def _offsets(length: int, device: torch.device) -> torch.Tensor:
    """0 .. length-1 on `device`, made once per width (a decode step asks for it per layer)."""
    return torch.arange(length, device=device)


def close_windows(comp_pool: torch.Tensor, slots: list[SlotCompressor], kv: torch.Tensor,
                  score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """For slots whose open window the token at row i of kv / score closes (n_open = m - 1; CSA
    slots with an overlap): the whole windows kv, score [C, m, c*w], the overlap each carried in
    (CSA: [C, m, w], else None), and the slot state Compressor.forward leaves after such a token:
    the window emptied and, for CSA, this window's A-halves as the new overlap. The caller pools."""
    m, cw, C = slots[0].ratio, slots[0].row_width, len(slots)
    assert all(sc.n_open == m - 1 for sc in slots), "only windows this token closes"
    flat = comp_pool.view(-1)
    open_kv = _spans([sc.flat_base for sc in slots], (m - 1) * cw, flat.device)
    kv_w = torch.cat([flat[open_kv].view(C, m - 1, cw), kv[:, None]], 1)
    score_w = torch.cat([flat[open_kv + m * cw].view(C, m - 1, cw), score[:, None]], 1)
    prev_kv = prev_score = None
    if m == CSA:
        assert all(sc.has_overlap for sc in slots), "window 0 has no overlap: the compressor handles it"
        w = cw // 2
        ov_kv = _spans([sc.flat_base + 2 * m * cw for sc in slots], m * w, flat.device)
        prev_kv, prev_score = flat[ov_kv].view(C, m, w), flat[ov_kv + m * w].view(C, m, w)  # copies
        flat[ov_kv] = kv_w[:, :, :w].reshape(C, -1)
        flat[ov_kv + m * w] = score_w[:, :, :w].reshape(C, -1)
    for sc in slots:
        sc.n_open = 0
    return kv_w, score_w, prev_kv, prev_score


# Rows of a compress plan (compress_plan): per decode row, where a graphed step's compressor
# update reads and writes (workers/attention.py, Attention._decode_piece).
PLAN_OPEN, PLAN_SLOT, PLAN_PAGE, PLAN_OFFSET, PLAN_INDEX, PLAN_CLOSING = range(6)


def compress_plan(states: list["PagedLayerState"], family: str, rows: int) -> list[list[int]]:
    """Where one decode token per request meets `family`'s compressor, for a step whose every
    piece has fixed shapes: per row (padded to `rows` with row 0's values, so that a padding row
    writes row 0's bytes to row 0's places again) the flat comp-pool index of the open row it
    fills, its request's comp-pool row, the page and in-page row of its compressor's next entry,
    the index of the token's window, and whether the token closes that window.

    The step pools every row's window, closing or not, and writes the result as the next entry:
    for a window still open that entry is not counted yet, so no kernel reads it (they see
    entries below (t+1) // ratio) and the token that closes the window writes it again. Its
    block is the block of the token's own position, reserved before the step."""
    out = [[] for _ in range(PLAN_CLOSING + 1)]
    for ls in states:
        sc = ls.compressors[family]
        _, per_page, _, _ = ls._table(family)
        n = ls.count[family]
        kv_at, _ = sc.open_row_index()
        for row, value in ((PLAN_OPEN, kv_at), (PLAN_SLOT, ls.req.comp_page),
                           (PLAN_PAGE, ls.req.blocks[n // per_page]), (PLAN_OFFSET, n % per_page),
                           (PLAN_INDEX, ls.req.num_tokens // sc.ratio), (PLAN_CLOSING, int(sc.n_open + 1 == sc.ratio))):
            out[row].append(value)
    return [r + r[:1] * (rows - len(states)) for r in out]


def planned_windows(comp_pool: torch.Tensor, plan: torch.Tensor, slot: SlotCompressor,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """close_windows for the rows of a compress plan ([6, B] on the device) after their tokens
    were written (write_open_rows at plan[PLAN_OPEN]), every row as if
    its token closed its window: the whole windows kv, score [B, m, c*w], the overlaps carried in
    (CSA, [B, m, w]), and those replaced by this window's A-halves where the token does close it.
    Fixed shapes, no host values; `slot` is any request's compressor of this layer and family
    (where in a comp-pool row it lives)."""
    B, m, cw = plan.shape[1], slot.ratio, slot.row_width
    row, base = plan[PLAN_SLOT], slot.flat_base % comp_pool.shape[1]  # the same place in every request's row

    def part(start: int, length: int) -> torch.Tensor:  # [B, length] of each row's comp-pool row
        return comp_pool[row, base + start : base + start + length]

    kv_w, score_w = part(0, m * cw).view(B, m, cw), part(m * cw, m * cw).view(B, m, cw)
    if slot._ov_kv is None:
        return kv_w, score_w, None, None
    w = cw // 2
    prev_kv, prev_score = part(2 * m * cw, m * w), part(2 * m * cw + m * w, m * w)  # copies
    closing = plan[PLAN_CLOSING][:, None] != 0
    comp_pool[row, base + 2 * m * cw : base + 2 * m * cw + m * w] = torch.where(closing, kv_w[:, :, :w].reshape(B, -1),
                                                                               prev_kv)
    comp_pool[row, base + 2 * m * cw + m * w : base + 2 * m * cw + 2 * m * w] = torch.where(
        closing, score_w[:, :, :w].reshape(B, -1), prev_score)
    return kv_w, score_w, prev_kv.view(B, m, w), prev_score.view(B, m, w)


def write_planned_entries(ls: "PagedLayerState", family: str, plan: torch.Tensor, rows: torch.Tensor) -> None:
    """Row i of `rows` as the next entry of plan row i's request (counted by advance_compressors
    only where its window closed)."""
    store, _, _, encode = ls._table(family)
    store[plan[PLAN_PAGE], ls.slot, plan[PLAN_OFFSET]] = encode(rows)


def advance_compressors(states: list["PagedLayerState"], family: str) -> None:
    """The host's side of a graphed step's compressor update (compress_plan): each window one
    token fuller, or closed with its entry counted (and, CSA, its A-halves the new overlap)."""
    for ls in states:
        sc = ls.compressors[family]
        sc.n_open += 1
        if sc.n_open == sc.ratio:
            sc.n_open, sc.has_overlap = 0, sc._ov_kv is not None
            ls.count[family] += 1


def append_decode_entries(states: list["PagedLayerState"], family: str, rows: torch.Tensor) -> None:
    """One new entry per request (row i for states[i]) in one encode and one write: append_entries
    of a single row, for every request of a decode step that closed a window."""
    if not states:
        return
    store, per_page, _, encode = states[0]._table(family)
    counts = [ls.count[family] for ls in states]
    dev = store.device
    pages = to_device([ls.req.blocks[n // per_page] for ls, n in zip(states, counts)], dev)
    store[pages, states[0].slot, to_device([n % per_page for n in counts], dev)] = encode(rows)
    for ls in states:
        ls.count[family] += 1


def push_decode_keys(states: list["PagedLayerState"], keys: torch.Tensor) -> None:
    """Window key of one decode token per request (row i of keys for states[i], at position
    states[i].req.num_tokens) in one encode and one write: push_window for a single token, for
    every request of a decode step at once. All states are of one layer over one pool set."""
    if not states:
        return
    pools, layer = states[0].req.pools, states[0].layer
    pages = [s.req.swa[s.req.num_tokens // SWA_PAGE] for s in states]
    offsets = [s.req.num_tokens % SWA_PAGE for s in states]
    dev = pools.swa.device
    pools.swa[to_device(pages, dev), layer, to_device(offsets, dev)] = pools.encode_main(keys)


class PagedLayerState:
    def __init__(self, req: "PagedRequestState", layer: int):
        self.req, self.layer = req, layer
        self.ratio = req.cfg.compress_ratios[layer]
        self.slot = req.pools.slot_of[layer]
        self.count = {f: 0 for f in self.families()}
        self.compressors: dict[str, SlotCompressor] = {}

    def families(self) -> list[str]:
        return {0: [], CSA: ["main", "index"], HCA: ["main"]}[self.ratio]

    # ---- sliding window -----------------------------------------------------------------
    def window(self) -> torch.Tensor:
        req, W = self.req, self.req.cfg.sliding_window
        lo = max(req.window_start, req.num_tokens - (W - 1))
        pos = torch.arange(lo, req.num_tokens)
        pages = req.window_pages(pos)
        raw = req.pools.swa[pages, self.layer, pos % SWA_PAGE] if pos.numel() else req.pools.swa[:0, self.layer, 0]
        return req.pools.decode_main(raw)

    def push_window(self, keys: torch.Tensor, window: int) -> None:
        req = self.req
        start = req.num_tokens
        keep_from = 0 if req.keep_all_window else max(0, keys.shape[0] - (window - 1))
        pos = torch.arange(start + keep_from, start + keys.shape[0])
        if pos.numel():
            pages = req.window_pages(pos)
            req.pools.swa[pages, self.layer, pos % SWA_PAGE] = req.pools.encode_main(keys[keep_from:])

    # ---- compressed entries -------------------------------------------------------------
    def _table(self, family: str):
        pools = self.req.pools
        if self.ratio == HCA:
            return pools.hca_main, BLOCK // HCA, pools.decode_main, pools.encode_main
        if family == "main":
            return pools.csa_main, BLOCK // CSA, pools.decode_main, pools.encode_main
        return pools.csa_index, BLOCK // CSA, pools.decode_index, pools.encode_index

    def entries(self, family: str) -> torch.Tensor:
        store, per_page, decode, _ = self._table(family)
        n = self.count[family]
        pages = torch.tensor(self.req.blocks[: -(-n // per_page)], dtype=torch.long)
        raw = store[pages, self.slot].reshape(-1, store.shape[-1])[:n]
        return decode(raw)

    def append_entries(self, family: str, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0:
            return
        store, per_page, _, encode = self._table(family)
        idx = torch.arange(self.count[family], self.count[family] + rows.shape[0])
        pages = torch.tensor(self.req.blocks, dtype=torch.long)[idx // per_page]
        store[pages, self.slot, idx % per_page] = encode(rows)
        self.count[family] += rows.shape[0]


class PagedRequestState:
    """Page tables and positions of one request. `blocks[i]` holds positions [256 i, 256 (i+1))."""

    def __init__(self, pools: KVPools, keep_all_window: bool = False):
        self.cfg, self.pools = pools.cfg, pools
        self.num_tokens = 0
        self.replay_end: int | None = None
        self.window_start = 0  # lowest position whose window key is stored
        self.keep_all_window = keep_all_window  # full_store: every key is kept, not just the window
        self.published_blocks = 0  # blocks [0, n) are in the prefix cache (or were offered to it)
        self.block_keys: list[bytes] = []  # hash chain of this request's full blocks, grown as they fill
        self.blocks: list[int] = []
        self.swa: dict[int, int] = {}  # swa page index (position // 64) -> page id
        self.comp_page = pools.comp_pool.alloc()
        self.layers = [PagedLayerState(self, i) for i in range(self.cfg.num_hidden_layers)]
        self._bind_compressors()

    def _bind_compressors(self) -> None:
        slot = self.pools.comp[self.comp_page]
        off = 0
        D, Di = self.cfg.head_dim, self.cfg.index_head_dim
        for ls in self.layers:
            for family, width in (("main", D), ("index", Di)):
                if family not in ls.families():
                    continue
                c = 2 if ls.ratio == CSA else 1
                n = 2 * ls.ratio * c * width + (2 * ls.ratio * width if ls.ratio == CSA else 0)
                ls.compressors[family] = SlotCompressor(slot[off : off + n], ls.ratio, width)
                off += n

    def window_pages(self, pos: torch.Tensor) -> torch.Tensor:
        """Page ids holding the window keys of positions `pos` (a contiguous, increasing range)."""
        idx = pos // SWA_PAGE
        if not idx.numel():
            return idx
        first = int(idx[0])
        table = torch.tensor([self.swa[p] for p in range(first, int(idx[-1]) + 1)], dtype=torch.long)
        return table[idx - first]

    # ---- page accounting ------------------------------------------------------------------
    def pages_needed(self, n_new: int) -> tuple[int, int]:
        """(block pages, swa pages) to allocate before a forward of n_new more tokens."""
        end = self.num_tokens + n_new
        blocks = max(0, -(-end // BLOCK) - len(self.blocks))
        first = self.num_tokens if self.keep_all_window else max(self.num_tokens, end - (self.cfg.sliding_window - 1))
        swa = sum(1 for p in range(first // SWA_PAGE, -(-end // SWA_PAGE)) if p not in self.swa)
        return blocks, swa

    def reserve(self, n_new: int) -> None:
        """Allocate the pages a forward of n_new tokens writes (raises OutOfPages, leaving nothing half-done)."""
        nb, ns = self.pages_needed(n_new)
        if nb > self.pools.block_pool.num_free or ns > self.pools.swa_pool.num_free:
            raise OutOfPages("blocks" if nb > self.pools.block_pool.num_free else "swa")
        end = self.num_tokens + n_new
        for _ in range(nb):
            self.blocks.append(self.pools.block_pool.alloc())
        first = self.num_tokens if self.keep_all_window else max(self.num_tokens, end - (self.cfg.sliding_window - 1))
        for p in range(first // SWA_PAGE, -(-end // SWA_PAGE)):
            if p not in self.swa:
                self.swa[p] = self.pools.swa_pool.alloc()

    def release_old_window(self, held: set[int] = frozenset()) -> None:
        """Drop window pages no query can see any more (the prefix cache keeps its own refs)."""
        lo = self.num_tokens - (self.cfg.sliding_window - 1)
        for p in [p for p in self.swa if (p + 1) * SWA_PAGE <= lo]:
            self.pools.swa_pool.decref(self.swa.pop(p))

    def free(self) -> None:
        """Give back every page this request holds (shared pages just lose a reference)."""
        for b in self.blocks:
            self.pools.block_pool.decref(b)
        for page in self.swa.values():
            self.pools.swa_pool.decref(page)
        if self.comp_page is not None:
            self.pools.comp_pool.decref(self.comp_page)
        self.blocks, self.swa, self.comp_page = [], {}, None

    # ---- prefix-cache attach ----------------------------------------------------------------
    def attach_prefix(self, blocks: list[int], upto: int) -> None:
        """Share cached block pages covering [0, upto); entries exist up to `upto`."""
        assert not self.blocks and self.num_tokens == 0
        for b in blocks:
            self.pools.block_pool.incref(b)
        self.blocks = list(blocks)
        self.published_blocks = len(blocks)
        for ls in self.layers:
            for f in ls.families():
                ls.count[f] = upto // ls.ratio

    def attach_window(self, pages: dict[int, int], start: int) -> None:
        """Share cached window pages (page index -> id) holding keys from position `start` on."""
        for idx, page in pages.items():
            self.pools.swa_pool.incref(page)
            self.swa[idx] = page
        self.window_start = start

    def _overlaps(self):
        """(compressor, width, offset) of every CSA overlap in an overlap record, in record order."""
        off = 0
        for ls in self.layers:
            if ls.ratio == CSA:
                for family, width in (("main", self.cfg.head_dim), ("index", self.cfg.index_head_dim)):
                    yield ls.compressors[family], width, off
                    off += 2 * CSA * width

    def load_overlaps(self, record: torch.Tensor) -> None:
        """Restore the CSA overlap state at a block boundary (open windows are empty there)."""
        for comp, width, off in self._overlaps():
            n = CSA * width
            kv, sc = record[off : off + n].view(CSA, width), record[off + n : off + 2 * n].view(CSA, width)
            empty = kv.new_empty(0, 2 * width)
            comp.set_open(empty, empty)
            comp.set_overlap(kv, sc)

    def save_overlaps(self, record: torch.Tensor) -> None:
        for comp, width, off in self._overlaps():
            n = CSA * width
            assert comp.n_open == 0 and comp.has_overlap, "overlaps are saved at block boundaries only"
            record[off : off + n] = comp.overlap_kv.reshape(-1)
            record[off + n : off + 2 * n] = comp.overlap_score.reshape(-1)

    # ---- transfer (the narrow interface kv_transfer uses) -----------------------------------
    # A state moves as pieces: compressed entries (final as soon as they exist, so they can go
    # while the prefill still runs) and, at the end, each layer's tail: the window keys a next
    # query sees and the float32 compressor state (open tokens + overlap). Pieces are in stored
    # form (compact bytes, or the float layout's values).
    def entry_counts(self) -> dict[tuple[int, str], int]:
        """Compressed entries that exist now, per (layer, family)."""
        return {(ls.layer, f): ls.count[f] for ls in self.layers for f in ls.families()}

    def entry_rows(self, layer: int, family: str, start: int, end: int) -> torch.Tensor:
        """Stored rows [start, end) of a compressed family (a copy)."""
        ls = self.layers[layer]
        store, per_page, _, _ = ls._table(family)
        idx = torch.arange(start, end)
        pages = torch.tensor(self.blocks, dtype=torch.long)[idx // per_page] if end > start else idx
        return store[pages, ls.slot, idx % per_page]

    def tail(self, layer: int) -> list[tuple[str, str, torch.Tensor]]:
        """(kind, family, tensor) of the layer's window keys and compressor states at num_tokens."""
        ls, pools, T = self.layers[layer], self.pools, self.num_tokens
        lo = max(self.window_start, T - (self.cfg.sliding_window - 1))
        pos = torch.arange(lo, T)
        pages = self.window_pages(pos)
        out = [("window", "", pools.swa[pages, layer, pos % SWA_PAGE] if pos.numel() else pools.swa[:0, layer, 0])]
        for family, comp in ls.compressors.items():
            parts = [comp.open_kv.reshape(-1), comp.open_score.reshape(-1)]
            if comp.has_overlap:
                parts += [comp.overlap_kv.reshape(-1), comp.overlap_score.reshape(-1)]
            out.append(("compressor", family, torch.cat(parts)))
        return out

    def export_layer(self, layer: int) -> list[tuple[str, torch.Tensor]]:
        """Layer `layer`'s whole state as (name, tensor): every entry of each family, then the tail."""
        ls = self.layers[layer]
        out = [(f"entries.{f}", self.entry_rows(layer, f, 0, ls.count[f])) for f in ls.families()]
        return out + [(f"{kind}.{family}" if family else kind, t) for kind, family, t in self.tail(layer)]

    def prepare_import(self, num_tokens: int) -> None:
        """Reserve the pages a transferred state at position num_tokens lands in (raises OutOfPages)."""
        assert self.num_tokens == 0 and not self.blocks
        W = self.cfg.sliding_window
        nb = -(-num_tokens // BLOCK)
        window_pages = range(max(0, num_tokens - (W - 1)) // SWA_PAGE, -(-num_tokens // SWA_PAGE))
        if nb > self.pools.block_pool.num_free or len(window_pages) > self.pools.swa_pool.num_free:
            raise OutOfPages("blocks" if nb > self.pools.block_pool.num_free else "swa")
        self.blocks = [self.pools.block_pool.alloc() for _ in range(nb)]
        for p in window_pages:
            self.swa[p] = self.pools.swa_pool.alloc()
        self.num_tokens = num_tokens
        self.window_start = max(0, num_tokens - (W - 1))
        self.published_blocks = num_tokens // BLOCK
        for ls in self.layers:  # the rows arrive in pieces; the state is used only once all are in
            for f in ls.families():
                ls.count[f] = num_tokens // ls.ratio

    def import_piece(self, layer: int, kind: str, family: str, start: int, data: torch.Tensor) -> None:
        """Write one piece (see entry_rows / tail) into this state's reserved pages."""
        ls, T = self.layers[layer], self.num_tokens
        if kind == "entries":
            store, per_page, _, _ = ls._table(family)
            n = data.shape[0]
            if start < 0 or start + n > T // ls.ratio:
                raise ValueError(f"layer {layer} {family}: rows [{start}, {start + n}) beyond the "
                                 f"{T // ls.ratio} entries of position {T}")
            idx = torch.arange(start, start + n)
            pages = torch.tensor(self.blocks, dtype=torch.long)[idx // per_page]
            store[pages, ls.slot, idx % per_page] = data.to(store.dtype)
        elif kind == "window":
            pos = torch.arange(T - data.shape[0], T)
            if pos.numel():
                self.pools.swa[self.window_pages(pos), layer, pos % SWA_PAGE] = data.to(self.pools.swa.dtype)
        elif kind == "compressor":
            comp = ls.compressors[family]
            width = comp._ov_kv.shape[1] if comp._ov_kv is not None else comp._open_kv.shape[1]
            cw = comp._open_kv.shape[1]
            n_open = T % ls.ratio
            k = n_open * cw
            open_kv, open_score = data[:k].view(n_open, cw), data[k : 2 * k].view(n_open, cw)
            rest = data[2 * k :]
            overlap = (rest[: CSA * width].view(CSA, width), rest[CSA * width :].view(CSA, width)) if rest.numel() else (None, None)
            comp.set_open(open_kv, open_score)
            comp.set_overlap(*overlap)
        else:
            raise ValueError(f"unknown state piece kind {kind!r}")
