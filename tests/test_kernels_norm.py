"""The RMSNorm kernel (kernels/rms_norm.py) against numerics.rms_norm: within float32 rounding
(its sum is ordered differently), row-invariant exactly, in the interpreter and on a GPU."""

import pytest
import torch

from kernels import rms_norm as K
from kernels.numerics import rms_norm as reference


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")


def rows(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-2, 2, shape[-1])  # a wide range of scales
    return x.to(dtype).to(device)


def check_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=4e-6, atol=1e-30)
    else:  # BF16: the float32 results differ by ulps, so a rounding may land one step apart
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-30)


# 5000: wider than one block; (70, 64): more rows than one interpreter program (dispatch.rows_per_program)
@pytest.mark.parametrize("shape", [(7, 64), (3, 2, 1000), (2, 5000), (70, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_kernel_matches_the_reference(triton_mode, shape, dtype, weighted):
    x = rows(shape, dtype, seed=shape[-1])
    w = torch.rand(shape[-1]) + 0.5 if weighted else None
    got = K.rms_norm(x, w, 1e-6)
    check_close(got, reference(x, w, 1e-6))
    # each row normalised on its own: a row alone gives the bits it gets in the batch
    flat = x.reshape(-1, shape[-1])
    assert torch.equal(K.rms_norm(flat[1:2], w, 1e-6), got.reshape(-1, shape[-1])[1:2])


def test_bf16_rows_normalised_into_float32_are_the_upcast_rows_bits(triton_mode):
    """mHC normalises its BF16 streams in float32: widening as the kernel loads gives the bits of
    normalising the upcast rows, without the upcast's launch."""
    x = rows((5, 3000), torch.bfloat16, seed=2)
    got = K.rms_norm(x, None, 1e-6, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, K.rms_norm(x.float(), None, 1e-6))
    check_close(got, reference(x.float(), None, 1e-6))


def test_rms_norm_kernel_reads_strided_rows_and_uses_eps(triton_mode):
    x = rows((6, 96), torch.float32, seed=1)[:, 16:80]  # rows with a stride of 96
    check_close(K.rms_norm(x, None, 1e-6), reference(x, None, 1e-6))
    tiny = torch.full((2, 32), 1e-4)
    check_close(K.rms_norm(tiny, None, 1.0), reference(tiny, None, 1.0))  # eps dominates: ~1e-4, not 1


def test_rms_norm_rejects_a_weight_of_the_wrong_size(triton_mode):
    with pytest.raises(ValueError, match="rms_norm"):
        K.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)


@pytest.mark.gpu
def test_gpu_rms_norm_at_the_model_shapes(triton_mode):
    """flash-attn preset: hidden 4096, query low rank 1024, heads 64 x 512, mHC 4 x 4096 (float32)."""
    for shape, dtype, weighted in (((300, 4096), torch.bfloat16, True), ((300, 1024), torch.bfloat16, True),
                                   ((30, 64, 512), torch.bfloat16, False), ((300, 16384), torch.float32, False)):
        x = rows(shape, dtype, seed=shape[-1], device="cuda")
        w = torch.rand(shape[-1], device="cuda") + 0.5 if weighted else None
        check_close(K.rms_norm(x, w, 1e-6), reference(x, w, 1e-6))
