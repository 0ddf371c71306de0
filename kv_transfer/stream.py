"""The sending side: a request's state leaves in frames while its prefill runs.

Compressed entries never change once written, so after every prefill chunk the entries that
chunk closed are packed into one frame and sent while the next chunk computes (`StateStream.
ready_frame`, called on the engine's thread right after the forward). When the prefill ends, one
last frame carries the rest: entries of the final chunk and each layer's tail (window keys and
compressor state), which only exist at the prompt's end; a `done` frame closes the request.

Frames are packed where the engine runs (so the bytes are copied before any page can be reused)
and sent by one thread per channel (`ChannelSender`), in order, so the frames of concurrent
requests interleave whole on a shared channel.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading

import torch

from .channel import PairChannel, TransferError
from .wire import Piece, checksum, pack


class StateStream:
    """One request's frames, built from its PagedRequestState as it grows."""

    def __init__(self, ticket: str, device: torch.device | str):
        self.ticket, self.device = ticket, device
        self.sent: dict[tuple[int, str], int] = {}  # entries already framed per (layer, family)
        self.frames = 0
        self.bytes = 0
        self.sums = torch.zeros(2, dtype=torch.int64, device=device)

    def ready_frame(self, state) -> tuple[dict, torch.Tensor] | None:
        """A frame of the entries that exist now and were not sent yet (None when there are none)."""
        pieces = self._new_entries(state)
        return self._frame(pieces) if pieces else None

    def last_frames(self, state, extra: dict | None = None) -> list[tuple[dict, torch.Tensor]]:
        """The remaining entries and every layer's tail, then the closing frame (carrying `extra`,
        e.g. the first sampled token)."""
        pieces = self._new_entries(state)
        for layer in range(len(state.layers)):
            pieces += [Piece(layer, kind, family, 0, t) for kind, family, t in state.tail(layer)]
        frames = [self._frame(pieces)]
        done = {"ticket": self.ticket, "done": True, "num_tokens": state.num_tokens, "frames": self.frames,
                "bytes": self.bytes, "checksum": self.sums.tolist(), **(extra or {})}
        return frames + [(done, torch.empty(0, dtype=torch.uint8, device=self.device))]

    def _new_entries(self, state) -> list[Piece]:
        pieces = []
        for (layer, family), n in state.entry_counts().items():
            start = self.sent.get((layer, family), 0)
            if n > start:
                pieces.append(Piece(layer, "entries", family, start, state.entry_rows(layer, family, start, n)))
                self.sent[(layer, family)] = n
        return pieces

    def _frame(self, pieces: list[Piece]) -> tuple[dict, torch.Tensor]:
        meta, payload = pack(pieces, self.device)
        self.sums += checksum(payload)
        header = {"ticket": self.ticket, "seq": self.frames, "pieces": meta}
        self.frames += 1
        self.bytes += payload.numel()
        return header, payload


def finish(sender: "ChannelSender", stream: StateStream, state, pending: list[concurrent.futures.Future],
           extra: dict | None, free) -> int:
    """Send a request's last frames and wait for all of its frames (`pending`: those sent during
    the prefill); `free(state)` runs however it ends. Returns the payload bytes; raises
    TransferError when any frame did not go (time-out, dead peer)."""
    try:
        pending = pending + [sender.submit(f) for f in stream.last_frames(state, extra)]
        for fut in pending:
            fut.result()
        return stream.bytes
    finally:
        free(state)


class ChannelSender:
    """One thread sending the frames queued for a channel, in order. A failed send breaks the
    channel: every frame queued then, and later, fails with the same error."""

    def __init__(self, channel: PairChannel):
        self.channel = channel
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kv-send", daemon=True)
        self._thread.start()

    @property
    def broken(self) -> str | None:
        return self.channel.broken

    def submit(self, frame: tuple[dict, torch.Tensor]) -> concurrent.futures.Future:
        """Queue a frame; call it on the thread that packed the frame (on a GPU, the send waits
        for the packing work queued so far on that thread's stream, not for what comes after)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.channel.broken:
            fut.set_exception(TransferError(self.channel.broken))
            return fut
        ready = None
        if frame[1].is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        self._queue.put((frame, ready, fut))
        return fut

    def _run(self) -> None:
        side = torch.cuda.Stream() if self.channel.device != "cpu" else None
        while True:
            (header, payload), ready, fut = self._queue.get()
            if self.channel.broken:
                fut.set_exception(TransferError(self.channel.broken))
                continue
            try:
                if side is not None:  # NCCL orders the send after the current stream's work: only the packing
                    side.wait_event(ready)
                    payload.record_stream(side)
                    with torch.cuda.stream(side):
                        self.channel.send(header, payload)
                else:
                    self.channel.send(header, payload)
                fut.set_result(payload.numel())
            except TransferError as e:
                fut.set_exception(e)
