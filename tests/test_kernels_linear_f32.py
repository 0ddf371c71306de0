"""The float32 projection kernel (kernels/linear_f32.py) against numerics.linear: within float32
rounding of a float64 product, row-invariant exactly, in the interpreter and on a GPU; and the
model's float32 projections reach it only where it is meant to run."""

import pytest
import torch

from kernels import linear_f32 as K
from workers.modules import project


def operands(m, n, k, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    return x.to(device), w.to(device)


def check_close(got, x, w):
    """Within float32 rounding of the exact product: per entry, the sum of |terms| times the
    float32 sum's K * 2^-24 and 2^-20 for the three-pass TF32 products (each loses its operands'
    bits below 2^-22 and the remainders' product)."""
    exact = x.double() @ w.double().T
    bound = (x.double().abs() @ w.double().abs().T) * (x.shape[1] * 2.0**-24 + 2.0**-20) + 1e-30
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert ((got.double() - exact).abs() <= bound).all(), ((got.double() - exact).abs() / bound).max()
    # and as close to torch's own float32 product as two float32 orders of one sum can be
    torch.testing.assert_close(got, K.reference(x, w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("m,n,k", [(3, 24, 1024), (16, 40, 200), (21, 16, 64)])  # 200: a ragged last chunk
def test_linear_f32_kernel_matches_the_product(m, n, k):
    x, w = operands(m, n, k, seed=m * n)
    got = K.linear_f32(x, w)
    check_close(got, x, w)
    # a row's result does not depend on the rows beside it: alone, or with 17 more after it
    assert torch.equal(K.linear_f32(x[1:2], w), got[1:2])
    assert torch.equal(K.linear_f32(torch.cat([x, torch.randn(17, k)]), w)[:m], got)


def test_splits_follow_the_weight_shape_alone():
    # the split count (and so the order of a row's sum) is fixed by (N, K); more splits for
    # narrower weights, never more than the chunks of K
    assert [K.splits_for(n, 4096) for n in (1024, 512, 256)] == [16, 32, 64]
    assert K.splits_for(24, 16384) == 256 and K.splits_for(4, 16384) == 256 and K.splits_for(16, 64) == 2
    x, w = operands(2, 4, 16384, seed=3)  # mHC head's shape: 256 partial sums, added in a pairwise tree
    check_close(K.linear_f32(x, w), x, w)


def test_linear_f32_rejects_mismatched_operands():
    with pytest.raises(ValueError, match="linear_f32"):
        K.linear_f32(torch.randn(2, 64), torch.randn(8, 32))


def test_project_keeps_cpu_bf16_and_prefill_rows_on_the_reference(monkeypatch):
    # the kernel is for a GPU's decode rows of float32 weights: elsewhere project is numerics.linear
    x, w = operands(4, 16, 64, seed=5)
    assert K.takes(x, w) and K.takes(torch.randn(K.MAX_ROWS, 64), w)
    assert not K.takes(x.to(torch.bfloat16), w.to(torch.bfloat16))
    assert not K.takes(torch.randn(K.MAX_ROWS + 1, 64), w)  # a prefill chunk
    assert not K.takes(x[:0], w) and not K.takes(x[None], w)
    assert not K.wanted(x, w)  # not on a GPU
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")
    assert torch.equal(project(x, w), K.reference(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 48, 128])
def test_gpu_linear_f32_at_the_model_shapes(m):
    """flash-attn preset: CSA main compressor 1024 x 4096, indexer 256 x 4096, HCA 512 x 4096,
    mHC 24 x 16384 and the head's 4 x 16384."""
    for n, k in ((1024, 4096), (256, 4096), (512, 4096), (24, 16384), (4, 16384)):
        x, w = operands(m, n, k, seed=n, device="cuda")
        assert K.wanted(x, w)
        got = K.linear_f32(x, w)
        check_close(got, x, w)
        for rows in (x[:1], x[:5]):  # alone, and with a row count that no alignment divides
            assert torch.equal(K.linear_f32(rows, w), got[: rows.shape[0]]), (n, k, rows.shape[0])
        torch.cuda.synchronize()
