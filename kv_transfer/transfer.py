"""Whole-state transfer of one request over a channel, for callers that already have the full
state (a finished prefill, a benchmark): the same frames a streamed transfer sends, at once."""

from __future__ import annotations

from .channel import PairChannel, TransferError
from .landing import Reception
from .stream import StateStream


def send_state(ch: PairChannel, ticket: str, state, extra: dict | None = None) -> int:
    """Send every piece of `state`, then the closing frame carrying `extra`; returns payload bytes."""
    stream = StateStream(ticket, ch.device)
    for header, payload in stream.last_frames(state, extra):
        ch.send(header, payload)
    return stream.bytes


def recv_state(ch: PairChannel, ticket: str, state, free_on_failure: bool = True) -> dict:
    """Land a state sent with send_state (or streamed) in `state` (pages reserved with
    prepare_import); returns the closing frame. On failure the pages are freed (unless the
    caller frees them itself) and TransferError raised."""
    r = Reception(ticket, state, lambda s: None)
    try:
        while True:
            header, payload = ch.recv()
            if header["ticket"] != ticket:
                raise TransferError(f"frame for {header['ticket']!r} while receiving {ticket!r}")
            if header.get("done"):
                r.close(header)
                return header
            r.land(header, payload)
    except Exception as e:
        if free_on_failure:
            state.free()
        if isinstance(e, TransferError):
            raise
        raise TransferError(f"transfer of {ticket!r} failed: {e}") from None
