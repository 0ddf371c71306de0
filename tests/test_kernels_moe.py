"""The MoE's elementwise kernels (kernels/moe_elementwise.py) against their reference.

The weighted sum is integer-exact arithmetic on float32 plus casts, so it must give the reference's
bits in the interpreter too. SwiGLU goes through exp, which the interpreter takes from numpy and
torch's CPU from SLEEF: there the result may be one rounding step off (float32: 1e-6 relative;
BF16: one unit in the last place), and on a GPU, where both are CUDA's expf, it must be exact.
"""

import pytest
import torch

from kernels import moe_elementwise as K
from kernels import moe_elementwise_ref as R


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")


def operands(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # spread past the clamp limit (7 here) on both sides, with exact zeros and limit values
    a, b = (torch.randn(*shape, generator=g) * 6 for _ in range(2))
    a.view(-1)[::97] = 0.0
    a.view(-1)[1::89] = 7.0
    b.view(-1)[2::83] = -7.0
    return a.to(dtype).to(device), b.to(dtype).to(device)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in BF16 steps between same-sign values (as ordered int16 bit patterns)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return (ia - ib).abs()


@pytest.mark.parametrize("shape", [(5, 48), (16, 256), (3, 1000)])
def test_swiglu_kernel_matches_the_reference_within_one_rounding(triton_mode, shape):
    for dtype in (torch.float32, torch.bfloat16):
        gate, up = operands(shape, dtype, seed=sum(shape))
        got, want = K.swiglu(gate, up, 7.0), R.swiglu(gate, up, 7.0)
        assert got.dtype == dtype and got.shape == gate.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        else:
            same_sign = (got.float() * want.float() >= 0).all()
            assert same_sign and bf16_ulps(got, want).max() <= 1
            assert (got == want).float().mean() > 0.95  # one step off only where exp rounds apart
        # the clamps act: a gate above the limit gives silu(7) * up, an up below gives -7 * silu(gate)
        hi = gate.float() > 8
        if hi.any():
            torch.testing.assert_close(got.float()[hi], (R.swiglu(torch.full_like(gate, 7.0), up, 7.0)).float()[hi],
                                       rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_add_weighted_kernel_gives_the_reference_bits(triton_mode, slots):
    for dtype in (torch.float32, torch.bfloat16):
        acc, y = operands((9, 40), dtype, seed=slots)
        g = torch.Generator().manual_seed(10 + slots)
        w = torch.rand(9, slots, generator=g)
        w[::3, 0] = 0.0  # unpicked slots weigh 0
        got = K.add_weighted(acc, y, w)
        assert torch.equal(got, R.add_weighted(acc, y, w))
        assert got.dtype == dtype and not torch.equal(got, acc)


def test_add_weighted_reads_a_strided_weight_table(triton_mode):
    """The dense MoE passes table[:, :, e], a view with strides (k * E, E)."""
    acc, y = operands((6, 32), torch.bfloat16, seed=3)
    table = torch.rand(6, 2, 5)
    for e in range(5):
        assert torch.equal(K.add_weighted(acc, y, table[:, :, e]), R.add_weighted(acc, y, table[:, :, e].contiguous()))


def test_moe_elementwise_rejects_mismatched_shapes(triton_mode):
    a, b = operands((4, 8), torch.float32, seed=1)
    with pytest.raises(ValueError, match="swiglu"):
        K.swiglu(a, b[:, :4], 7.0)
    with pytest.raises(ValueError, match="add_weighted"):
        K.add_weighted(a, b, torch.rand(3, 2))


@pytest.mark.gpu
def test_gpu_moe_elementwise_gives_torch_cuda_bits(triton_mode):
    """At the flash-attn preset's shapes (16 padded rows x 256 expert dims, 4096 hidden): CUDA's
    expf in both, so SwiGLU must be exact too."""
    for dtype in (torch.bfloat16, torch.float32):
        for shape in ((16, 256), (16, 2048), (300, 256)):
            gate, up = operands(shape, dtype, seed=shape[1], device="cuda")
            assert torch.equal(K.swiglu(gate, up, 10.0), R.swiglu(gate, up, 10.0)), (dtype, shape)
        acc, y = operands((16, 4096), dtype, seed=5, device="cuda")
        w = torch.rand(16, 2, device="cuda")
        assert torch.equal(K.add_weighted(acc, y, w), R.add_weighted(acc, y, w)), dtype
