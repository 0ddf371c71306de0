"""Dependent launches (kernels/grid_dependency.py): when they are used, and the option they pass."""

import pytest
import torch

from gluon_builds import build_ptx, compile_in_child, why_not
from kernels import gluon_api, grid_dependency


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


# compiled in a child process (compile_in_child): this one runs Triton's interpreter (conftest), whose
# kernels do not compile
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


def _memory_ops(ptx: str) -> list[str]:
    import re

    return [m.group(0) for m in re.finditer(
        r"griddepcontrol\.wait|griddepcontrol\.launch_dependents|(ld|st)\.global|cp\.async\.bulk", ptx)]


def test_the_dependent_general_scan_reads_nothing_before_its_wait():
    """A dependent launch sees what the kernels before it wrote only after griddepcontrol.wait
    (grid_dependency). The general scan, a dependent of the Gluon scan, used to score first and
    wait after; compiled for sm_90 (PTX and a cubin, no GPU needed), every global load and store
    of it must now follow its wait."""
    run = compile_in_child("-c", _GENERAL_SCAN_PTX)
    assert run.returncode == 0, run.stderr[-2000:]
    ops = _memory_ops(run.stdout)
    assert "griddepcontrol.wait" in ops and "ld.global" in ops and "st.global" in ops
    assert ops[0] == "griddepcontrol.wait", ops[:4]


@pytest.mark.parametrize("block_s,sentinels,general", [(0, True, 0), (4, False, 0), (4, True, 1)])
def test_the_dependent_gluon_scan_reads_nothing_before_its_wait_nor_lets_the_next_start(block_s, sentinels, general):
    """The Gluon scan, a dependent of the kernel writing its operands, must read nothing (loads,
    bulk copies) nor write before its griddepcontrol.wait, and let its own dependent (the general
    scan) be scheduled only after it (grid_dependency), per query and planned, with sentinels or
    lengths, and where it scores the general queries too (their parts and weights are written by
    the same kernel before it). Compiled for sm_90a, no GPU needed, but only by a Triton that allows the bulk loader's
    padded views (gluon_api.PADDED_VIEWS: the GPU machines' 3.6, not CI's 3.9): skipped elsewhere,
    except beside a Hopper GPU with such a Triton, where the scan must run (its GPU tests fail if
    it falls back) and so must compile."""
    run = build_ptx("scan_bulk_ws", "DEPENDENT=1", f"BLOCK_S={block_s}", f"SENTINELS={int(sentinels)}",
                    f"GENERAL={general}")
    if run.returncode == 3:
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
        (pytest.fail if hopper and gluon_api.PADDED_VIEWS else pytest.skip)(
            f"this Triton does not compile the Gluon scan's bulk-copy loader: {why_not(run)}")
    assert run.returncode == 0, run.stderr[-2000:]
    ops = _memory_ops(run.stdout)
    assert "ld.global" in ops and "st.global" in ops and "cp.async.bulk" in ops, sorted(set(ops))
    assert ops[0] == "griddepcontrol.wait", ops[:4]
    assert "griddepcontrol.launch_dependents" in ops[1:], ops[:4]
