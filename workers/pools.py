"""Paged storage for every state family, sized in bytes from a memory budget.

Families (v4-architecture.md §6, design.md "State and pools"):
  blocks  one page = one 256-position logical block of a request's compressed state in every
          layer: CSA main entries [n_csa, 64, .], CSA indexer keys [n_csa, 64, .], HCA entries
          [n_hca, 2, .]. One page id serves the three tensors: a block always needs all three.
  swa     one page = 64 positions of sliding-window keys in every layer [n_layers, 64, .].
          A running request needs at most 3 (127 keys); `full_store` keeps them for every
          cached token, `checkpoint` keeps the two before each checkpoint boundary.
  comp    one page = one request's float32 compressor state (open windows, CSA overlaps).
  overlap one page = the CSA overlap state at a block boundary, the only compressor state left
          at a 256-aligned boundary (open windows are empty there); kept for resumable boundaries.
Pages are ref-counted: a page shared with the prefix cache or another request is never written.
Entries are stored in the compact layout (584 B main / 68 B indexer at V4 widths) or, with
layout="float", in the model dtype (exact for any numerics; a debugging layout).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from kernels.dispatch import use_triton
from kernels.geometry import BLOCK, SWA_PAGE

from . import kv_layout
from .capacity import indexer_entry_bytes, main_entry_bytes
from .config import CSA, HCA, ModelConfig

F32 = 4


class OutOfPages(RuntimeError):
    """No free page in a pool; the scheduler waits, evicts cached blocks or preempts."""


class PagePool:
    """Free list + reference counts over `num_pages` page ids."""

    def __init__(self, name: str, num_pages: int):
        self.name, self.num_pages = name, num_pages
        self.refs = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise OutOfPages(self.name)
        page = self._free.pop()
        self.refs[page] = 1
        return page

    def incref(self, page: int) -> None:
        assert self.refs[page] > 0, f"{self.name} page {page} is free"
        self.refs[page] += 1

    def decref(self, page: int) -> None:
        assert self.refs[page] > 0, f"{self.name} page {page} freed twice"
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self._free.append(page)


@dataclass(frozen=True)
class PoolSizes:
    blocks: int
    swa: int
    comp: int
    overlap: int


_SERIALS = itertools.count()


class KVPools:
    """The tensors behind every family, plus their allocators."""

    def __init__(self, cfg: ModelConfig, sizes: PoolSizes, layout: str = "compact",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if layout not in ("compact", "float"):
            raise ValueError(f"layout must be 'compact' or 'float', got {layout!r}")
        self.cfg, self.sizes, self.layout, self.dtype, self.device = cfg, sizes, layout, dtype, torch.device(device)
        # names this pool set for life (an address could be reused by a later one): a graphed decode
        # step reads and writes the pools at the addresses it was recorded with (model.py)
        self.serial = next(_SERIALS)
        kinds = cfg.compress_ratios
        self.csa_layers = [i for i, r in enumerate(kinds) if r == CSA]
        self.hca_layers = [i for i, r in enumerate(kinds) if r == HCA]
        self.slot_of = {i: self.csa_layers.index(i) if r == CSA else self.hca_layers.index(i) if r == HCA else None
                        for i, r in enumerate(kinds)}
        D, Di = cfg.head_dim, cfg.index_head_dim
        main_w = main_entry_bytes(cfg) if layout == "compact" else D
        idx_w = indexer_entry_bytes(cfg) if layout == "compact" else Di
        store = torch.uint8 if layout == "compact" else dtype
        n_csa, n_hca, L = len(self.csa_layers), len(self.hca_layers), len(kinds)

        def buf(*shape):
            return torch.zeros(*shape, dtype=store, device=self.device)

        self.csa_main = buf(sizes.blocks, n_csa, BLOCK // CSA, main_w)
        self.csa_index = buf(sizes.blocks, n_csa, BLOCK // CSA, idx_w)
        self.hca_main = buf(sizes.blocks, n_hca, BLOCK // HCA, main_w)
        self.swa = buf(sizes.swa, L, SWA_PAGE, main_w)
        self.comp = torch.zeros(sizes.comp, comp_floats(cfg), dtype=torch.float32, device=self.device)
        self.overlap = torch.zeros(sizes.overlap, overlap_floats(cfg), dtype=torch.float32, device=self.device)
        self.block_pool = PagePool("blocks", sizes.blocks)
        self.swa_pool = PagePool("swa", sizes.swa)
        self.comp_pool = PagePool("comp", sizes.comp)
        self.overlap_pool = PagePool("overlap", sizes.overlap)

    def all_pools(self) -> list[PagePool]:
        return [self.block_pool, self.swa_pool, self.comp_pool, self.overlap_pool]

    # ---- byte codecs: compact bytes <-> values, or the identity for the float layout ----------
    # Rows are encoded by the Triton kernels (kernels/quantize.py, bit-exact with kv_layout) where
    # they run; imported only then, so the reference path needs no triton.
    def encode_main(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout != "compact":
            return x.to(self.dtype)
        if use_triton(x):
            from kernels.quantize import encode_main

            return encode_main(x.reshape(-1, x.shape[-1]), self.cfg.nope_head_dim).view(*x.shape[:-1], -1)
        return kv_layout.encode_main(x, self.cfg)

    def decode_main(self, b: torch.Tensor) -> torch.Tensor:
        return kv_layout.decode_main(b, self.cfg, self.dtype) if self.layout == "compact" else b

    def encode_index(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout != "compact":
            return x.to(self.dtype)
        if use_triton(x):
            from kernels.quantize import encode_index

            return encode_index(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        return kv_layout.encode_index(x, self.cfg)

    def decode_index(self, b: torch.Tensor) -> torch.Tensor:
        return kv_layout.decode_index(b, self.cfg, self.dtype) if self.layout == "compact" else b


# ---- sizes --------------------------------------------------------------------------------------

def comp_floats(cfg: ModelConfig) -> int:
    """float32 words of one request's compressor state: per compressor open [m, c*w] and overlap
    [m, w] (CSA), each as kv + score."""
    total = 0
    for r in cfg.compress_ratios:
        if r == CSA:
            total += 2 * (CSA * 2 * cfg.head_dim + CSA * cfg.head_dim)
            total += 2 * (CSA * 2 * cfg.index_head_dim + CSA * cfg.index_head_dim)
        elif r == HCA:
            total += 2 * HCA * cfg.head_dim
    return total


def overlap_floats(cfg: ModelConfig) -> int:
    """float32 words of the CSA overlaps at a block boundary (main + indexer, kv + score)."""
    n_csa = cfg.compress_ratios.count(CSA)
    return n_csa * 2 * CSA * (cfg.head_dim + cfg.index_head_dim)


def page_bytes(cfg: ModelConfig, layout: str = "compact", dtype_bytes: int = 4) -> dict[str, int]:
    main = main_entry_bytes(cfg) if layout == "compact" else cfg.head_dim * dtype_bytes
    idx = indexer_entry_bytes(cfg) if layout == "compact" else cfg.index_head_dim * dtype_bytes
    n_csa, n_hca = cfg.compress_ratios.count(CSA), cfg.compress_ratios.count(HCA)
    return {
        "blocks": n_csa * (BLOCK // CSA) * (main + idx) + n_hca * (BLOCK // HCA) * main,
        "swa": cfg.num_hidden_layers * SWA_PAGE * main,
        "comp": comp_floats(cfg) * F32,
        "overlap": max(overlap_floats(cfg), 1) * F32,
    }


def size_pools(cfg: ModelConfig, budget_bytes: int, policy: str, max_requests: int,
               checkpoint_interval: int = 16, layout: str = "compact", dtype_bytes: int = 4) -> PoolSizes:
    """Split a byte budget: compressor slots and live windows for max_requests first, then as many
    256-token blocks as fit with what the policy keeps per cached block."""
    pb = page_bytes(cfg, layout, dtype_bytes)
    live_swa = 6 * max_requests  # 127 keys span <= 3 pages; a chunk adds <= 3 before the old ones go
    fixed = max_requests * pb["comp"] + live_swa * pb["swa"]
    per_block = {
        "full_store": pb["blocks"] + (BLOCK // SWA_PAGE) * pb["swa"] + pb["overlap"],
        # a checkpoint every N blocks (+ one per request's prompt end): 2 window pages + overlaps
        "checkpoint": pb["blocks"] + (2 * pb["swa"] + pb["overlap"]) / checkpoint_interval,
        "recompute": pb["blocks"],
    }[policy]
    blocks = int((budget_bytes - fixed) // per_block)
    if blocks < 1:
        raise ValueError(f"a budget of {budget_bytes} bytes does not fit {max_requests} requests and one block")
    if policy == "full_store":
        swa, overlap = live_swa + (BLOCK // SWA_PAGE) * blocks, blocks
    elif policy == "checkpoint":
        n_ckpt = blocks // checkpoint_interval + max_requests
        swa, overlap = live_swa + 2 * n_ckpt, n_ckpt
    else:
        swa, overlap = live_swa, 1
    return PoolSizes(blocks=blocks, swa=swa, comp=max_requests, overlap=overlap)
