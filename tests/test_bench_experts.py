"""load_tests/bench_experts.py as a smoke run in the interpreter (no GPU needed): it runs the
picked experts' kernels and MoE._routed on each case, stops if their bits differ, and accounts the
weights the kernels read."""

import pytest
import torch

from load_tests import bench_experts, bench_kernels


def test_bench_experts_smoke_run_checks_the_bits_and_counts_the_weights_read(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")
    monkeypatch.setattr(bench_kernels, "DEVICE", "cpu")
    res = bench_experts.main(["--preset", "tiny", "--experts", "8", "--layers", "1"])
    moe = bench_experts.layers_of(bench_experts.preset("tiny"), 1, "cpu")[0]
    one = sum(getattr(moe.experts[0], w).weight.nbytes for w in ("w1", "w3", "w2"))
    rows = {r["case"]: r for r in res["cases"]}
    assert rows["1 in 16"]["distinct_experts"] == 4  # the real row's pair and the padded rows' pair
    for r in rows.values():
        assert r["bytes"] == (r["distinct_experts"] + 1) * one  # the picked experts and the shared one
        assert r["picked_us"] > 0 and r["routed_us"] > 0 and 0 < r["of_copy_rate"]


def test_a_bit_that_differs_stops_the_run(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")
    monkeypatch.setattr(bench_kernels, "DEVICE", "cpu")
    real = bench_experts.picked_experts.moe
    monkeypatch.setattr(bench_experts.picked_experts, "moe", lambda *a: real(*a) + torch.finfo(torch.bfloat16).eps)
    with pytest.raises(SystemExit, match="differ"):
        bench_experts.main(["--preset", "tiny", "--experts", "8", "--layers", "1"])
