"""load_tests/bench_step_ab.py's parts that need no GPU: the switch it parses and that it puts the
switch back after timing with each value."""

import pytest

from kernels import grid_dependency
from load_tests import bench_step_ab as AB


def test_the_switch_is_a_module_attribute_and_two_or_more_literals():
    module, attr, values = AB.parse_switch("kernels.grid_dependency.DEPENDENT_LAUNCHES=True, False")
    assert module is grid_dependency and attr == "DEPENDENT_LAUNCHES" and values == [True, False]
    assert AB.parse_switch("kernels.key_select.SELECT_CHUNK=2048,4096")[2] == [2048, 4096]
    with pytest.raises(SystemExit, match="has no DEPENDENT_LAUNCHE$"):  # misspelt: would time one code twice
        AB.parse_switch("kernels.grid_dependency.DEPENDENT_LAUNCHE=True,False")
    with pytest.raises(SystemExit, match="at least two"):
        AB.parse_switch("kernels.grid_dependency.DEPENDENT_LAUNCHES=True")
    with pytest.raises(SystemExit, match="expected"):
        AB.parse_switch("DEPENDENT_LAUNCHES")


def test_each_value_is_timed_with_graphs_recaptured_and_the_switch_is_put_back(monkeypatch):
    seen = []

    class Model:
        graphs = "captured"

    def step_time(model, states, steps):
        seen.append((grid_dependency.DEPENDENT_LAUNCHES, model.graphs))
        return 0.002 if grid_dependency.DEPENDENT_LAUNCHES else 0.003

    rooms = []
    monkeypatch.setattr(AB.bk, "synthetic_states", lambda *a, room: rooms.append(room) or ["state"])
    monkeypatch.setattr(AB.bk, "step_time", step_time)
    before = grid_dependency.DEPENDENT_LAUNCHES

    class Cfg:
        max_position_embeddings = 1 << 20

    res = AB.time_case(Model(), Cfg(), None, 8192, 1, grid_dependency, "DEPENDENT_LAUNCHES", [True, False], 2, 4)
    assert seen == [(True, None), (False, None)] * 2  # alternated, each on freshly captured graphs
    assert res["step_ms"] == {"True": [2.0, 2.0], "False": [3.0, 3.0]}
    assert grid_dependency.DEPENDENT_LAUNCHES is before
    assert rooms[0] >= 2 * 2 * (4 + 2)  # the pools hold every step the rounds decode


def test_a_case_is_uniform_or_a_mix_of_lengths():
    assert AB.parse_case("131072x32") == [131072] * 32
    assert AB.parse_case("1048576x1+8192x31") == [1048576] + [8192] * 31
    for bad in ("131072", "8192x0", "8192x1+", "x2"):
        with pytest.raises(SystemExit, match="expected CxB"):
            AB.parse_case(bad)


def test_mixed_synthetic_states_each_stand_at_their_own_position(monkeypatch):
    """A mixed case's states: each at its own position, its layers' entry counts from it, all in
    one set of pools with room for every one of them."""
    import torch

    from workers.config import preset
    from workers.init import random_weights
    from workers.model import V4Model

    monkeypatch.setattr(AB.bk, "DEVICE", "cpu")
    cfg = preset("tiny")
    model = V4Model(cfg, dtype=torch.float32).load_weights(random_weights(cfg, 0))
    rows = AB.bk.encoded_rows(cfg, n=16)
    states = AB.fresh_states(cfg, model, rows, [700, 40, 301], 3, 2)
    assert [st.num_tokens for st in states] == [700, 40, 301]
    assert len({id(st.pools) for st in states}) == 1
    for st, p in zip(states, [700, 40, 301]):
        assert all(ls.count[f] == p // ls.ratio for ls in st.layers for f in ls.families())
    with pytest.raises(ValueError, match="2 positions for 3 states"):
        AB.bk.synthetic_states(cfg, model, [1, 2], 3, rows)
