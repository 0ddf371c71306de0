"""load_tests/bench_kernel_ab.py's parts that need no GPU: the values alternate, a value that moves
a result stops the run before any timing, the switch is put back, and --general flips the modes
it says."""

import types

import pytest
import torch

from kernels import hca_decode as hca
from kernels import indexer_topk as idx
from kernels import sparse_decode as sparse
from load_tests import bench_kernel_ab as KAB


@pytest.fixture
def fake_call(monkeypatch):
    """time_case around a stand-in call whose output is switch.OUT and a timer that records the value."""
    switch = types.SimpleNamespace(OUT=0, FAST=True)
    timed = []
    monkeypatch.setattr(KAB.bk, "kernel_inputs", lambda cfg, T, B, rows: {"iq": None, "iw": None})
    monkeypatch.setattr(idx, "query_operands", lambda q, w: ("q8", "w8", "parts", torch.zeros(4), "w_pad"))
    monkeypatch.setattr(KAB, "kernel_call", lambda kind, x, ops, cfg: lambda: torch.tensor([switch.OUT]))
    monkeypatch.setattr(KAB.bk, "graph_time", lambda fn: timed.append(switch.FAST) or (1e-5 if switch.FAST else 2e-5))
    cfg = types.SimpleNamespace(index_n_heads=64, index_head_dim=128)
    return switch, timed, cfg


def test_values_alternate_and_the_switch_is_put_back(fake_call):
    switch, timed, cfg = fake_call
    res = KAB.time_case(cfg, None, {"copy_bytes_per_s": 3e12}, 131072, 32, "scan", 0, switch, "FAST",
                        [False, True], 2)
    assert timed == [False, True, False, True]
    assert res["ms"] == {"False": [0.02, 0.02], "True": [0.01, 0.01]}
    assert switch.FAST is True  # as it was


def test_a_value_that_moves_a_result_stops_the_run_before_timing(fake_call):
    switch, timed, cfg = fake_call
    with pytest.raises(SystemExit, match="gives other results"):
        KAB.time_case(cfg, None, {"copy_bytes_per_s": 3e12}, 8192, 1, "scan", 0, switch, "OUT", [0, 1], 2)
    assert timed == [] and switch.OUT == 0


@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_attention_values_need_only_agree_within_the_bf16_tolerance(fake_call, kind):
    """A split size moves HCA's and CSA's float sums, so --kernel hca|csa holds each value to the
    kernels' bf16 tolerance of the first one's output, and still stops on a value past it."""
    switch, timed, cfg = fake_call
    res = KAB.time_case(cfg, None, {"copy_bytes_per_s": 3e12}, 8192, 1, kind, 0, switch, "OUT", [1.0, 1.01], 1)
    assert list(res["ms"]) == ["1.0", "1.01"] and len(timed) == 2
    with pytest.raises(SystemExit, match="gives other results"):
        KAB.time_case(cfg, None, {"copy_bytes_per_s": 3e12}, 8192, 1, kind, 0, switch, "OUT", [1.0, 1.1], 1)
    with pytest.raises(SystemExit, match="gives other results"):  # the scan's keys: bits, no tolerance
        KAB.time_case(cfg, None, {"copy_bytes_per_s": 3e12}, 8192, 1, "scan", 0, switch, "OUT", [1.0, 1.01], 1)


def test_general_sends_every_nth_query_to_the_general_scan():
    ops = ("q8", "w8", "parts", torch.full((7,), idx.MODE_FP8, dtype=torch.int32), "w_pad")
    assert KAB.with_general(ops, 0) is ops
    flipped = KAB.with_general(ops, 3)
    assert flipped[3].tolist() == [idx.MODE_GENERAL if i % 3 == 0 else idx.MODE_FP8 for i in range(7)]
    assert ops[3].eq(idx.MODE_FP8).all()  # the caller's modes are left as they were
    assert KAB.with_general(ops, 1)[3].eq(idx.MODE_GENERAL).all()


def test_select_times_the_selection_alone_on_the_scans_keys_and_lengths(monkeypatch):
    """--kernel select: the scan runs once, outside the timed call, which selects its keys at its lengths."""
    from kernels import key_select_ref as R

    scans = []
    scores = torch.randn(2, 2048, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([2048, 700], dtype=torch.int32)
    want = R.select_entries(R.keys_of_scores(scores, lengths), KAB.bk.INDEX_TOPK)
    keys = R.keys_of_scores(scores, torch.tensor([2048, 2048]))  # past a length the scan writes nothing
    keys[1, 700:] = torch.iinfo(torch.int64).max  # (whatever is there would be picked if read)
    monkeypatch.setattr(idx, "index_score_keys_and_lengths", lambda *a: scans.append(a) or (keys, lengths))
    x = dict(iq=None, iw=None, csa_index=None, block_table=torch.zeros(2, 32, dtype=torch.int32), positions=None)
    call = KAB.kernel_call("select", x, "ops", None)
    assert len(scans) == 1 and scans[0][-2:] == (32 * idx.PAGE_ENTRIES, "ops")
    got = call()
    assert len(scans) == 1  # not scanned again
    assert torch.equal(got, want)


def test_the_selection_is_measured_against_reading_its_keys_once():
    cfg = types.SimpleNamespace(index_n_heads=64, index_head_dim=128)
    assert KAB.bytes_moved("select", 32, 131071, cfg) == (32 * 32768 * 8, "the keys read once")
    assert KAB.bytes_moved("topk", 32, 131071, cfg)[0] == idx.scan_traffic(32, 131071, 64, 128)[0]
    assert KAB.bytes_moved("hca", 32, 131072, cfg)[0] == hca.decode_traffic(32, 131072)[0]
    assert KAB.bytes_moved("csa", 32, 131072, cfg)[0] == sparse.decode_traffic(32, 131072)[0]
