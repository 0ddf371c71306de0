"""The wire format of state transfer: frames of packed pieces, checksummed on the device.

A frame is a msgpack header and one contiguous uint8 payload. The header names the request
(`ticket`), the frame's sequence number and, per piece, where its bytes sit in the payload and
what they are (`layer`, `kind`, `family`, `start` row, dtype, shape). Many pieces share one frame
so a frame costs one control message and one bulk send however many layers it carries.

The last frame of a request is a `done` frame without payload: position, byte count and the
checksum of every frame, so the receiver can tell a complete state from a truncated or corrupt
one. Checksums are computed where the bytes are (on the GPU for GPU transfers): two int64 sums,
of the payload's 8-byte words and of the words weighted by their index, both modulo 2**64, which
no summation order changes (so CPU and GPU agree bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import torch

DTYPES = {str(t).removeprefix("torch."): t for t in (torch.uint8, torch.float32, torch.bfloat16, torch.float16)}


class WireError(ValueError):
    """A frame that does not decode."""


@dataclass(frozen=True)
class Piece:
    """One tensor of a request's state: `kind` is "entries" (rows [start, start+n) of a compressed
    family), "window" (the window keys a next query sees) or "compressor" (float32 state)."""

    layer: int
    kind: str
    family: str
    start: int
    tensor: torch.Tensor


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor (no copy when contiguous)."""
    return t.contiguous().view(torch.uint8).reshape(-1)


def pack(pieces: list[Piece], device: torch.device | str) -> tuple[list[list], torch.Tensor]:
    """(piece descriptors, one payload) with every piece's bytes back to back, copied on `device`."""
    meta, parts, off = [], [], 0
    for p in pieces:
        b = as_bytes(p.tensor)
        meta.append([p.layer, p.kind, p.family, p.start, str(p.tensor.dtype).removeprefix("torch."),
                     list(p.tensor.shape), off, b.numel()])
        parts.append(b.to(device, non_blocking=True))
        off += b.numel()
    payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)
    return meta, payload


def unpack(meta: list[list], payload: torch.Tensor) -> list[Piece]:
    """The pieces of a received payload (views into it, no copy)."""
    out = []
    for layer, kind, family, start, dtype, shape, off, nbytes in meta:
        if dtype not in DTYPES:
            raise WireError(f"unknown dtype {dtype!r} in piece {layer}.{kind}.{family}")
        if off < 0 or off + nbytes > payload.numel():
            raise WireError(f"piece {layer}.{kind}.{family} at [{off}, {off + nbytes}) overruns a {payload.numel()}-byte payload")
        t = payload[off : off + nbytes].view(DTYPES[dtype])
        if t.numel() != _prod(shape):
            raise WireError(f"piece {layer}.{kind}.{family}: {nbytes} bytes do not hold shape {shape} of {dtype}")
        out.append(Piece(layer, kind, family, start, t.view(shape)))
    return out


def checksum(payload: torch.Tensor) -> torch.Tensor:
    """[2] int64 on the payload's device: sum of 8-byte words and sum of word * (index + 1), mod 2**64."""
    n = payload.numel() // 8 * 8
    words = payload[:n].view(torch.int64)
    tail = payload[n:].to(torch.int64)
    idx = torch.arange(1, words.numel() + 1, device=payload.device, dtype=torch.int64)
    return torch.stack([words.sum() + tail.sum(), (words * idx).sum() + (tail * 31).sum()])


def pack_header(h: dict) -> bytes:
    return msgpack.packb(h)


def unpack_header(b: bytes) -> dict:
    try:
        h = msgpack.unpackb(b)
    except Exception as e:  # msgpack raises several unrelated types for corrupt input
        raise WireError(f"corrupt frame header: {e}") from None
    if not isinstance(h, dict) or "ticket" not in h:
        raise WireError("frame header is not a map with a ticket")
    return h


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
