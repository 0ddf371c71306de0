"""The local prefix cache: a hash chain over 256-token blocks, and the window policies.

A block's compressed entries depend only on its prefix, so they are cached as-is (hash =
H(parent hash, token ids, model id)). The sliding-window keys and the compressor state at a
boundary are not derivable from them (v4-architecture.md §8); the policy decides how a hit gets
them back:
  full_store  every cached block keeps its window pages and the CSA overlaps at its end: a hit
              resumes at the matched boundary directly.
  checkpoint  only every N-th boundary (and the last full block of each prompt) keeps the window
              tail and overlaps: a hit resumes from the latest checkpoint at or before the match
              and replays the rest with the cached entries frozen.
  recompute   nothing but entries: a hit replays the receptive field (127 tokens per layer) before
              the matched boundary with the entries frozen, which rebuilds the window state exactly.
Replays are exact (tests/test_replay.py), so all three give the cold run's tokens bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .paged_state import PagedRequestState
from .pools import BLOCK, SWA_PAGE, KVPools, OutOfPages

POLICIES = ("full_store", "checkpoint", "recompute")


def block_hashes(tokens: list[int], model_id: str, known: list[bytes] = ()) -> list[bytes]:
    """Chained hashes of the full 256-token blocks of `tokens`; `known` (the chain of a prefix of
    them, already computed) is extended rather than recomputed."""
    out = list(known)
    parent = out[-1] if out else model_id.encode()
    for i in range(len(out), len(tokens) // BLOCK):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b"".join(t.to_bytes(4, "little") for t in tokens[i * BLOCK : (i + 1) * BLOCK]))
        parent = h.digest()
        out.append(parent)
    return out


@dataclass
class CachedBlock:
    key: bytes
    parent: bytes | None
    page: int  # block page: entries of every CSA/HCA layer for these 256 positions
    window: dict[int, int] = field(default_factory=dict)  # swa page index -> page, kept by the policy
    overlap: int | None = None  # overlap page: CSA overlaps at this block's end (a resumable boundary)
    children: int = 0
    last_used: int = 0


@dataclass
class Resume:
    """How to continue a request after a hit: share `blocks`, restore the window and overlaps at
    `resume_at`, replay [replay_from, matched) with entries frozen, then prefill the rest."""

    matched: int
    blocks: list[CachedBlock]
    resume_block: CachedBlock | None  # the boundary whose window/overlaps are restored (None: replay from scratch)
    replay_from: int


@dataclass
class CacheStats:
    lookups: int = 0
    hit_tokens: int = 0
    recomputed_tokens: int = 0
    inserted_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, pools: KVPools, policy: str, model_id: str, checkpoint_interval: int = 16):
        if policy not in POLICIES:
            raise ValueError(f"unknown prefix-cache policy {policy!r}; one of {POLICIES}")
        self.pools, self.policy, self.model_id = pools, policy, model_id
        self.interval = checkpoint_interval
        self.blocks: dict[bytes, CachedBlock] = {}
        self._index: dict[bytes, int] = {}  # block key -> block number in its sequence
        self.stats = CacheStats()
        # ("insert" | "evict", key) since the last drain, for a global directory of cached blocks
        self.events: list[tuple[str, bytes]] = []
        self._clock = 0
        self.receptive_field = (pools.cfg.sliding_window - 1) * pools.cfg.num_hidden_layers

    # ---- lookup -----------------------------------------------------------------------------
    def lookup(self, tokens: list[int]) -> Resume | None:
        """The longest cached prefix of `tokens` (leaving at least one token to compute)."""
        self.stats.lookups += 1
        chain: list[CachedBlock] = []
        for key in block_hashes(tokens[: len(tokens) - 1], self.model_id):
            blk = self.blocks.get(key)
            if blk is None:
                break
            chain.append(blk)
        if not chain:
            return None
        matched = len(chain) * BLOCK
        self._touch(chain)
        # Restore the latest resumable boundary unless replaying the receptive field is shorter.
        resume = next((b for b in reversed(chain) if b.overlap is not None), None)
        start = max(0, matched - self.receptive_field)
        if resume is not None and self._end(resume) >= start:
            start = self._end(resume)
        else:
            resume = None
        return Resume(matched=matched, blocks=chain, resume_block=resume, replay_from=start)

    def _end(self, blk: CachedBlock) -> int:
        return (self._index[blk.key] + 1) * BLOCK

    def attach(self, state: PagedRequestState, r: Resume) -> None:
        """Point a fresh request state at the cached prefix."""
        state.attach_prefix([b.page for b in r.blocks], r.matched)
        if r.resume_block is not None:
            end = self._end(r.resume_block)
            tail = {i: p for i, p in r.resume_block.window.items() if (i + 1) * SWA_PAGE > end - BLOCK // 2}
            state.attach_window(tail, end - (self.pools.cfg.sliding_window - 1))
            state.load_overlaps(self.pools.overlap[r.resume_block.overlap])
        else:
            state.window_start = r.replay_from
        state.num_tokens = r.replay_from
        state.replay_end = r.matched if r.replay_from < r.matched else None

    def count_hit(self, r: Resume) -> None:
        """Account a hit once the request holding it is admitted."""
        self.stats.hit_tokens += r.matched
        self.stats.recomputed_tokens += r.matched - r.replay_from

    # ---- insert -----------------------------------------------------------------------------
    def on_progress(self, state: PagedRequestState, tokens: list[int], prompt_len: int) -> None:
        """Publish the blocks `state` completed, and the boundary state where the policy keeps it.

        Window keys and compressor state exist only for the position the state is at, so a
        boundary can be kept only when a forward ends exactly on it (the engine's chunking sees
        to that, see `next_capture`)."""
        done = state.num_tokens // BLOCK
        if done <= state.published_blocks:
            return
        keys = state.block_keys = block_hashes(tokens[: done * BLOCK], self.model_id, state.block_keys)
        for idx in range(state.published_blocks, done):
            key, parent = keys[idx], keys[idx - 1] if idx else None
            blk = self.blocks.get(key)
            if blk is None:
                if parent is not None and parent not in self.blocks:
                    break  # its parent was evicted meanwhile: unreachable, not worth keeping
                self.pools.block_pool.incref(state.blocks[idx])
                blk = CachedBlock(key=key, parent=parent, page=state.blocks[idx])
                self.blocks[key], self._index[key] = blk, idx
                self.events.append(("insert", key))
                if parent is not None:
                    self.blocks[parent].children += 1
                self.stats.inserted_blocks += 1
            self._touch([blk])
            end = (idx + 1) * BLOCK
            if end == state.num_tokens and blk.overlap is None and self._keeps_boundary(idx, end, prompt_len):
                self._store_boundary(blk, state, end)
        state.published_blocks = done

    def next_capture(self, start: int, prompt_len: int) -> int | None:
        """The first boundary after `start` whose state this policy keeps (a forward must end there)."""
        if self.policy == "recompute":
            return None
        nxt = (start // BLOCK + 1) * BLOCK
        if self.policy == "full_store":
            return nxt
        ckpt = -(-nxt // (self.interval * BLOCK)) * self.interval * BLOCK
        prompt_end = (prompt_len // BLOCK) * BLOCK
        return min(ckpt, prompt_end) if prompt_end >= nxt else ckpt

    def _keeps_boundary(self, idx: int, end: int, prompt_len: int) -> bool:
        if self.policy == "full_store":
            return True
        if self.policy == "checkpoint":
            return (idx + 1) % self.interval == 0 or end == (prompt_len // BLOCK) * BLOCK
        return False

    def _store_boundary(self, blk: CachedBlock, state: PagedRequestState, end: int) -> None:
        first = end - BLOCK if self.policy == "full_store" else end - BLOCK // 2
        pages = {i: state.swa[i] for i in range(first // SWA_PAGE, end // SWA_PAGE) if i in state.swa}
        try:
            overlap = self.pools.overlap_pool.alloc()
        except OutOfPages:
            if not self.evict(overlap=1):
                return
            overlap = self.pools.overlap_pool.alloc()
        state.save_overlaps(self.pools.overlap[overlap])
        for p in pages.values():
            self.pools.swa_pool.incref(p)
        blk.window, blk.overlap = pages, overlap

    # ---- eviction ---------------------------------------------------------------------------
    def evict(self, blocks: int = 0, swa: int = 0, overlap: int = 0) -> bool:
        """Drop least-recently-used unshared leaf blocks until the pools have the free pages asked for."""
        pools = self.pools

        def enough():
            return (pools.block_pool.num_free >= blocks and pools.swa_pool.num_free >= swa
                    and pools.overlap_pool.num_free >= overlap)

        while not enough():
            victims = [b for b in self.blocks.values() if b.children == 0 and pools.block_pool.refs[b.page] == 1]
            if not victims:
                return False
            self._drop(min(victims, key=lambda b: b.last_used))
        return True

    def drain_events(self) -> list[tuple[str, bytes]]:
        events, self.events = self.events, []
        return events

    def _drop(self, blk: CachedBlock) -> None:
        self.events.append(("evict", blk.key))
        del self.blocks[blk.key]
        del self._index[blk.key]
        if blk.parent is not None and blk.parent in self.blocks:
            self.blocks[blk.parent].children -= 1
        self.pools.block_pool.decref(blk.page)
        for p in blk.window.values():
            self.pools.swa_pool.decref(p)
        if blk.overlap is not None:
            self.pools.overlap_pool.decref(blk.overlap)
        self.stats.evicted_blocks += 1

    def clear(self) -> None:
        while self.blocks:
            leaves = [b for b in self.blocks.values() if b.children == 0]
            for b in leaves:
                self._drop(b)

    def _touch(self, chain: list[CachedBlock]) -> None:
        # deepest first, so that among equally old blocks the leaves are evicted before their parents
        for blk in reversed(chain):
            self._clock += 1
            blk.last_used = self._clock

    def held_bytes(self) -> dict[str, int]:
        """Bytes the cache holds beyond the entries (window pages and overlaps: the policy's cost)."""
        from .pools import page_bytes

        pb = page_bytes(self.pools.cfg, self.pools.layout)
        win = sum(len(b.window) for b in self.blocks.values())
        ov = sum(1 for b in self.blocks.values() if b.overlap is not None)
        return {"entry_bytes": len(self.blocks) * pb["blocks"], "window_bytes": win * pb["swa"],
                "overlap_bytes": ov * pb["overlap"]}
