"""The receiving side: reserved states, and the loops that land frames in them.

A decode replica registers each reservation (`Landing.expect`: a ticket, a PagedRequestState
whose pages are reserved, a deadline) and runs one receive loop per channel (`Landing.serve`).
Frames of any ticket may arrive on any channel; each is checked (sequence, piece bounds, rows in
order) and written into its state's pages. The closing frame is checked against what arrived
(frame count, bytes, checksums, every entry row present) and resolves the reservation's future.

Failure frees pages exactly once, whichever comes first: the deadline passes, the channel dies,
a frame is wrong, or the reservation is cancelled. A lock per reservation orders this against a
frame being written, so no byte lands in a page after it was given back.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable

import torch

from .channel import PairChannel, TransferError
from .wire import checksum, unpack


class Reception:
    def __init__(self, ticket: str, state, on_failure: Callable[[object], None]):
        self.ticket, self.state, self.on_failure = ticket, state, on_failure
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.lock = threading.Lock()
        self.frames = 0
        self.bytes = 0
        self.sums: torch.Tensor | None = None
        self.rows: dict[tuple[int, str], int] = {}  # entry rows landed per (layer, family), in order
        self.tails = 0
        self.timer: threading.Timer | None = None
        self.channel: PairChannel | None = None  # the channel its frames come on (known from the first)

    def land(self, header: dict, payload: torch.Tensor) -> None:
        """Write one frame (the caller holds the lock)."""
        if header.get("seq") != self.frames:
            raise TransferError(f"frame {header.get('seq')} of {self.ticket!r} arrived, expected {self.frames}")
        for p in unpack(header["pieces"], payload):
            if p.kind == "entries":
                key = (p.layer, p.family)
                if p.start != self.rows.get(key, 0):
                    raise TransferError(f"{self.ticket!r} layer {p.layer} {p.family}: rows from {p.start}, "
                                        f"expected {self.rows.get(key, 0)}")
                self.rows[key] = p.start + p.tensor.shape[0]
            else:
                self.tails += 1
            self.state.import_piece(p.layer, p.kind, p.family, p.start, p.tensor)
        s = checksum(payload)
        self.sums = s if self.sums is None else self.sums + s
        self.frames += 1
        self.bytes += payload.numel()

    def close(self, done: dict) -> None:
        """Check the closing frame against what landed (the caller holds the lock)."""
        st = self.state
        if done["num_tokens"] != st.num_tokens:
            raise TransferError(f"state at {done['num_tokens']} tokens, pages reserved for {st.num_tokens}")
        expected = st.entry_counts()
        missing = {k: (self.rows.get(k, 0), n) for k, n in expected.items() if self.rows.get(k, 0) != n}
        if missing:
            raise TransferError(f"{self.ticket!r}: entry rows (landed, expected) differ: {missing}")
        sums = self.sums.tolist() if self.sums is not None else [0, 0]
        if done["frames"] != self.frames or done["bytes"] != self.bytes or done["checksum"] != sums:
            raise TransferError(f"{self.ticket!r}: {self.frames} frames / {self.bytes} bytes / checksum {sums} "
                                f"landed, sender says {done['frames']} / {done['bytes']} / {done['checksum']}")


class Landing:
    """Every reservation of one decode replica, and its receive loops."""

    def __init__(self):
        self._open: dict[str, Reception] = {}
        self._lock = threading.Lock()

    def expect(self, ticket: str, state, timeout_s: float, on_failure: Callable[[object], None]) -> concurrent.futures.Future:
        """Register a reservation; its future resolves with the closing frame, or fails (after
        on_failure(state) was called once) when the transfer does not complete in timeout_s."""
        r = Reception(ticket, state, on_failure)
        with self._lock:
            self._open[ticket] = r
        r.timer = threading.Timer(timeout_s, self.fail, (ticket, TransferError(f"transfer of {ticket!r} timed out after {timeout_s:g} s")))
        r.timer.daemon = True
        r.timer.start()
        return r.future

    def fail(self, ticket: str, error: Exception) -> None:
        """End a reservation that has not completed: free its pages, fail its future."""
        with self._lock:
            r = self._open.pop(ticket, None)
        if r is None:
            return
        with r.lock:
            if r.future.done():  # completed while this failure waited for the lock
                return
            if r.timer is not None:
                r.timer.cancel()
            r.on_failure(r.state)
            r.future.set_exception(error)

    def cancel(self, ticket: str) -> None:
        self.fail(ticket, TransferError(f"reservation {ticket!r} cancelled"))

    def serve(self, channel: PairChannel) -> None:
        """The receive loop of one channel (run on a thread of its own until the channel dies)."""
        while True:
            try:
                header, payload = channel.recv(idle=True)
            except TransferError as e:
                self._fail_all_from(channel, e)
                channel.close()
                return
            ticket = header["ticket"]
            with self._lock:
                r = self._open.get(ticket)
                if r is not None:
                    r.channel = channel
            if r is None:  # cancelled or timed out already: its frames are dropped
                continue
            try:
                with r.lock:
                    if r.future.done():
                        continue
                    if header.get("done"):
                        r.close(header)
                        if r.timer is not None:
                            r.timer.cancel()
                        with self._lock:
                            self._open.pop(ticket, None)
                        r.future.set_result(header)
                    else:
                        r.land(header, payload)
            except Exception as e:  # a wrong frame fails its request; the channel stays usable
                self.fail(ticket, e if isinstance(e, TransferError) else TransferError(f"{ticket!r}: {e}"))

    def _fail_all_from(self, channel: PairChannel, error: TransferError) -> None:
        """The channel died: every reservation it was feeding fails."""
        with self._lock:
            tickets = [t for t, r in self._open.items() if r.channel is channel]
        for t in tickets:
            self.fail(t, error)
