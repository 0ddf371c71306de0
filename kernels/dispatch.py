"""Which implementation runs: the Triton kernel or its pure-torch reference.

`V4SERVE_KERNELS` chooses: `auto` (the default) runs Triton on CUDA tensors when Triton imports
and the reference everywhere else; `torch` always runs the reference (to compare, or to debug a
kernel); `triton` always runs Triton and fails loudly when it cannot (CPU tests set it together
with `TRITON_INTERPRET=1`, which runs the kernels in Triton's interpreter).
"""

from __future__ import annotations

import functools
import os

import torch

MODES = ("auto", "torch", "triton")


def mode() -> str:
    m = os.environ.get("V4SERVE_KERNELS", "auto")
    if m not in MODES:
        raise ValueError(f"V4SERVE_KERNELS must be one of {MODES}, got {m!r}")
    return m


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernel for an operation whose main input is `t`?"""
    m = mode()
    if m == "torch":
        return False
    if m == "triton":
        if not triton_available():
            raise RuntimeError("V4SERVE_KERNELS=triton but triton does not import")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("V4SERVE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return t.is_cuda and triton_available()


# Rows a program of a row-wise kernel takes in Triton's interpreter. The interpreter runs a launch's
# programs one after another in Python, each operation a numpy call over the program's block, so
# its cost is per program: wider programs, fewer of them (each row's result is its own whatever
# shares its program, so only the launch changes). Rope at the tiny model's shapes: 16 rows a
# program 759 ms, 64 210 ms, 256 79 ms (kernels/RESULTS.md).
INTERPRETER_ROWS = 64


def rows_per_program(t: torch.Tensor, gpu: int = 1, interpreter: int = INTERPRETER_ROWS) -> int:
    """Rows a program of a row-wise kernel takes for tensors like t: `gpu` on a GPU, as tuned
    there, `interpreter` in Triton's interpreter."""
    return gpu if t.is_cuda else interpreter


def _compile_failed(e: Exception) -> bool:
    """A Gluon kernel this Triton cannot build: Triton's own errors, and the RuntimeError its MLIR
    backend raises when a lowering pass fails (Triton 3.6 on a shape it cannot lower)."""
    import triton

    return isinstance(e, triton.errors.TritonError) or (isinstance(e, RuntimeError)
                                                        and "PassManager::run failed" in str(e))


def gluon_ran(launch, what: str, instead: str, log) -> bool:
    """Call launch() (a Gluon kernel's launch); False where this Triton cannot compile or launch it,
    logged on `log`. Gluon is experimental: its API moves between Triton releases, so the caller
    turns its Gluon path off and runs `instead`, the Triton kernel, from then on."""
    try:
        launch()
    except Exception as e:
        if not _compile_failed(e):
            raise
        log.warning("the Gluon %s failed (%s: %s); the Triton %s runs instead", what, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "", instead)
        return False
    return True
