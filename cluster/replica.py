"""The engine replica deployment: one engine (model + pools + prefix cache) per replica.

A thin adapter: requests arrive through a Serve handle as plain dicts, outputs stream back as
plain dicts. One class serves three roles, chosen by the application: a replica that prefills and
decodes its own requests, a prefill replica (`prefill`: compute the prompt's state and stream it
to a decode replica) and a decode replica (`reserve` pages and receive a state, then `generate`
from it). Admission: beyond `max_queued_per_replica` waiting requests a new one gets 429.
"""

import asyncio
import concurrent.futures
import dataclasses
import itertools
import socket

from ray import serve

from kv_transfer import PairChannel, TransferError, recv_state, send_state
from workers.async_engine import AsyncEngine
from workers.engine import EngineInputError
from workers.pools import OutOfPages

from .directory import directory_handle
from .profiles import EndpointProfile

PUBLISH_PERIOD_S = 0.2


@serve.deployment
class EngineReplica:
    def __init__(self, profile: dict):
        import ray
        import torch

        from workers.engine import Engine
        from workers.loader import load_model

        torch.set_num_threads(1)  # replicas share the host's cores; one BLAS pool each
        self.profile = EndpointProfile(**profile)
        p = self.profile
        device = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
        self.device = device
        model, tok = load_model(p.model, dtype=getattr(torch, p.dtype), device=device, rounding=p.reference_rounding)
        self.engine = Engine(model, p.engine_config(), tokenizer=tok, model_id=p.model_name)
        self.async_engine = AsyncEngine(self.engine)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.host = ray.util.get_node_ip_address()
        self._publisher: asyncio.Task | None = None
        self._receiving: dict[str, tuple[object, concurrent.futures.Future]] = {}  # ticket -> (state, receipt)
        self._tickets = itertools.count()
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="kv-transfer")

    # ---- aggregated: prefill and decode here ------------------------------------------------
    async def generate(self, request: dict):
        """request: {"prompt_ids", "params"} (or, on a decode replica, also "ticket", "first_token",
        "generator_state"). Yields RequestOutput dicts, or one {"error", "status"} before any output."""
        self._ensure_publisher()
        if "ticket" in request:
            async for item in self._generate_imported(request):
                yield item
            return
        if len(self.engine.waiting) >= self.profile.max_queued_per_replica:
            yield {"error": "the server is at capacity; retry later", "status": 429}
            return
        try:
            async for out in self.async_engine.generate(request["prompt_ids"], request.get("params")):
                yield dataclasses.asdict(out)
        except EngineInputError as e:
            yield {"error": str(e), "status": 400}

    # ---- disaggregated: the prefill side --------------------------------------------------------
    async def prefill(self, request: dict) -> dict:
        """Compute the prompt's state, stream it to request["dest"] (a decode replica's reservation),
        and answer the first token and the sampler state."""
        self._ensure_publisher()
        rid = f"prefill-{next(self._tickets)}"
        try:
            outs = [o async for o in self.async_engine.generate(request["prompt_ids"], request.get("params"),
                                                                  request_id=rid, prefill_only=True)]
        except EngineInputError as e:
            return {"error": str(e), "status": 400}
        first = outs[-1]
        if first.finish_reason != "prefilled":  # finished on its first token: nothing to ship
            return {"finished": dataclasses.asdict(first)}
        state, gen = await self.async_engine.call(lambda e: e.take_handoff(rid))
        dest = request["dest"]
        gen_state = gen.get_state().numpy().tobytes() if gen is not None else None

        def ship():
            ch = PairChannel(dest["host"], dest["port"], 1, timeout_s=self.profile.transfer_timeout_s)
            return send_state(ch, dest["ticket"], state, extra={"first_token": first.new_token_ids[0]})

        try:
            sent = await asyncio.get_running_loop().run_in_executor(self._io, ship)
        except TransferError as e:
            return {"error": f"state transfer failed: {e}", "status": 503}
        finally:
            await self.async_engine.call(lambda e: state.free())
        return {"first_token": first.new_token_ids[0], "generator_state": gen_state, "bytes": sent}

    # ---- disaggregated: the decode side ---------------------------------------------------------
    async def reserve(self, request: dict) -> dict:
        """Reserve pages for a state of request["num_tokens"] tokens and start listening for it."""
        deadline = asyncio.get_running_loop().time() + self.profile.transfer_timeout_s
        while True:  # admission waits for pages (finishing requests free theirs), up to the time-out
            try:
                state = await self.async_engine.call(lambda e: e.new_import_state(request["num_tokens"]))
                break
            except OutOfPages:
                if asyncio.get_running_loop().time() > deadline:
                    return {"error": "no free pages on this decode replica", "status": 503}
                await asyncio.sleep(0.05)
        ticket = f"{self.replica_id}-{next(self._tickets)}"
        port = _free_port()

        def receive():
            ch = PairChannel(self.host, port, 0, timeout_s=self.profile.transfer_timeout_s)
            return recv_state(ch, ticket, state, free_on_failure=False)

        receipt = self._io.submit(receive)
        self._receiving[ticket] = (state, receipt)
        loop = asyncio.get_running_loop()
        # A transfer that fails before anyone asks for it frees its pages by itself.
        receipt.add_done_callback(lambda f: f.exception() is None or loop.call_soon_threadsafe(self._drop, ticket))
        return {"ticket": ticket, "host": self.host, "port": port, "replica": self.replica_id}

    def _drop(self, ticket: str) -> None:
        entry = self._receiving.pop(ticket, None)
        if entry is not None:
            state = entry[0]
            asyncio.get_running_loop().create_task(self.async_engine.call(lambda e: state.free()))

    async def _generate_imported(self, request: dict):
        import torch

        ticket = request["ticket"]
        if ticket not in self._receiving:
            yield {"error": f"unknown transfer ticket {ticket!r} (decode replica restarted?)", "status": 503}
            return
        state, receipt = self._receiving.pop(ticket)
        try:
            await asyncio.wrap_future(receipt)
        except Exception as e:
            await self.async_engine.call(lambda eng: state.free())
            yield {"error": f"state transfer failed: {e}", "status": 503}
            return
        gen = None
        if request.get("generator_state") is not None:
            gen = torch.Generator(device=self.device)
            gen.set_state(torch.frombuffer(bytearray(request["generator_state"]), dtype=torch.uint8))
        try:
            async for out in self.async_engine.continue_imported(request["prompt_ids"], request.get("params"),
                                                                 request["first_token"], state, generator=gen):
                yield dataclasses.asdict(out)
        except EngineInputError as e:
            yield {"error": str(e), "status": 400}

    async def cancel_reservation(self, request: dict) -> None:
        """Give up a reservation (its prefill failed or finished early): the pages are freed once
        the listening side has ended (at once, or when its receive times out)."""
        entry = self._receiving.get(request["ticket"])
        if entry is None:
            return
        loop = asyncio.get_running_loop()
        entry[1].add_done_callback(lambda f: loop.call_soon_threadsafe(self._drop, request["ticket"]))

    # ---- routing and health -------------------------------------------------------------------
    def _ensure_publisher(self) -> None:
        if self._publisher is None:
            self._publisher = asyncio.get_running_loop().create_task(self._publish_forever())

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
