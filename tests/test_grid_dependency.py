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
    assert grid_dependency.enabled(t) == (torch.cuda.get_device_capability()[0] >= 9)
    monkeypatch.setattr(grid_dependency, "DEPENDENT_LAUNCHES", False)
    assert not grid_dependency.enabled(t)


def test_small_kernels_launch_as_dependents_only_where_switched_on_and_enabled(monkeypatch):
    # as_dependent gives the kernel's constant and the launch option together: a kernel told
    # DEPENDENT without launch_pdl would wait in griddepcontrol for nothing; launched with it but
    # told not to wait, it could read what the kernel before still writes
    cpu = torch.zeros(1)
    monkeypatch.setattr(grid_dependency, "SMALL_KERNELS", True)
    assert grid_dependency.as_dependent(cpu) == {"DEPENDENT": False}
    monkeypatch.setattr(grid_dependency, "enabled", lambda t: True)
    assert grid_dependency.as_dependent(cpu) == {"DEPENDENT": True, "launch_pdl": True}
    monkeypatch.setattr(grid_dependency, "SMALL_KERNELS", False)
    assert grid_dependency.as_dependent(cpu) == {"DEPENDENT": False}
    assert grid_dependency.gdc_launch_dependents is not None  # begin_dependent's other half


def test_every_small_kernel_begins_with_its_dependent_wait():
    # begin_dependent must precede any global access: the kernel before may still read what a
    # dependent writes. Each kernel of a module that launches through as_dependent (the scans keep
    # their own waits, placed by hand) calls it as its first statement
    import ast
    import pathlib

    kernels = pathlib.Path(grid_dependency.__file__).parent
    checked = 0
    for path in sorted(kernels.glob("*.py")):
        source = path.read_text()
        if path.name == "grid_dependency.py" or "as_dependent(" not in source:
            continue
        tree = ast.parse(source)
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            if not any(a.arg == "DEPENDENT" for a in fn.args.args):
                continue
            body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            first = body[0]
            assert (isinstance(first, ast.Expr) and isinstance(first.value, ast.Call)
                    and getattr(first.value.func, "id", None) == "begin_dependent"), f"{path.name}:{fn.name}"
            checked += 1
    assert checked >= 15
