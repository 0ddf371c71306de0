"""load_tests/bench_scan_split.py's parts that need no GPU: its settings and its mixed batches."""

import pytest

from kernels import indexer_topk as IT
from kernels import scan_plan
from load_tests import bench_scan_split as B


def test_each_setting_switches_the_plan_and_the_row_lengths_and_puts_them_back():
    before = scan_plan.PLANNED, IT.ROW_LENGTHS
    seen = {}
    for name in B.SETTINGS:
        with B.setting(name):
            seen[name] = scan_plan.PLANNED, IT.ROW_LENGTHS
        assert (scan_plan.PLANNED, IT.ROW_LENGTHS) == before
    assert seen == {"per-query": (False, False), "planned": (True, False), "lengths": (True, True)}
    with pytest.raises(RuntimeError), B.setting("per-query"):
        raise RuntimeError("a failed case")
    assert (scan_plan.PLANNED, IT.ROW_LENGTHS) == before


def test_mixed_batches_are_32_queries_of_whole_compressed_entries_up_to_1m():
    for name, contexts in ((n, make()) for n, make in B.MIXED.items()):
        assert len(contexts) == 32 and max(contexts) == 1 << 20 and min(contexts) == 8192, name
        assert all(c % 4 == 0 for c in contexts), name
    assert B.MIXED["one-long"]().count(8192) == 31
    nbytes, _ = B.traffic(type("Cfg", (), {"index_n_heads": 64, "index_head_dim": 128}), [8192, 1 << 20])
    assert nbytes == IT.scan_traffic(1, 8192, 64, 128)[0] + IT.scan_traffic(1, 1 << 20, 64, 128)[0]
