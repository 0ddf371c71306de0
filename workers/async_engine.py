"""The engine behind an asyncio front: many concurrent callers, one stepping loop.

The forward runs in a worker thread so the event loop keeps streaming tokens while the model
computes. Every mutation of the engine (add, abort, step) happens on that one thread, in order:
callers enqueue commands and the loop applies them between steps, so the engine itself needs no
locks. A caller that stops listening (client gone, task cancelled) aborts its request, which
frees its pages at once.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator

from .engine import Engine, RequestOutput
from .sampling import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: list = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._lock = threading.Lock()  # guards _commands only
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._cache_events: list[tuple[str, bytes]] = []  # prefix-cache inserts/evictions, for the directory

    def generate(self, prompt: list[int], params: SamplingParams | dict | None = None,
                 request_id: str | None = None, prefill_only: bool = False,
                 on_chunk=None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs. Invalid requests raise EngineInputError before anything is
        queued. prefill_only: stop after the first token and keep the state for a transfer
        (on_chunk: see Engine.add_prefill)."""
        params = self.engine.validate(list(prompt), params)
        rid = request_id or f"async-{next(self._ids)}"
        return self._stream(rid, ("add", rid, list(prompt), params, prefill_only, on_chunk))

    def continue_imported(self, prompt: list[int], params, first_token: int, state, generator=None,
                          request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request prefilled elsewhere whose state was imported (see Engine.add_imported)."""
        rid = request_id or f"async-{next(self._ids)}"
        return self._stream(rid, ("import", rid, list(prompt), params, first_token, state, generator))

    async def call(self, fn):
        """Run fn(engine) on the engine's thread between steps (pool and queue mutations live there)."""
        fut = asyncio.get_running_loop().create_future()
        self._submit(("call", fn, fut, asyncio.get_running_loop()))
        return await fut

    async def _stream(self, rid: str, command) -> AsyncIterator[RequestOutput]:
        """Queue `command` for request rid and yield its outputs until it finishes; a caller that
        stops listening aborts the request."""
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        self._submit(command)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self._submit(("abort", rid))

    def failure(self) -> BaseException | None:
        """The exception that ended the stepping loop, if it died."""
        t = self._task
        return t.exception() if t is not None and t.done() and not t.cancelled() else None

    def load(self) -> dict:
        """Queue and batch sizes, for routing and admission decisions."""
        e = self.engine
        return {"waiting": len(e.waiting), "running": len(e.running),
                "waiting_prefill_tokens": sum(s.pending for s in list(e.waiting) + list(e.running) if s.prefilling),
                "free_blocks": e.pools.block_pool.num_free, "blocks": e.pools.block_pool.num_pages}

    # ---- the loop -----------------------------------------------------------------------------
    def _submit(self, command) -> None:
        with self._lock:
            self._commands.append(command)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with self._lock:
                pending = bool(self._commands)
            if not pending and not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            results = await asyncio.to_thread(self._tick)
            for rid, item in results:
                q = self._queues.get(rid)
                if q is not None:
                    q.put_nowait(item)

    def _tick(self) -> list[tuple[str, object]]:
        """Apply queued commands, then one engine step (on the worker thread)."""
        with self._lock:
            commands, self._commands = self._commands, []
        results: list[tuple[str, object]] = []
        for cmd in commands:
            if cmd[0] == "add":
                _, rid, prompt, params, prefill_only, on_chunk = cmd
                try:
                    if prefill_only:
                        self.engine.add_prefill(prompt, params, request_id=rid, on_chunk=on_chunk)
                    else:
                        self.engine.add_request(prompt, params, request_id=rid)
                except Exception as e:  # surfaced to that caller, the loop goes on
                    results.append((rid, e))
            elif cmd[0] == "import":
                _, rid, prompt, params, first, state, gen = cmd
                try:
                    out = self.engine.add_imported(prompt, params, first, state, request_id=rid, generator=gen)
                    results.append((rid, out))
                    if out.finished:
                        self.engine.release(rid)
                except Exception as e:
                    results.append((rid, e))
            elif cmd[0] == "call":
                _, fn, fut, loop = cmd
                try:
                    value = fn(self.engine)
                    loop.call_soon_threadsafe(lambda f=fut, v=value: f.done() or f.set_result(v))
                except Exception as e:
                    loop.call_soon_threadsafe(lambda f=fut, x=e: f.done() or f.set_exception(x))
            else:
                self.engine.abort(cmd[1])
                self.engine.release(cmd[1])
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failed forward fails the requests in it, not the replica
            outputs = []
            for seq in list(self.engine.running):
                results.append((seq.request_id, e))
                self.engine.abort(seq.request_id)
        for out in outputs:
            results.append((out.request_id, out))
            if out.finished:
                self.engine.release(out.request_id)
        if self.engine.cache is not None:
            events = self.engine.cache.drain_events()
            with self._lock:
                self._cache_events += events
        return results

    def take_cache_events(self) -> list[tuple[str, bytes]]:
        with self._lock:
            events, self._cache_events = self._cache_events, []
        return events

    def cached_keys(self) -> list[bytes]:
        """Every block key in the prefix cache now (a full listing for a rebuilt directory)."""
        with self._lock:
            self._cache_events = []  # the listing supersedes them
            return list(self.engine.cache.blocks) if self.engine.cache is not None else []
