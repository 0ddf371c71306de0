"""The wire format of state transfer: one frame per piece of a layer's state.

A frame is a fixed 16-byte prefix (header length, payload length, int64), a msgpack header
(request id, layer, family, dtype, shape, byte count) and the raw payload bytes. The final frame
of a request carries `done` with the position and per-family checksums, so the receiver can tell
a complete state from a truncated one.
"""

from __future__ import annotations

import zlib

import msgpack
import torch

DTYPES = {str(t).removeprefix("torch."): t for t in (torch.uint8, torch.float32, torch.bfloat16, torch.float16)}


class WireError(ValueError):
    """A frame that does not decode."""


def header(request: str, layer: int, family: str, t: torch.Tensor) -> dict:
    return {"request": request, "layer": layer, "family": family, "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape), "nbytes": t.numel() * t.element_size()}


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The payload of a tensor: its bytes as a flat uint8 tensor (no copy when contiguous)."""
    return t.contiguous().view(torch.uint8).reshape(-1)


def from_bytes(h: dict, payload: torch.Tensor) -> torch.Tensor:
    if h["dtype"] not in DTYPES:
        raise WireError(f"unknown dtype {h['dtype']!r} in frame {h}")
    if payload.numel() != h["nbytes"]:
        raise WireError(f"frame says {h['nbytes']} bytes, payload has {payload.numel()}")
    return payload.view(DTYPES[h["dtype"]]).reshape(h["shape"])


def pack_header(h: dict) -> bytes:
    return msgpack.packb(h)


def unpack_header(b: bytes) -> dict:
    try:
        h = msgpack.unpackb(b)
    except Exception as e:  # msgpack raises several unrelated types for corrupt input
        raise WireError(f"corrupt frame header: {e}") from None
    if not isinstance(h, dict):
        raise WireError("frame header is not a map")
    return h


def checksum(t: torch.Tensor) -> int:
    return zlib.crc32(as_bytes(t.cpu()).numpy().tobytes())
