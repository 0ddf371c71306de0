"""The expert kernels (kernels/expert_mlp.py) against per-expert matmuls with the MoE's
elementwise reference: within float32 rounding (cuBLAS / MKL sum in another order), and
row-invariant exactly: an expert run on a subset of rows (the routed MoE) gives those rows the
bits they get with all rows."""

import pytest
import torch

from kernels import expert_mlp as K
from kernels.moe_elementwise_ref import swiglu


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")


def weights(E, I, D, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(E, I, D, generator=g) * D**-0.5 * 3 for _ in range(2))
    w2 = torch.randn(E, D, I, generator=g) * I**-0.5
    return [w.to(dtype).to(device) for w in (w1, w3, w2)]


def reference(x, w1, w3, w2, limit):
    h = torch.stack([swiglu(x @ w1[e].T, x @ w3[e].T, limit) for e in range(w1.shape[0])])
    return h, torch.stack([h[e] @ w2[e].T for e in range(w1.shape[0])])


def close(got, want, dtype):
    if dtype == torch.float32:  # sums of 4096 terms in another order: relative to their size
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().amax()))
    else:  # BF16: a product rounded one step away from cuBLAS's moves the rest, and sums that
        # cancel keep that step (1/128 of the terms' size) whatever their own size
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.01 * float(want.abs().amax()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,E,I,D", [(5, 3, 48, 96), (70, 2, 32, 64), (16, 4, 16, 160)])
def test_expert_kernels_match_per_expert_matmuls(triton_mode, dtype, M, E, I, D):
    w1, w3, w2 = weights(E, I, D, dtype, seed=M + E)
    g = torch.Generator().manual_seed(M)
    x = (torch.randn(M, D, generator=g) * 2).to(dtype)
    h = K.expert_up(x, w1, w3, 1.5)
    h_want, y_want = reference(x, w1, w3, w2, 1.5)
    close(h, h_want, dtype)
    close(K.expert_down(h, w2), y_want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_expert_on_some_rows_gives_those_rows_the_bits_of_all_rows(triton_mode, dtype):
    """The routed MoE runs expert e on the rows that picked it; the same kernels on other rows (a
    bigger batch, another bucket) must give those rows the same bits."""
    E, I, D, M = 3, 32, 128, 70  # 70 rows: two row blocks; the subsets fall across them
    w1, w3, w2 = weights(E, I, D, dtype, seed=1)
    x = (torch.randn(M, D) * 2).to(dtype)
    y_all = K.expert_down(K.expert_up(x, w1, w3, 2.0), w2)
    for e, rows in ((0, [3, 64, 69]), (2, list(range(10, 60, 3))), (1, [0])):
        sub = x[rows]
        y = K.expert_down(K.expert_up(sub, w1[e : e + 1], w3[e : e + 1], 2.0), w2[e : e + 1])[0]
        assert torch.equal(y, y_all[e, rows])


def test_expert_kernels_reject_mismatched_operands(triton_mode):
    w1, w3, w2 = weights(2, 16, 32, torch.float32, seed=2)
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="expert_up"):
        K.expert_up(x[:, :16], w1, w3, 1.0)
    h = K.expert_up(x, w1, w3, 1.0)
    with pytest.raises(ValueError, match="expert_down"):
        K.expert_down(h, w2[:1])


@pytest.mark.gpu
def test_gpu_expert_kernels_at_the_model_shapes(triton_mode):
    """flash-attn preset: 8 experts x 256, hidden 4096; 16 rows (a decode bucket) and 300."""
    for dtype in (torch.bfloat16, torch.float32):
        w1, w3, w2 = weights(8, 256, 4096, dtype, seed=3, device="cuda")
        for M in (16, 300):
            x = (torch.randn(M, 4096, device="cuda") * 2).to(dtype)
            h = K.expert_up(x, w1, w3, 10.0)
            h_want, y_want = reference(x, w1, w3, w2, 10.0)
            close(h, h_want, dtype)
            close(K.expert_down(h, w2), y_want, dtype)
            y = K.expert_down(K.expert_up(x[5:9], w1[1:2], w3[1:2], 10.0), w2[1:2])[0]
            assert torch.equal(y, K.expert_down(h, w2)[1, 5:9])
