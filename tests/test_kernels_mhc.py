"""The mHC mixing-weights kernel (kernels/hc_sinkhorn.py) against its reference: in the
interpreter on CPU, at the model's widths on a GPU. Tolerance (float32): rtol 1e-5, atol 1e-6;
the kernel sums hc values in another order and uses Triton's exp (a few ulps)."""

import pytest
import torch

from kernels import hc_sinkhorn as K
from kernels.hc_sinkhorn_ref import hc_mix as reference


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")


def inputs(N, hc, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(N, hc * (2 + hc), generator=g) * 2
    base = torch.randn(hc * (2 + hc), generator=g)
    scale = torch.rand(3, generator=g) + 0.5
    return mix.to(device), base.to(device), scale.to(device)


def assert_matches(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("N", [1, 7, 16, 37, 70])  # 70: past one interpreter program (dispatch.rows_per_program)
@pytest.mark.parametrize("hc,iters", [(4, 20), (4, 1), (2, 3), (8, 5)])
def test_hc_mix_kernel_equals_the_reference(triton_mode, N, hc, iters):
    mix, base, scale = inputs(N, hc, seed=N * 10 + hc)
    got = K.hc_mix(mix, base, scale, hc, iters, 1e-6)
    assert_matches(got, reference(mix, base, scale, hc, iters, 1e-6))
    pre, post, comb = got
    assert pre.shape == post.shape == (N, hc) and comb.shape == (N, hc, hc)
    if iters > 1:  # Sinkhorn: columns sum to about one (the last normalisation), rows nearly so
        torch.testing.assert_close(comb.sum(1), torch.ones(N, hc), atol=1e-4, rtol=0)


def test_a_row_gets_the_same_weights_alone_and_in_a_batch(triton_mode):
    mix, base, scale = inputs(37, 4, seed=3)
    batch = K.hc_mix(mix, base, scale, 4, 20, 1e-6)
    alone = K.hc_mix(mix[20:21], base, scale, 4, 20, 1e-6)
    for b, a in zip(batch, alone):
        assert torch.equal(b[20:21], a)


def test_hc_mix_rejects_a_mix_of_the_wrong_width(triton_mode):
    mix, base, scale = inputs(3, 4, seed=1)
    with pytest.raises(ValueError, match="expected \\[N, 24\\]"):
        K.hc_mix(mix[:, :20], base, scale, 4, 20, 1e-6)


def test_width_not_a_power_of_two_runs_the_reference(triton_mode):
    mix, base, scale = inputs(5, 3, seed=2)
    got = K.hc_mix(mix, base, scale, 3, 4, 1e-6)
    for g, w in zip(got, reference(mix, base, scale, 3, 4, 1e-6)):
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_gpu_hc_mix_at_the_model_width(triton_mode):
    mix, base, scale = inputs(5000, 4, seed=9, device="cuda")
    assert_matches(K.hc_mix(mix, base, scale, 4, 20, 1e-6), reference(mix, base, scale, 4, 20, 1e-6))
