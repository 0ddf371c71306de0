"""Small index tensors built on the host and handed to the GPU without stopping it.

`torch.tensor(values, device="cuda")` copies from pageable memory and then waits for the stream
to drain, so every page index or row list built per decode step would make the host wait for the
GPU work queued before it (a graphed step queues whole layers at once: workers/decode_graphs.py).
Staged in pinned memory the copy is queued like a kernel and the host runs on.

The staging memory is one pinned ring per process, written front to back: a fresh pinned tensor
per call (torch's caching host allocator) cost 45 us of host time each on an H100 host, with
20-35 of them per decode step, a fifth of a batch-1 step (kernels/RESULTS.md). A slot is reused
only a whole ring later; before the ring wraps, the host waits for the GPU once, so no copy still
queued can read a slot being overwritten.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

RING_BYTES = 4 << 20  # a decode step stages a few KB: the ring wraps once per thousands of steps
_ALIGN = 16

_NUMPY = {torch.long: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


class PinnedRing:
    """Pinned staging memory handed out front to back; `stage` returns a pinned view holding the values."""

    def __init__(self, nbytes: int = RING_BYTES):
        self._buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self._np = self._buf.numpy()
        self._off = 0
        self._lock = threading.Lock()
        self.wraps = 0  # how often the host waited for the GPU before reusing the ring (tests read it)

    def stage(self, values, dtype: torch.dtype) -> torch.Tensor:
        """`values` (a list, nested lists or an array) as a pinned tensor of `dtype` in the ring."""
        arr = np.asarray(values, dtype=_NUMPY[dtype])
        n = arr.nbytes
        if n > self._np.nbytes:
            raise ValueError(f"{n} bytes do not fit a staging ring of {self._np.nbytes}")
        with self._lock:
            if self._off + n > self._np.nbytes:
                # every copy queued so far may still read the ring: let them finish first
                for d in range(torch.cuda.device_count()):
                    torch.cuda.synchronize(d)
                self._off, self.wraps = 0, self.wraps + 1
            start = self._off
            self._off = -(-(start + n) // _ALIGN) * _ALIGN
            self._np[start : start + n].view(arr.dtype)[:] = arr.reshape(-1)
        return self._buf[start : start + n].view(dtype).view(arr.shape)


_ring: PinnedRing | None = None
_ring_lock = threading.Lock()


def staging_ring() -> PinnedRing:
    global _ring
    with _ring_lock:
        if _ring is None:
            _ring = PinnedRing()
        return _ring


def to_device(values, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A 1-D (or nested-list) tensor of `values` on `device`, copied without a host sync on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    if dtype not in _NUMPY or torch.cuda.is_current_stream_capturing():
        # a wrap's synchronize cannot run inside a graph capture: a pinned tensor of its own
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return staging_ring().stage(values, dtype).to(device, non_blocking=True)
