"""Index tensors staged through the pinned ring (workers/host_index.py)."""

import pytest
import torch

from workers.host_index import PinnedRing, to_device


def test_to_device_on_cpu_is_a_plain_tensor():
    t = to_device([[1, 2], [3, 4]], "cpu", torch.int32)
    assert t.dtype == torch.int32 and t.tolist() == [[1, 2], [3, 4]]


@pytest.mark.gpu
def test_staged_copies_keep_their_values_across_wraps():
    """A ring of 256 bytes wraps every few copies; each copy must still read its own values, even
    with the GPU kept busy so the copies queue up behind a long kernel."""
    ring = PinnedRing(256)
    busy = torch.randn(4096, 4096, device="cuda")
    got, want = [], []
    for i in range(40):
        busy = busy @ busy.T / 4096  # queue work ahead of the copies
        values = list(range(i, i + 1 + i % 9))
        got.append(ring.stage(values, torch.long).to("cuda", non_blocking=True))
        want.append(values)
    assert ring.wraps >= 5
    assert [g.tolist() for g in got] == want
    for dtype in (torch.int32, torch.float32, torch.bool):
        assert to_device([[1, 0], [0, 1]], "cuda", dtype).cpu().tolist() == torch.tensor([[1, 0], [0, 1]], dtype=dtype).tolist()
    with pytest.raises(ValueError, match="do not fit"):
        ring.stage(list(range(64)), torch.long)
