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
import threading

from ray import serve

from kv_transfer import ChannelSender, Landing, PairChannel, StateStream, TransferError, finish
from workers.async_engine import AsyncEngine
from workers.engine import EngineInputError
from workers.pools import OutOfPages

from .directory import directory_handle
from .metrics import ReplicaMetrics
from .profiles import EndpointProfile

PUBLISH_PERIOD_S = 0.2


@serve.deployment
class EngineReplica:
    def __init__(self, profile: dict, decode=None):
        """decode: on a prefill replica, the handle of the decode group (to open channels to it)."""
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
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.metrics = ReplicaMetrics(context.deployment, self.replica_id)
        self.host = ray.util.get_node_ip_address()
        self._publisher: asyncio.Task | None = None
        self.decode = decode
        self.landing = Landing()  # reservations waiting for their state (decode side)
        self._receiving: dict[str, tuple[object, concurrent.futures.Future]] = {}  # ticket -> (state, receipt)
        self._senders: dict[str, ChannelSender] = {}  # decode replica -> channel to it (prefill side)
        self._channel_locks: dict[str, asyncio.Lock] = {}
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
                yield self._counted(out)
        except EngineInputError as e:
            yield {"error": str(e), "status": 400}

    def _counted(self, out) -> dict:
        d = dataclasses.asdict(out)
        if d["finished"]:
            self.metrics.finished(d)
        return d

    # ---- disaggregated: the prefill side --------------------------------------------------------
    async def prefill(self, request: dict) -> dict:
        """Compute the prompt's state and stream it to request["dest"] (a decode replica's
        reservation) while computing: the entries each chunk closes leave right after it, the
        rest at the end. Answers the first token and the sampler state."""
        self._ensure_publisher()
        rid = f"prefill-{next(self._tickets)}"
        dest = request["dest"]
        try:
            sender = await self._sender_to(dest)
        except TransferError as e:
            return {"error": f"state transfer failed: {e}", "status": 503}
        stream = StateStream(dest["ticket"], self._transfer_device())
        sent: list[concurrent.futures.Future] = []
        failed: list[Exception] = []

        def on_chunk(state) -> None:  # on the engine's thread, right after a chunk's forward
            try:
                frame = stream.ready_frame(state)
                if frame is not None:
                    sent.append(sender.submit(frame))
            except Exception as e:  # kept for the end: raising here would fail the whole batch
                failed.append(e)

        try:
            outs = [o async for o in self.async_engine.generate(request["prompt_ids"], request.get("params"),
                                                                  request_id=rid, prefill_only=True, on_chunk=on_chunk)]
        except EngineInputError as e:
            return {"error": str(e), "status": 400}
        first = outs[-1]
        if first.finish_reason != "prefilled":  # finished on its first token: nothing to ship
            return {"finished": dataclasses.asdict(first)}
        state, gen = await self.async_engine.call(lambda e: e.take_handoff(rid))
        gen_state = gen.get_state().numpy().tobytes() if gen is not None else None
        loop = asyncio.get_running_loop()

        def free(st) -> None:  # from the transfer thread: the engine's thread frees
            loop.call_soon_threadsafe(lambda: loop.create_task(self.async_engine.call(lambda e: st.free())))

        if failed:
            free(state)
            self.metrics.transfer_failed()
            return {"error": f"state transfer failed: packing a frame failed: {failed[0]}", "status": 503}
        prefilled = loop.time()
        try:  # the last frames read the handed-over state (ours alone now) and sync the device once
            await loop.run_in_executor(self._io, lambda: finish(sender, stream, state, sent,
                                                                {"first_token": first.new_token_ids[0]}, free))
        except TransferError as e:
            self.metrics.transfer_failed()
            return {"error": f"state transfer failed: {e}", "status": 503}
        self.metrics.transferred(stream.bytes, loop.time() - prefilled)
        return {"first_token": first.new_token_ids[0], "generator_state": gen_state, "bytes": stream.bytes,
                "frames": stream.frames}

    async def _sender_to(self, dest: dict) -> ChannelSender:
        """The channel to a decode replica: made on first use (the decode side connects back to a
        store this replica hosts), then kept for every later transfer to it."""
        key = dest["replica"]
        async with self._channel_locks.setdefault(key, asyncio.Lock()):
            sender = self._senders.pop(key, None)
            if sender is not None and not sender.broken:
                self._senders[key] = sender
                return sender
            if sender is not None:  # broken (its peer died or timed out): release it, open a new one
                sender.channel.close()
            port = _free_port()
            timeout = self.profile.transfer_timeout_s
            opening = asyncio.get_running_loop().run_in_executor(
                self._io, lambda: PairChannel(self.host, port, 0, timeout_s=timeout, device=self._transfer_device()))
            try:
                await self.decode.connect.remote({"replica": key, "host": self.host, "port": port})
            except Exception as e:  # the opening side gives up at its own time-out
                raise TransferError(f"decode replica {key} did not connect: {type(e).__name__}: {e}") from None
            sender = ChannelSender(await opening)
            self._senders[key] = sender
            return sender

    def _transfer_device(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"

    # ---- disaggregated: the decode side ---------------------------------------------------------
    async def reserve(self, request: dict) -> dict:
        """Reserve pages for a state of request["num_tokens"] tokens; frames for it may arrive on
        any channel until the transfer time-out, after which the pages are freed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.profile.transfer_timeout_s
        while True:  # admission waits for pages (finishing requests free theirs), up to the time-out
            try:
                state = await self.async_engine.call(lambda e: e.new_import_state(request["num_tokens"]))
                break
            except OutOfPages:
                if loop.time() > deadline:
                    return {"error": "no free pages on this decode replica", "status": 503}
                await asyncio.sleep(0.05)
        ticket = f"{self.replica_id}-{next(self._tickets)}"

        def free_pages(st) -> None:  # from a timer or receive thread: the engine's thread frees
            loop.call_soon_threadsafe(lambda: loop.create_task(self.async_engine.call(lambda e: st.free())))

        receipt = self.landing.expect(ticket, state, self.profile.transfer_timeout_s, free_pages)
        self._receiving[ticket] = (state, receipt)
        # a state that arrived but is never asked for (its caller vanished) is freed after a while
        receipt.add_done_callback(lambda f: loop.call_soon_threadsafe(
            loop.call_later, self.profile.transfer_timeout_s, self._expire_unclaimed, ticket))
        return {"ticket": ticket, "host": self.host, "replica": self.replica_id}

    def _expire_unclaimed(self, ticket: str) -> None:
        entry = self._receiving.get(ticket)
        if entry is not None and entry[1].exception() is None:
            del self._receiving[ticket]
            state = entry[0]
            asyncio.get_running_loop().create_task(self.async_engine.call(lambda e: state.free()))

    async def connect(self, request: dict) -> dict:
        """Join the channel a prefill replica opened (request: host, port) and receive on it."""
        timeout = self.profile.transfer_timeout_s
        ch = await asyncio.get_running_loop().run_in_executor(
            self._io, lambda: PairChannel(request["host"], request["port"], 1, timeout_s=timeout,
                                          device=self._transfer_device()))
        threading.Thread(target=self.landing.serve, args=(ch,), name="kv-recv", daemon=True).start()
        return {"connected": True}

    async def _generate_imported(self, request: dict):
        import torch

        ticket = request["ticket"]
        if ticket not in self._receiving:
            yield {"error": f"unknown transfer ticket {ticket!r} (decode replica restarted?)", "status": 503}
            return
        state, receipt = self._receiving.pop(ticket)
        try:
            await asyncio.wrap_future(receipt)
        except Exception as e:  # the landing freed the pages already
            yield {"error": f"state transfer failed: {e}", "status": 503}
            return
        gen = None
        if request.get("generator_state") is not None:
            gen = torch.Generator(device=self.device)
            gen.set_state(torch.frombuffer(bytearray(request["generator_state"]), dtype=torch.uint8))
        try:
            async for out in self.async_engine.continue_imported(request["prompt_ids"], request.get("params"),
                                                                 request["first_token"], state, generator=gen):
                yield self._counted(out)
        except EngineInputError as e:
            yield {"error": str(e), "status": 400}

    async def cancel_reservation(self, request: dict) -> None:
        """Give up a reservation (its prefill failed, finished early, or its client left): pages
        still receiving are freed by the landing, a completed one's here."""
        entry = self._receiving.pop(request["ticket"], None)
        if entry is None:
            return
        state, receipt = entry
        if receipt.done() and receipt.exception() is None:
            await self.async_engine.call(lambda e: state.free())
        else:
            self.landing.cancel(request["ticket"])

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
            self.metrics.load(self.async_engine.load())
            await asyncio.sleep(PUBLISH_PERIOD_S)

    async def stats(self, request: dict | None = None) -> dict:
        """Load and the pages this replica's requests hold (request {"replica": id} routes here)."""
        pages = await self.async_engine.call(lambda e: e.pages_in_use())
        return {**self.async_engine.load(), "pages_in_use": pages, "replica": self.replica_id}

    def record_routing_stats(self) -> dict:
        """Polled by Serve's request router."""
        return self.async_engine.load()

    async def check_health(self) -> None:
        """Serve restarts a replica whose engine loop died. Serve calls this from the start (every
        10 s), so it also starts the publisher of a replica no request has reached yet: its load
        and pages are on the dashboards from the start, not from its first request."""
        self._ensure_publisher()
        err = self.async_engine.failure()
        if err is not None:
            raise RuntimeError(f"engine loop died: {err!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
