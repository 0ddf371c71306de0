"""Per-pair channels: two replicas, one two-rank process group of their own.

No global process group: a channel is made on first use from an address the sending side
publishes (it hosts a TCPStore there), so replicas can come and go with autoscaling; it is then
kept for every later transfer between the same pair. Gloo carries the frame headers; the payload
goes over gloo on CPU and over an NCCL group made from the same store on GPUs.

Time-outs: every send, and a receive that is expected, is bounded by `timeout_s`; a time-out or
a dead peer raises TransferError and leaves the channel unusable (gloo closes the pair), so the
owner drops it. An idle receive loop waits without a bound: a peer that dies closes the
connection, which ends the wait at once.
"""

from __future__ import annotations

import datetime
import os
import struct

import torch
import torch.distributed as dist

from .wire import WireError, pack_header, unpack_header

HEADER_SLOT = 4096  # bytes of the fixed first control message: [u32 length][header ...]
IDLE = datetime.timedelta(days=7)  # default wait of the groups; real waits pass their own bound

# An NCCL operation that times out should fail that transfer, not tear the replica down.
os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


class TransferError(RuntimeError):
    """A transfer that did not complete (time-out, dead peer, corrupt frame)."""


class PairChannel:
    def __init__(self, host: str, port: int, rank: int, timeout_s: float = 30.0, device: str = "cpu",
                 open_timeout_s: float | None = None):
        """rank 0 hosts the store at host:port (the sender by convention), rank 1 connects. Blocks
        until both sides are there, or open_timeout_s (default timeout_s) passes: a peer that is
        still starting may need longer to join than an operation may take once both are there."""
        self.timeout = datetime.timedelta(seconds=timeout_s)
        opening = datetime.timedelta(seconds=timeout_s if open_timeout_s is None else open_timeout_s)
        try:
            self.store = dist.TCPStore(host, port, 2, rank == 0, timeout=opening)
            self.ctrl = dist.ProcessGroupGloo(dist.PrefixStore("ctrl", self.store), rank, 2, IDLE)
            self.data = self.ctrl
            if device != "cpu":
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = self.timeout
                self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", self.store), rank, 2, opts)
        except Exception as e:
            raise TransferError(f"cannot open channel to {host}:{port}: {_first_line(e)}") from None
        self.rank, self.peer, self.device = rank, 1 - rank, device
        self.broken: str | None = None

    def send(self, header: dict, payload: torch.Tensor) -> None:
        """One frame: the header (one control message, two if it is long), then the payload bytes."""
        raw = pack_header({**header, "nbytes": payload.numel()})
        first = bytearray(HEADER_SLOT)
        first[:4] = struct.pack("<I", len(raw))
        head = raw[: HEADER_SLOT - 4]
        first[4 : 4 + len(head)] = head
        try:
            self._wait(self.ctrl.send([torch.frombuffer(first, dtype=torch.uint8)], self.peer, 0))
            if len(raw) > len(head):
                rest = torch.frombuffer(bytearray(raw[len(head):]), dtype=torch.uint8)
                self._wait(self.ctrl.send([rest], self.peer, 1))
            if payload.numel():
                self._wait(self.data.send([payload], self.peer, 2))
        except Exception as e:
            self.broken = f"send failed: {_first_line(e)}"
            raise TransferError(self.broken) from None

    def recv(self, idle: bool = False, out: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
        """The next frame (header, payload on this channel's device). idle: wait for its header
        without a bound (a receive loop between transfers). out: a buffer to land the payload in."""
        first = torch.empty(HEADER_SLOT, dtype=torch.uint8)
        try:
            work = self.ctrl.recv([first], self.peer, 0)
            work.wait() if idle else self._wait(work)
            n = struct.unpack("<I", first[:4].numpy().tobytes())[0]
            raw = first[4 : 4 + min(n, HEADER_SLOT - 4)].numpy().tobytes()
            if n > HEADER_SLOT - 4:
                rest = torch.empty(n - (HEADER_SLOT - 4), dtype=torch.uint8)
                self._wait(self.ctrl.recv([rest], self.peer, 1))
                raw += rest.numpy().tobytes()
            h = unpack_header(raw)
            nbytes = int(h["nbytes"])
            if out is not None and out.numel() >= nbytes:
                payload = out[:nbytes]
            else:
                payload = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            if nbytes:
                self._wait(self.data.recv([payload], self.peer, 2))
        except WireError as e:
            self.broken = str(e)
            raise TransferError(f"corrupt frame: {e}") from None
        except Exception as e:
            self.broken = f"receive failed: {_first_line(e)}"
            raise TransferError(self.broken) from None
        return h, payload

    def _wait(self, work) -> None:
        if not work.wait(self.timeout):
            raise TransferError(f"no progress in {self.timeout.total_seconds():g} s")

    def close(self) -> None:
        """Release the groups (the peer's next operation fails)."""
        for pg in {id(self.ctrl): self.ctrl, id(self.data): self.data}.values():
            try:
                pg.abort() if hasattr(pg, "abort") else None
            except Exception:  # already broken: nothing left to release
                pass


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
