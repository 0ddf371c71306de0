"""Small index tensors built on the host and handed to the GPU without stopping it.

`torch.tensor(values, device="cuda")` copies from pageable memory and then waits for the stream
to drain, so every page index or row list built per decode step would make the host wait for the
GPU work queued before it (a graphed step queues whole layers at once: workers/decode_graphs.py).
Staged in pinned memory (torch's caching host allocator, which keeps a block until its copy is
done) the copy is queued like a kernel and the host runs on.
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A 1-D (or nested-list) tensor of `values` on `device`, copied without a host sync on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
