"""mHC's collapse and expand kernels (kernels/hc_streams.py) against their reference, bit for bit:
in the interpreter and at the model's shapes on a GPU."""

import pytest
import torch

from kernels import hc_streams as K
from kernels import hc_streams_ref as R


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")


def operands(N, hc, d, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    streams = (torch.randn(N, hc, d, generator=g) * 4).to(dtype)
    out = (torch.randn(N, d, generator=g) * 2).to(dtype)
    pre = torch.rand(N, hc, generator=g) + 0.1
    post = torch.rand(N, hc, generator=g) * 2
    comb = torch.rand(N, hc, hc, generator=g)
    return [t.to(device) for t in (streams, out, pre, post, comb)]


# N 70: more tokens than one interpreter program (dispatch.rows_per_program)
@pytest.mark.parametrize("N,hc,d", [(3, 4, 64), (5, 4, 1000), (2, 2, 48), (1, 3, 520), (70, 4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_collapse_and_expand_kernels_give_the_reference_bits(triton_mode, N, hc, d, dtype):
    streams, out, pre, post, comb = operands(N, hc, d, dtype, seed=N * d + hc)
    got = K.collapse(streams, pre)
    assert got.dtype == dtype and got.shape == (N, d)
    assert torch.equal(got, R.collapse(streams, pre))
    new = K.expand(streams, out, post, comb)
    assert new.dtype == dtype and new.shape == streams.shape
    assert torch.equal(new, R.expand(streams, out, post, comb))
    # comb[j, k] takes stream j into stream k: transposing it must change the result
    assert not torch.equal(new, R.expand(streams, out, post, comb.transpose(1, 2)))


def test_hc_streams_reject_mismatched_weights(triton_mode):
    streams, out, pre, post, comb = operands(2, 4, 32, torch.float32, seed=1)
    with pytest.raises(ValueError, match="collapse"):
        K.collapse(streams, pre[:, :3])
    with pytest.raises(ValueError, match="expand"):
        K.expand(streams, out, post, comb[:, :3])


@pytest.mark.gpu
def test_gpu_hc_streams_at_the_model_shapes(triton_mode):
    for dtype in (torch.bfloat16, torch.float32):
        streams, out, pre, post, comb = operands(300, 4, 4096, dtype, seed=2, device="cuda")
        assert torch.equal(K.collapse(streams, pre), R.collapse(streams, pre))
        assert torch.equal(K.expand(streams, out, post, comb), R.expand(streams, out, post, comb))
