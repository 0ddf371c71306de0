"""The global prefix directory: which replica holds which cached block.

A Ray actor. Replicas publish the blocks they insert and evict in batches; the router asks how
many leading blocks of a prompt each replica holds. It holds no state that cannot be rebuilt: a
replica it does not know (a new directory after a restart) is asked for its full listing.
"""

from __future__ import annotations

import ray

NAME, NAMESPACE = "v4serve-prefix-directory", "v4serve"


class PrefixDirectoryState:
    """The directory's data and logic (plain Python, so it is testable without Ray)."""

    def __init__(self):
        self.holders: dict[bytes, set[str]] = {}
        self.known: set[str] = set()

    def publish(self, replica: str, inserts: list[bytes], evicts: list[bytes], full: bool = False) -> bool:
        """Apply a replica's events; with full=True `inserts` is its whole listing. Returns False
        when the replica is unknown and sent only a delta (it must send its full listing)."""
        if full:
            self.forget(replica)
            self.known.add(replica)
        elif replica not in self.known:
            return False
        for key in inserts:
            self.holders.setdefault(key, set()).add(replica)
        for key in evicts:
            held = self.holders.get(key)
            if held is not None:
                held.discard(replica)
                if not held:
                    del self.holders[key]
        return True

    def match(self, hashes: list[bytes]) -> dict[str, int]:
        """Per replica: how many leading blocks of this chain it holds."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        for i, key in enumerate(hashes):
            held = self.holders.get(key, set())
            alive = held if alive is None else alive & held
            if not alive:
                break
            for r in alive:
                out[r] = i + 1
        return out

    def forget(self, replica: str) -> None:
        self.known.discard(replica)
        for key in [k for k, held in self.holders.items() if replica in held]:
            self.holders[key].discard(replica)
            if not self.holders[key]:
                del self.holders[key]

    def size(self) -> dict:
        return {"blocks": len(self.holders), "replicas": sorted(self.known)}


@ray.remote(num_cpus=0)
class PrefixDirectory(PrefixDirectoryState):
    pass


def directory_handle():
    """The cluster's directory actor, created on first use (again after it died)."""
    return PrefixDirectory.options(name=NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()
