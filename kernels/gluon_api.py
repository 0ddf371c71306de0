"""Which Triton releases run our Gluon kernels, and the few Gluon calls whose names moved between them.

Gluon is Triton's experimental dialect and its API moves between releases. The GPU machines we
measure on run Triton 3.6 (torch 2.11); CI and newer torch builds bring 3.9, where
`gl.thread_barrier()` became `gl.barrier()`, `shared_memory_descriptor._reinterpret(dtype, shape,
layout)` became `.reinterpret(...)` and `tma.async_copy_global_to_shared` became `tma.async_load`.
The helpers below take whichever spelling this Triton has (a constexpr branch the compiler
visits alone, or the builtin picked at import), so the kernels' source compiles on both; on 3.6
they compile to the same PTX as the old spellings did (checked instruction for instruction).

3.9 also refuses to view shared memory through a padded layout unless it was allocated with one
(PADDED_VIEWS), which the scan's bulk-copy loader needs: the copy engine writes a page as it lies
and the scorer skips each row's scale word by a padded view. Where that is refused the scan takes
its registers loader (indexer_scan_hopper.loader_for), which loads the same words from global memory.
Allocating the ring padded does not help: 3.9 refuses the reinterpret either way ("cannot
reinterpret between padded and non-padded layouts", so the copy engine's unpadded view of a padded
slot is refused too), and a copy that drops the scale words itself would need the rows' 68-byte
stride to be a multiple of 16 bytes, as the copy engine's global strides must be.

Compiling is not running: a kernel only runs by default on a release whose GPU tests passed here
(TESTED_TRITON). `V4SERVE_GLUON` chooses: `auto` (that default), `on` (any Triton that compiles
them: what to try on a newer torch, after its GPU tests), `off` (the Triton kernels everywhere).
tests/test_gluon_compile.py compiles every Gluon kernel for sm_90a with the installed Triton (no
GPU needed), so CI's Triton checks that the `on` path builds.
"""

from __future__ import annotations

import logging
import os

import triton

try:  # Gluon ships with Triton 3.4+
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import tma
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

log = logging.getLogger(__name__)

# releases (major.minor) whose GPU tests of the Gluon kernels passed here (kernels/RESULTS.md)
TESTED_TRITON = ("3.6",)
CHOICES = ("auto", "on", "off")
_warned = False


def choice() -> str:
    c = os.environ.get("V4SERVE_GLUON", "auto")
    if c not in CHOICES:
        raise ValueError(f"V4SERVE_GLUON must be one of {CHOICES}, got {c!r}")
    return c


def release(version: str) -> str:
    """'3.6' of '3.6.0' (or of '3.6.0+git1234')."""
    return ".".join(version.split("+")[0].split(".")[:2])


INSTALLED = release(triton.__version__)  # enabled() runs on every call of a kernel's `usable`


def enabled() -> bool:
    """Whether the Gluon kernels may run in this process (each kernel's `usable` then checks the
    GPU and the shapes): Gluon imports, and V4SERVE_GLUON allows this Triton. Under `auto` on an
    untested release it says once, in the log, that the Triton kernels run instead."""
    global _warned
    c = choice()
    if gluon is None or c == "off":
        return False
    if c == "on" or INSTALLED in TESTED_TRITON:
        return True
    if not _warned:
        _warned = True
        log.warning("Triton %s: the Gluon kernels were tested on GPUs with Triton %s only, so the Triton kernels "
                    "run instead (slower on Hopper); V4SERVE_GLUON=on runs the Gluon kernels on this Triton",
                    triton.__version__, ", ".join(TESTED_TRITON))
    return False


if gluon is not None:
    _NEW_BARRIER = gl.constexpr(hasattr(gl, "barrier"))
    _NEW_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
    # the old method viewed any shared memory through any layout; its successor refuses a padded
    # view of memory allocated without padding
    PADDED_VIEWS = not _NEW_REINTERPRET.value
    # a builtin taken by its name here: when Triton hashes a kernel it resolves every attribute of
    # modules other than its language modules, in a branch the compiler would not take too
    _tma_copy = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

    @gluon.jit
    def cta_barrier():
        """Every thread of the program waits here (bar.sync); shared-memory writes before it are
        visible to reads after it."""
        if _NEW_BARRIER:
            gl.barrier()
        else:
            gl.thread_barrier()

    @gluon.jit
    def reinterpret(desc, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
        """The same shared memory as `desc`, seen with another dtype, shape and layout."""
        if _NEW_REINTERPRET:
            view = desc.reinterpret(dtype, shape, layout)
        else:
            view = desc._reinterpret(dtype, shape, layout)
        return view

    @gluon.jit
    def tma_load(desc, coord, bar, dest):
        """A bulk copy (TMA) of desc's box at coord into the shared memory dest, completing on the
        mbarrier bar."""
        _tma_copy(desc, coord, bar, dest)
else:  # pragma: no cover - depends on the installed Triton
    PADDED_VIEWS = False
