"""Programmatic dependent launch: the next kernel on a stream starts in the tail of this one.

On Hopper and later, a kernel launched with `launch_pdl=True` (launch_kwargs) may be scheduled
while the kernel before it on the stream still runs, once every program of that kernel has
executed `griddepcontrol.launch_dependents` (let_next_grid_start) or ended. Its programs then take
SMs as the earlier kernel's programs leave them, instead of the whole launch waiting for the last
of them, and wait in `griddepcontrol.wait` (wait_for_previous_grid) for that kernel to end and its
writes to be visible. A CUDA graph records the launch attribute as a programmatic edge.

Two launches use it. The general scan after the Gluon FP8 scan (indexer_topk), whose programs,
for a query of the FP8 scan, only end, and as a dependent launch do so in the FP8 scan's tail
instead of after it (H100, 128K x 32: 0.0458 against 0.0470 ms). And the Gluon FP8 scan itself,
as a dependent of whatever kernel comes before it: its programs allocate their shared memory and
set up their barriers while that kernel ends, then wait before their first global read (H100,
0.2-0.3 us a call, 5-7% at batch 1 and 8K-128K; kernels/RESULTS.md).
The merge of HCA's split partials after the Gluon split kernel measured slower as a dependent
(128K x 32: 0.0303 against 0.0286 ms), so it launches as before.

The decode step's small Triton kernels (norms, float32 projections, rotary, mHC, the top-k, the
picked experts: about 140 launches of 1-20 us in a batch-1 step) launched the same way made the
step 3-6% slower on an H100 (kernels/RESULTS.md, sixteenth session; the code was `035fc8e`), so
they launch plainly.

Every program of a kernel launched this way waits before it ends, even one with nothing to do:
the work after it on the stream waits for it alone, so its end must imply the end of the kernel
before it.

A dependent launch reads nothing before its wait, and lets its own dependents start only after it.
The general scan once read the query operands and the modes before its wait, which is the only
point where PTX makes what earlier kernels wrote visible to a dependent grid; on an H100, calls
made back to back then gave other keys than plain launches in a few rows (16-230 of a call's keys,
in batches of 129-256 queries; 7 of 20 calls wrong), so the seventeenth session turned dependent
launches off. With the general scan waiting first they gave the plain launches' keys in 6 of 6
runs of tests/test_kernels_indexer.py's test_gpu_scans_launched_right_after_their_operands_give_
the_keys_of_plain_launches (which failed before), and are on again since the eighteenth session
(kernels/RESULTS.md). tests/test_grid_dependency.py checks the order in both scans' PTX.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # Triton 3.4+
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_wait = None

try:  # Gluon ships with Triton 3.4+
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None


def _launch_option_known() -> bool:
    """Whether this Triton's CUDA launcher takes launch_pdl (an option of its compiler)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - depends on the installed Triton
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def _supported(device: torch.device) -> bool:
    return (gdc_wait is not None and _launch_option_known()
            and torch.cuda.get_device_capability(device)[0] >= 9)


# off: every launch waits for the one before it. On saves 0.2-1.2 us a scan call on an H100 (the
# launch sweep times both: kernels/RESULTS.md)
DEPENDENT_LAUNCHES = True


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch as dependents of the kernel before them: a CUDA GPU of
    compute capability 9.0 or later, with a Triton that has the launch option (never on CPU,
    where the interpreter runs no PTX), unless DEPENDENT_LAUNCHES is off."""
    return DEPENDENT_LAUNCHES and t.is_cuda and _supported(t.device)


def launch_kwargs(on: bool) -> dict:
    """The launch option of a dependent launch (none where `on` is False)."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def wait_for_previous_grid(ON: tl.constexpr):
    """Wait until the kernel before this one on the stream has ended and its writes are visible
    (nothing where ON is False: the launch was not a dependent one)."""
    if ON:
        gdc_wait()


if gluon is not None:

    @gluon.jit
    def wait_for_previous_grid_gluon(ON: gl.constexpr):
        """wait_for_previous_grid, in Gluon."""
        if ON:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0 unused", "=r", [], dtype=gl.int32, is_pure=False,
                                      pack=1)

    @gluon.jit
    def let_next_grid_start():
        """Let the next kernel on the stream, if launched as a dependent, be scheduled once every
        program of this one has come here (or ended). Nothing otherwise."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0 unused", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
