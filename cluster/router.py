"""Choosing the engine replica for a request: prefix-aware, with two baselines.

`prefix_aware` estimates each replica's time to first token in tokens to compute: the uncached
prompt tokens already sent to it and not yet answered, plus this prompt's tokens it does not hold
in its prefix cache (the global directory, and this router's own recent decisions for prefixes
still being prefilled, say how many leading blocks each replica holds), plus the replay a hit
costs under the `recompute` window policy. Among replicas within one prompt's worth of the
lowest estimate, the one holding the longest prefix wins.
`round_robin` and `least_loaded` (fewest outstanding prompt tokens) are the baselines.
`decode_capacity` places a state arriving from a prefill replica: among decode replicas with
room for its pages, the smallest batch, then the most free pages (from each replica's polled
stats, corrected by the reservations this router sent since, which those stats may not show yet).

This runs inside Ray Serve's request routing (in the caller's process), once per request.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from workers.pools import BLOCK
from workers.prefix_cache import block_hashes

from .directory import directory_handle

MODES = ("prefix_aware", "round_robin", "least_loaded", "decode_capacity")
AFFINITY_KEYS = 1 << 16
PENDING_KEPT = 4096  # routing decisions remembered for requests not yet routed
RECENT_S = 2.0  # reservations younger than this may be missing from a replica's polled stats


def decode_order(need_blocks: int, stats: dict[str, dict], recent: dict[str, list[int]], replicas: list[str]) -> list[str]:
    """Decode replicas best first: those with room for need_blocks, then the smallest batch
    (running + waiting + reservations sent lately), then the most free blocks left."""
    def key(r: str):
        st = stats.get(r, {})
        free = st.get("free_blocks", 0) - sum(recent.get(r, [])) - need_blocks
        batch = st.get("running", 0) + st.get("waiting", 0) + len(recent.get(r, []))
        return (free < 0, batch, -free, r)
    return sorted(replicas, key=key)


def estimate_costs(prompt_len: int, matches: dict[str, int], outstanding: dict[str, int],
                   replicas: list[str], replay_tokens: int) -> dict[str, int]:
    """Tokens each replica must compute before this request's first token."""
    costs = {}
    for r in replicas:
        hit = matches.get(r, 0) * BLOCK
        costs[r] = outstanding.get(r, 0) + (prompt_len - hit) + (min(replay_tokens, hit) if hit else 0)
    return costs


