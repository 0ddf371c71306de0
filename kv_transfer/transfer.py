"""Sending a request's state layer by layer, and landing it in reserved pages on the other side."""

from __future__ import annotations

import torch

from .channel import PairChannel, TransferError
from .wire import checksum, header


def send_state(ch: PairChannel, request: str, state, layers: range | None = None, extra: dict | None = None) -> int:
    """Send every layer's state (or `layers`), then a closing frame carrying `extra` (e.g. the first
    sampled token); returns the payload bytes sent."""
    sums: dict[str, int] = {}
    sent = 0
    for layer in layers if layers is not None else range(len(state.layers)):
        for family, t in state.export_layer(layer):
            ch.send(header(request, layer, family, t), t)
            sums[f"{layer}.{family}"] = checksum(t)
            sent += t.numel() * t.element_size()
    empty = torch.empty(0, dtype=torch.uint8)
    ch.send({**header(request, -1, "done", empty), "done": True, "num_tokens": state.num_tokens,
             "checksums": sums, "bytes": sent, **(extra or {})}, empty)
    return sent


def recv_state(ch: PairChannel, request: str, state, free_on_failure: bool = True) -> dict:
    """Receive into `state` (pages reserved with prepare_import). On any failure the state's pages
    are freed (unless the caller frees them on its own thread) and TransferError raised; returns
    the closing frame."""
    try:
        sums: dict[str, int] = {}
        received = 0
        while True:
            h, t = ch.recv()
            if h.get("request") != request:
                raise TransferError(f"frame for request {h.get('request')!r} while receiving {request!r}")
            if h.get("done"):
                if h["num_tokens"] != state.num_tokens:
                    raise TransferError(f"state at {h['num_tokens']} tokens, pages reserved for {state.num_tokens}")
                if h["checksums"] != sums or h["bytes"] != received:
                    raise TransferError("checksums or byte count differ from what arrived")
                return h
            state.import_layer(h["layer"], h["family"], t)
            sums[f"{h['layer']}.{h['family']}"] = checksum(t)
            received += h["nbytes"]
    except Exception as e:
        if free_on_failure:
            state.free()
        if isinstance(e, TransferError):
            raise
        raise TransferError(f"transfer of {request!r} failed: {e}") from None
