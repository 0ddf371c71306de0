"""The indexer rounding kernel (kernels/index_rounding.py: Hadamard, then FP4 per 32) against
block_quant's reference, bit for bit: in the interpreter and at the model's shapes on a GPU."""

import pytest
import torch

from kernels import index_rounding as K
from kernels.block_quant import FP4_VALUES, hadamard


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")


def queries(shape, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[0])[:, *([None] * (len(shape) - 1))]
    x.view(-1)[::53] = 0.0
    x.view(-1)[5::61] = -0.0
    x.view(-1, shape[-1])[-1] = -0.0  # a row of -0.0: its transform holds -0.0, which rounds to +0.0
    return x.to(device)


# (600, 32): more rows than one interpreter program (index_rounding.INTERPRETER_BLOCK), a partial last one
@pytest.mark.parametrize("shape", [(5, 128), (3, 7, 64), (40, 32), (2, 4, 256), (600, 32)])
def test_round_index_kernel_gives_the_reference_bits(triton_mode, shape):
    x = queries(shape, seed=sum(shape))
    got = K.round_index(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert torch.equal(got, K.reference(x))
    assert torch.equal(got.view(torch.int32), K.reference(x).view(torch.int32))  # -0.0 as the reference has it


def test_round_index_hits_midpoints_as_the_reference_does(triton_mode):
    """Rows whose Hadamard transform lands on the E2M1 midpoints (ties to even) and on the grid:
    built by transforming back (the orthonormal transform is its own inverse)."""
    g = torch.Generator().manual_seed(4)
    grid = torch.cat([FP4_VALUES, (FP4_VALUES[1:] + FP4_VALUES[:-1]) / 2])  # codes and midpoints
    target = grid[torch.randint(0, len(grid), (16, 128), generator=g)] * torch.sign(torch.randn(16, 128, generator=g))
    target[:, 0] = 6.0  # amax 6: scale 1, so the midpoints stay midpoints
    x = hadamard(target)
    assert torch.equal(K.round_index(x), K.reference(x))


def test_round_index_rejects_widths_it_cannot_round(triton_mode):
    with pytest.raises(ValueError, match="power of two"):
        K.round_index(torch.randn(3, 96))


@pytest.mark.gpu
def test_gpu_round_index_at_the_model_shapes(triton_mode):
    """Indexer queries of 300 tokens x 64 heads x 128, and 4096 keys."""
    for shape in ((300, 64, 128), (4096, 128)):
        x = queries(shape, seed=shape[0], device="cuda")
        assert torch.equal(K.round_index(x), K.reference(x))