class PrefixAwareRouter(RequestRouter):
    def initialize_state(self, mode: str = "prefix_aware", model_id: str = "v4", replay_tokens: int = 0):
        if mode not in MODES:
            raise ValueError(f"router mode must be one of {MODES}, got {mode!r}")
        self.mode, self.model_id, self.replay_tokens = mode, model_id, replay_tokens
        self._turn = itertools.count()
        self._outstanding: dict[str, int] = {}  # replica -> uncached prompt tokens sent, not yet done
        self._sent: dict[str, tuple[str, int]] = {}  # internal request id -> (replica, tokens)
        self._quotes: dict[str, dict[str, int]] = {}  # internal request id -> replica -> its tokens
        self._directory = None
        # block key -> replica this router last sent it to: a prefix being prefilled is not in the
        # directory yet, but the next request sharing it should follow it (bounded, oldest dropped)
        self._affinity: dict[bytes, str] = {}
        self._hashes: dict[str, list[bytes]] = {}  # internal request id -> its block keys
        self._recent: dict[str, list[tuple[float, int]]] = {}  # decode replica -> (time, blocks) reserved lately

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ids = sorted(by_id)
        target = _request_of(pending_request).get("replica")
        if target is not None:  # the continuation of a request that holds pages on that replica
            return [[by_id[target]]] if target in by_id else [[by_id[ids[0]]]]  # gone: it answers "unknown ticket"
        if self.mode == "round_robin":
            i = next(self._turn) % len(ids)
            order = ids[i:] + ids[:i]
        elif self.mode == "decode_capacity":
            now = time.monotonic()
            recent = {r: [b for t, b in self._recent.get(r, []) if now - t < RECENT_S] for r in ids}
            need = -(-_request_of(pending_request).get("num_tokens", 0) // BLOCK)
            order = decode_order(need, {r: by_id[r].routing_stats or {} for r in ids}, recent, ids)
        else:
            prompt = _prompt_of(pending_request)
            hashes = block_hashes(prompt[: max(0, len(prompt) - 1)], self.model_id) if self.mode == "prefix_aware" else []
            matches = self._local_matches(hashes)
            for r, n in (await self._matches(hashes)).items():
                matches[r] = max(n, matches.get(r, 0))
            if pending_request is not None and hashes:
                self._hashes[pending_request.metadata.internal_request_id] = hashes
            costs = estimate_costs(len(prompt), matches, self._outstanding, ids, self.replay_tokens)
            order = sorted(ids, key=lambda r: (costs[r], self._outstanding.get(r, 0), r))
            if matches:
                # Affinity within a slack of one prompt: a replica already holding (or prefilling)
                # the prefix keeps it unless that costs more than computing the prompt elsewhere
                # again; otherwise every burst on a hot prefix would scatter it over all replicas.
                slack = costs[order[0]] + max(len(prompt), BLOCK)
                near = [r for r in order if costs[r] <= slack]
                best = max(near, key=lambda r: (matches.get(r, 0), -costs[r]))
                order.remove(best)
                order.insert(0, best)
            if pending_request is not None:  # this request's own share, per replica, for the accounting
                self._quotes[pending_request.metadata.internal_request_id] = {
                    r: costs[r] - self._outstanding.get(r, 0) for r in ids}
                for pending in (self._quotes, self._hashes):  # requests routed never (cancelled) age out
                    while len(pending) > PENDING_KEPT:
                        pending.pop(next(iter(pending)))
        return [[by_id[r]] for r in order]

    def _local_matches(self, hashes: list[bytes]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, key in enumerate(hashes):
            r = self._affinity.get(key)
            if r is None or (i and out.get(r) != i):
                break
            out[r] = i + 1
        return out

    async def _matches(self, hashes: list[bytes]) -> dict[str, int]:
        if not hashes:
            return {}
        try:
            if self._directory is None:
                self._directory = directory_handle()
            return await asyncio.wait_for(self._directory.match.remote(hashes), timeout=1.0)
        except Exception:  # no directory (or a slow one): route by load alone, never fail the request
            self._directory = None
            return {}

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        rid = pending_request.metadata.internal_request_id
        if self.mode == "decode_capacity":
            blocks = -(-_request_of(pending_request).get("num_tokens", 0) // BLOCK)
            now = time.monotonic()
            mine = [(t, b) for t, b in self._recent.get(replica_id.unique_id, []) if now - t < RECENT_S]
            self._recent[replica_id.unique_id] = mine + ([(now, blocks)] if blocks else [])
            return
        quote = self._quotes.pop(rid, {})
        tokens = max(0, quote.get(replica_id.unique_id, len(_prompt_of(pending_request))))
        self._sent[rid] = (replica_id.unique_id, tokens)
        for key in self._hashes.pop(rid, []):
            self._affinity.pop(key, None)  # re-insert: most recent last
            self._affinity[key] = replica_id.unique_id
        while len(self._affinity) > AFFINITY_KEYS:
            self._affinity.pop(next(iter(self._affinity)))
        self._outstanding[replica_id.unique_id] = self._outstanding.get(replica_id.unique_id, 0) + tokens

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        replica, tokens = self._sent.pop(internal_request_id, (replica_id.unique_id, 0))
        self._outstanding[replica] = max(0, self._outstanding.get(replica, 0) - tokens)


def _request_of(pending_request: PendingRequest | None) -> dict:
    if pending_request is None or not pending_request.args or not isinstance(pending_request.args[0], dict):
        return {}
    return pending_request.args[0]


def _prompt_of(pending_request: PendingRequest | None) -> list[int]:
    return _request_of(pending_request).get("prompt_ids", [])
