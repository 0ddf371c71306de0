"""Per-pair channels: two replicas, one two-rank process group of their own.

No global process group: a channel is made on first use from an address one side publishes (it
hosts a TCPStore there), so replicas can come and go. Gloo moves the frames on CPU; on GPUs the
payloads go over an NCCL group made from the same store while headers stay on gloo.
Every operation is bounded by the channel's timeout; a dead or silent peer raises TransferError.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from .wire import as_bytes, from_bytes, pack_header, unpack_header


class TransferError(RuntimeError):
    """A transfer that did not complete (time-out, dead peer, corrupt frame)."""


class PairChannel:
    def __init__(self, host: str, port: int, rank: int, timeout_s: float = 30.0, device: str = "cpu"):
        """rank 0 hosts the store at host:port (the sender by convention), rank 1 connects."""
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            self.store = dist.TCPStore(host, port, 2, rank == 0, timeout=timeout)
            self.ctrl = dist.ProcessGroupGloo(dist.PrefixStore("ctrl", self.store), rank, 2, timeout)
            self.data = self.ctrl
            if device != "cpu":
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", self.store), rank, 2, opts)
        except Exception as e:
            raise TransferError(f"cannot open channel to {host}:{port}: {e}") from None
        self.rank, self.peer, self.device = rank, 1 - rank, device

    def send(self, header: dict, tensor: torch.Tensor) -> None:
        payload = as_bytes(tensor)
        hdr = torch.frombuffer(bytearray(pack_header(header)), dtype=torch.uint8)
        sizes = torch.tensor([hdr.numel(), payload.numel()], dtype=torch.int64)
        try:
            self.ctrl.send([sizes], self.peer, 0).wait()
            self.ctrl.send([hdr], self.peer, 1).wait()
            if payload.numel():
                self.data.send([payload], self.peer, 2).wait()
        except Exception as e:
            raise TransferError(f"send failed: {str(e).splitlines()[0][:200]}") from None

    def recv(self) -> tuple[dict, torch.Tensor]:
        sizes = torch.empty(2, dtype=torch.int64)
        try:
            self.ctrl.recv([sizes], self.peer, 0).wait()
            hdr = torch.empty(int(sizes[0]), dtype=torch.uint8)
            self.ctrl.recv([hdr], self.peer, 1).wait()
            payload = torch.empty(int(sizes[1]), dtype=torch.uint8, device=self.device)
            if payload.numel():
                self.data.recv([payload], self.peer, 2).wait()
        except Exception as e:
            raise TransferError(f"receive failed: {str(e).splitlines()[0][:200]}") from None
        h = unpack_header(hdr.numpy().tobytes())
        return h, from_bytes(h, payload)
