"""Dependent launches (kernels/grid_dependency.py): when they are used, and the option they pass."""

import pytest
import torch

from kernels import grid_dependency


def test_cpu_tensors_never_launch_as_dependents():
    # the interpreter runs no PTX: griddepcontrol would not run there
    assert not grid_dependency.enabled(torch.zeros(1))


def test_launch_kwargs_carry_the_option_only_when_on():
    assert grid_dependency.launch_kwargs(False) == {}
    assert grid_dependency.launch_kwargs(True) == {"launch_pdl": True}


def test_this_triton_knows_the_launch_option():
    # Triton 3.4+ (the pinned one) compiles launch_pdl into the launcher; were it gone, enabled()
    # would quietly turn dependent launches off on every GPU
    assert grid_dependency._launch_option_known()
    assert grid_dependency.gdc_wait is not None


@pytest.mark.gpu
def test_gpu_dependent_launches_on_hopper_and_later_unless_switched_off(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    t = torch.zeros(1, device="cuda")
    monkeypatch.setattr(grid_dependency, "DEPENDENT_LAUNCHES", True)
    assert grid_dependency.enabled(t) == (torch.cuda.get_device_capability()[0] >= 9)
    monkeypatch.setattr(grid_dependency, "DEPENDENT_LAUNCHES", False)
    assert not grid_dependency.enabled(t)


# compiled in a child process: this one runs Triton's interpreter (conftest), whose kernels do not compile
_GENERAL_SCAN_PTX = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import indexer_topk as K
sig = {"q_ptr": "*bf16", "w_ptr": "*fp32", "mode_ptr": "*i32", "pos_ptr": "*i32", "rows_ptr": "*u8",
       "table_ptr": "*i32", "out_ptr": "*i64", "q_stride_s": "i32", "q_stride_part": "i32", "table_stride_s": "i32",
       "page_stride": "i32", "out_stride_s": "i32", "n_blk": "i32", "n_cols": "i32", "pages_per_prog": "i32",
       "inv_sqrt_di": "fp32", "row_stride": "constexpr", "HP": "constexpr", "DI": "constexpr", "N_PARTS": "constexpr",
       "SENTINEL_KEY": "constexpr", "MODE": "constexpr", "DEPENDENT": "constexpr"}
consts = {"row_stride": 68, "HP": 64, "DI": 128, "N_PARTS": K.GENERAL_PARTS, "SENTINEL_KEY": -2**63,
          "MODE": K.MODE_GENERAL, "DEPENDENT": True}
kernel = triton.compile(ASTSource(K._scan_kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": K.SCAN_WARPS})
sys.stdout.write(kernel.asm["ptx"])
"""


def _compile_in_child(script: str, *args: str):
    """Run a compile script in a child process without TRITON_INTERPRET (which conftest sets here,
    and under which kernels do not compile); its stdout is the PTX."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", script, *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def _memory_ops(ptx: str) -> list[str]:
    import re

    return [m.group(0) for m in re.finditer(
        r"griddepcontrol\.wait|griddepcontrol\.launch_dependents|(ld|st)\.global|cp\.async\.bulk", ptx)]


def test_the_dependent_general_scan_reads_nothing_before_its_wait():
    """A dependent launch sees what the kernels before it wrote only after griddepcontrol.wait
    (grid_dependency). The general scan, a dependent of the Gluon scan, used to score first and
    wait after; compiled for sm_90 (PTX and a cubin, no GPU needed), every global load and store
    of it must now follow its wait."""
    run = _compile_in_child(_GENERAL_SCAN_PTX)
    assert run.returncode == 0, run.stderr[-2000:]
    ops = _memory_ops(run.stdout)
    assert "griddepcontrol.wait" in ops and "ld.global" in ops and "st.global" in ops
    assert ops[0] == "griddepcontrol.wait", ops[:4]


# the Gluon FP8 scan (bulk_ws loader) as a dependent launch, compiled for sm_90a in a child process;
# exit 3 where this Triton cannot compile the Gluon code (its API moves between releases: CI's does not)
_GLUON_SCAN_PTX = """
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import mangle_type
from kernels import indexer_scan_hopper as H
from kernels import indexer_topk as K
try:
    from triton.experimental.gluon._runtime import GluonASTSource
    descs = H._page_descriptors(torch.zeros(8, 64, 68, dtype=torch.uint8))
except Exception as e:
    print(type(e).__name__, e, file=sys.stderr)
    sys.exit(3)
consts = dict(HP=64, SENTINEL_KEY=K.SENTINEL, MODE=K.MODE_FP8, STAGES=H.STAGES, SCORED_PAGES=H.SCORED_PAGES,
              DEPENDENT=True, BLOCK_S=int(sys.argv[1]), SENTINELS=sys.argv[2] == "1")
t = lambda dtype: torch.zeros(1, dtype=dtype)
args = dict(q8_ptr=t(torch.float8_e4m3fn), w8_ptr=t(torch.float32), mode_ptr=t(torch.int32), pos_ptr=t(torch.int32),
            head_desc=descs[0], tail_desc=descs[1], table_ptr=t(torch.int32), out_ptr=t(torch.int64),
            len_ptr=t(torch.int32))
fn = H._scan_kernel_ws
sig = {n: "constexpr" if n in consts else mangle_type(args[n]) if n in args else "i32" for n in fn.arg_names}
try:
    kernel = triton.compile(GluonASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": H.WARPS})
except Exception as e:
    print(type(e).__name__, repr(e.__cause__ or e)[:300], file=sys.stderr)
    sys.exit(3)
sys.stdout.write(kernel.asm["ptx"])
"""


@pytest.mark.parametrize("block_s,sentinels", [(0, True), (4, False)])
def test_the_dependent_gluon_scan_reads_nothing_before_its_wait_nor_lets_the_next_start(block_s, sentinels):
    """The Gluon scan, a dependent of the kernel writing its operands, must read nothing (loads,
    bulk copies) nor write before its griddepcontrol.wait, and let its own dependent (the general
    scan) be scheduled only after it (grid_dependency), per query and planned, with sentinels or
    lengths. Compiled for sm_90a, no GPU needed, but only a Triton that compiles the Gluon code
    (the GPU machines' 3.6, not CI's): skipped elsewhere, except beside a Hopper GPU, where the
    Gluon scan must run (its GPU tests fail if it falls back) and so must compile."""
    run = _compile_in_child(_GLUON_SCAN_PTX, str(block_s), str(int(sentinels)))
    if run.returncode == 3:
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
        (pytest.fail if hopper else pytest.skip)(f"this Triton does not compile the Gluon scan: "
                                                 f"{run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    ops = _memory_ops(run.stdout)
    assert "ld.global" in ops and "st.global" in ops and "cp.async.bulk" in ops, sorted(set(ops))
    assert ops[0] == "griddepcontrol.wait", ops[:4]
    assert "griddepcontrol.launch_dependents" in ops[1:], ops[:4]
