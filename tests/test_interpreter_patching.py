"""The test session's interpreter shortcut (interpreter_patching) gives Triton's own results and
does skip the second patch it is for."""

import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import interpreter_patching

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter is not on")


@triton.jit
def _row_max_shifted(x, SHIFT: tl.constexpr):
    """A helper calling helpers and builtins: the row maxima of x, less SHIFT."""
    return tl.max(x, axis=1) - _shift(SHIFT)


@triton.jit
def _shift(SHIFT: tl.constexpr):
    return tl.full([], SHIFT, tl.float32)


@triton.jit
def _kernel(x_ptr, out_ptr, N: tl.constexpr, SHIFT: tl.constexpr):
    rows = tl.program_id(0) * 4 + tl.arange(0, 4)
    x = tl.load(x_ptr + rows[:, None] * N + tl.arange(0, N)[None, :])
    acc = tl.zeros([4], tl.float32)
    for _ in tl.static_range(2):
        acc += _row_max_shifted(x, SHIFT)
    tl.store(out_ptr + rows, tl.where(acc > 0, acc, 0.0))


def run_kernel() -> torch.Tensor:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    out = torch.empty(8)
    _kernel[(2,)](x, out, N=16, SHIFT=1)
    want = np.maximum(2 * (x.numpy().max(axis=1) - 1), 0)
    assert np.array_equal(out.numpy(), want.astype(np.float32))
    return out


def test_kernels_give_triton_s_own_results_and_patch_once_a_launch(monkeypatch):
    from triton.runtime import interpreter as interp

    why = interpreter_patching.install()  # installed by conftest already: None, or why it cannot be
    if why:
        pytest.skip(why)
    patches = []
    real = interp._patch_lang
    monkeypatch.setattr(interp, "_patch_lang", lambda fn: patches.append(fn.__name__) or real(fn))
    fast = run_kernel()
    # the launch patches, and Triton's own helpers (tl.zeros, tl.max: they see triton.language.core,
    # which our kernels do not import) patch that once; our helpers run under those patches
    assert patches[0] == "_kernel" and "_row_max_shifted" not in patches and "_shift" not in patches
    assert len(patches) == len(set(patches)) <= 2, patches
    interpreter_patching.uninstall()
    try:
        patches.clear()
        assert torch.equal(run_kernel(), fast)
        # Triton's path patches at each call: 2 programs x 2 steps
        assert patches.count("_row_max_shifted") == 4 and patches.count("_shift") == 4
    finally:
        assert interpreter_patching.install() is None
