"""The rotary kernel (kernels/rope.py) against its reference, bit for bit: in the interpreter on
CPU and at the model's shapes on a GPU (same float32 products, contraction off, same cast)."""

import pytest
import torch

from kernels import rope as K
from kernels.rope_ref import rotate as reference


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")


def angles(N, half, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(N, half, generator=g) * 1000
    return a.cos().to(device), a.sin().to(device)


# (300, 2, 16): 600 rows, more than one interpreter program (rope.INTERPRETER_BLOCK) and a partial last one
@pytest.mark.parametrize("shape,half", [((5, 3, 64), 8), ((17, 32), 16), ((1, 2, 4, 24), 4), ((9, 16), 8),
                                        ((300, 2, 16), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
def test_rotate_kernel_equals_the_reference_bit_for_bit(triton_mode, shape, half, dtype, inverse):
    g = torch.Generator().manual_seed(sum(shape) + half)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    cos, sin = angles(shape[0], half, seed=half)
    got = K.rotate(x, cos, sin, inverse)
    want = reference(x, cos, sin, inverse)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, want)
    if not inverse:  # the inverse turn undoes it (float32: up to rounding)
        back = K.rotate(got.float(), cos, sin, inverse=True)
        torch.testing.assert_close(back, x.float(), atol=0.05 if dtype == torch.bfloat16 else 1e-5, rtol=0.02)


def test_rotate_reads_a_non_contiguous_input(triton_mode):
    x = torch.randn(6, 4, 80)[:, :, 8:]  # last dim 72 with 8 dims cut off in front
    cos, sin = angles(6, 16, seed=1)
    assert torch.equal(K.rotate(x, cos, sin), reference(x, cos, sin))


def test_rotate_rejects_mismatched_angles(triton_mode):
    x = torch.randn(4, 32)
    cos, sin = angles(3, 8, seed=2)
    with pytest.raises(ValueError, match="needs cos/sin"):
        K.rotate(x, cos, sin)
    cos, sin = angles(4, 32, seed=2)
    with pytest.raises(ValueError, match="do not fit"):
        K.rotate(x, cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_rotate_at_the_model_shapes(triton_mode, dtype):
    for shape in ((1000, 64, 512), (1000, 512), (1000, 64, 128)):
        x = torch.randn(*shape, device="cuda").to(dtype)
        cos, sin = angles(shape[0], 32, seed=3, device="cuda")
        for inverse in (False, True):
            assert torch.equal(K.rotate(x, cos, sin, inverse), reference(x, cos, sin, inverse))
