"""load_tests/bench_step_ab.py's parts that need no GPU: the switch it parses and that it puts the
switch back after timing with each value."""

import pytest

from kernels import grid_dependency
from load_tests import bench_step_ab as AB


def test_the_switch_is_a_module_attribute_and_two_or_more_literals():
    module, attr, values = AB.parse_switch("kernels.grid_dependency.SMALL_KERNELS=True, False")
    assert module is grid_dependency and attr == "SMALL_KERNELS" and values == [True, False]
    assert AB.parse_switch("kernels.key_select.SELECT_CHUNK=2048,4096")[2] == [2048, 4096]
    with pytest.raises(SystemExit, match="has no SMALL_KERNEL"):  # misspelt: would time one code twice
        AB.parse_switch("kernels.grid_dependency.SMALL_KERNEL=True,False")
    with pytest.raises(SystemExit, match="at least two"):
        AB.parse_switch("kernels.grid_dependency.SMALL_KERNELS=True")
    with pytest.raises(SystemExit, match="expected"):
        AB.parse_switch("SMALL_KERNELS")


def test_each_value_is_timed_with_graphs_recaptured_and_the_switch_is_put_back(monkeypatch):
    seen = []

    class Model:
        graphs = "captured"

    def step_time(model, states, steps):
        seen.append((grid_dependency.SMALL_KERNELS, model.graphs))
        return 0.002 if grid_dependency.SMALL_KERNELS else 0.003

    rooms = []
    monkeypatch.setattr(AB.bk, "synthetic_states", lambda *a, room: rooms.append(room) or ["state"])
    monkeypatch.setattr(AB.bk, "step_time", step_time)
    before = grid_dependency.SMALL_KERNELS

    class Cfg:
        max_position_embeddings = 1 << 20

    res = AB.time_case(Model(), Cfg(), None, 8192, 1, grid_dependency, "SMALL_KERNELS", [True, False], 2, 4)
    assert seen == [(True, None), (False, None)] * 2  # alternated, each on freshly captured graphs
    assert res["step_ms"] == {"True": [2.0, 2.0], "False": [3.0, 3.0]}
    assert grid_dependency.SMALL_KERNELS is before
    assert rooms[0] >= 2 * 2 * (4 + 2)  # the pools hold every step the rounds decode
