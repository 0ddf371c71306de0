"""The engine replica deployment: one engine (model + pools + prefix cache) per replica.

A thin adapter: requests arrive through a Serve handle as plain dicts, outputs stream back as
plain dicts. Admission: beyond `max_queued_per_replica` waiting requests a new one is refused with
429 rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import dataclasses

from ray import serve

from workers.async_engine import AsyncEngine
from workers.engine import Engine, EngineInputError

from .directory import directory_handle
from .profiles import EndpointProfile

PUBLISH_PERIOD_S = 0.2


@serve.deployment
class EngineReplica:
    def __init__(self, profile: dict):
        import torch

        from workers.loader import load_model

        torch.set_num_threads(1)  # replicas share the host's cores; one BLAS pool each
        self.profile = EndpointProfile(**profile)
        p = self.profile
        device = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
        model, tok = load_model(p.model, dtype=getattr(torch, p.dtype), device=device, rounding=p.reference_rounding)
        self.engine = Engine(model, p.engine_config(), tokenizer=tok, model_id=p.model_name)
        self.async_engine = AsyncEngine(self.engine)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._publisher: asyncio.Task | None = None

    async def _publish_forever(self) -> None:
        """Send prefix-cache inserts/evictions to the directory in batches; a directory that does not
        know this replica (new, or restarted) gets the full listing instead."""
        directory, full = None, True
        while True:
            try:
                if directory is None:
                    directory, full = directory_handle(), True
                if full:
                    keys = self.async_engine.cached_keys()
                    full = not await directory.publish.remote(self.replica_id, keys, [], True)
                else:
                    events = self.async_engine.take_cache_events()
                    inserts = [k for e, k in events if e == "insert"]
                    evicts = [k for e, k in events if e == "evict"]
                    if events:
                        full = not await directory.publish.remote(self.replica_id, inserts, evicts, False)
            except Exception:  # the directory died: it is recreated and rebuilt on the next round
                directory = None
            await asyncio.sleep(PUBLISH_PERIOD_S)

    async def generate(self, request: dict):
        """request: {"prompt_ids": [...], "params": {...}}. Yields RequestOutput dicts, or one
        {"error": message, "status": http status} before any output."""
        if self._publisher is None:
            self._publisher = asyncio.get_running_loop().create_task(self._publish_forever())
        if len(self.engine.waiting) >= self.profile.max_queued_per_replica:
            yield {"error": "the server is at capacity; retry later", "status": 429}
            return
        try:
            stream = self.async_engine.generate(request["prompt_ids"], request.get("params"))
            async for out in stream:
                yield dataclasses.asdict(out)
        except EngineInputError as e:
            yield {"error": str(e), "status": 400}

    def load(self) -> dict:
        return self.async_engine.load()

    def record_routing_stats(self) -> dict:
        """Polled by Serve's request router."""
        return self.async_engine.load()

    def check_health(self) -> None:
        """Serve restarts a replica whose engine loop died."""
        err = self.async_engine.failure()
        if err is not None:
            raise RuntimeError(f"engine loop died: {err!r}")
