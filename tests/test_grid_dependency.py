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


def test_the_dependent_general_scan_reads_nothing_before_its_wait():
    """A dependent launch sees what the kernels before it wrote only after griddepcontrol.wait
    (grid_dependency). The general scan, a dependent of the Gluon scan, used to score first and
    wait after; compiled for sm_90 (PTX and a cubin, no GPU needed), every global load and store
    of it must now follow its wait."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    ptx = subprocess.run([sys.executable, "-c", _GENERAL_SCAN_PTX], cwd=root, env=env, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    ops = [m.group(0) for m in re.finditer(r"griddepcontrol\.wait|(ld|st)\.global", ptx)]
    assert "griddepcontrol.wait" in ops and "ld.global" in ops and "st.global" in ops
    assert ops[0] == "griddepcontrol.wait", ops[:4]
