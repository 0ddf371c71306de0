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

