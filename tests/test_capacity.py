"""State accounting reproduces the spec's per-token numbers (v4-architecture.md §6.3) and the fixed
per-request bytes written out by hand from §6 / the workers.capacity docstring."""

import argparse
import json
import math
from pathlib import Path

import pytest

from cluster import capacity_cmd
from workers.capacity import budget_capacity, state_bytes
from workers.config import ModelConfig, preset

FIXTURES = Path(__file__).parent / "fixtures"
MAIN, IDX = 584, 68  # 448 FP8 + 64*2 BF16 + 7 scales -> 583, padded to 584; 64 FP4 + 4 scales
W, D, DI, F32 = 128, 512, 128, 4


def fixed_bytes(n_layers, n_csa, n_hca):
    ring = n_layers * W * MAIN
    csa = 2 * F32 * (4 * 2 * D + 4 * D) + 2 * F32 * (4 * 2 * DI + 4 * DI)  # kv+score: open [4,2w] + overlap [4,w]
    hca = 2 * F32 * 128 * D  # kv+score: open [128, D]
    return ring, n_csa * csa + n_hca * hca


def test_flash_grows_3514_25_bytes_per_token_and_has_the_hand_computed_fixed_bytes():
    info = state_bytes(ModelConfig.from_file(FIXTURES / "deepseek-v4-flash"))
    assert (info["main_entry_bytes"], info["indexer_entry_bytes"]) == (MAIN, IDX)
    assert info["bytes_per_token_by_family"] == {"csa_main": 21 * MAIN / 4, "csa_indexer": 21 * IDX / 4,
                                                 "hca_main": 20 * MAIN / 128}
    assert info["bytes_per_token"] == 3514.25
    ring, comp = fixed_bytes(43, 21, 20)
    assert info["fixed_bytes_by_family"] == {"swa_ring": ring, "compressor_state": comp}
    assert info["fixed_bytes_per_request"] == ring + comp == 3_214_336 + 11_776_000
    assert info["layer_counts"] == {"sliding_attention": 2, "compressed_sparse_attention": 21,
                                    "heavily_compressed_attention": 20}


def test_pro_grows_5031_4375_bytes_per_token_and_has_the_hand_computed_fixed_bytes():
    info = state_bytes(ModelConfig.from_file(FIXTURES / "deepseek-v4-pro"))
    assert info["bytes_per_token"] == 5031.4375 == 30 * (MAIN + IDX) / 4 + 31 * MAIN / 128
    ring, comp = fixed_bytes(61, 30, 31)
    assert info["fixed_bytes_by_family"] == {"swa_ring": ring, "compressor_state": comp}
    assert info["fixed_bytes_per_request"] == 4_559_872 + 18_096_128
    assert info["layer_counts"]["sliding_attention"] == 0


def test_one_million_tokens_take_the_spec_gib():
    gib = {name: state_bytes(ModelConfig.from_file(FIXTURES / name))["bytes_per_token"] * 2**20 / 2**30
           for name in ("deepseek-v4-flash", "deepseek-v4-pro")}
    assert (round(gib["deepseek-v4-flash"], 2), round(gib["deepseek-v4-pro"], 2)) == (3.43, 4.91)


def test_entry_sizes_follow_the_config_widths():
    info = state_bytes(preset("tiny"))  # head_dim 128, rope 64, index_head_dim 64
    assert info["main_entry_bytes"] == 200  # 64 FP8 + 128 + 1 scale = 193 -> 200
    assert info["indexer_entry_bytes"] == 32 + 2
    assert info["layer_types"] == preset("tiny").layer_kinds


def parse(*argv):
    ap = argparse.ArgumentParser(prog="v4serve")
    capacity_cmd.add_parser(ap.add_subparsers(dest="command", required=True))
    return ap.parse_args(["capacity", *argv])


@pytest.mark.parametrize("where", ["deepseek-v4-flash", "deepseek-v4-flash/config.json"])
def test_capacity_command_prints_the_state_bytes_as_json(capsys, where):
    assert capacity_cmd.run(parse("--config", str(FIXTURES / where), "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(json.dumps(state_bytes(ModelConfig.from_file(FIXTURES / "deepseek-v4-flash"))))
    assert out["bytes_per_token"] == 3514.25 and len(out["layer_types"]) == 43


def test_capacity_command_prints_a_table_for_a_preset(capsys):
    assert capacity_cmd.run(parse("--preset", "tiny")) == 0
    out = capsys.readouterr().out
    assert out.startswith("model tiny: 5 layers")
    assert "120.125 B/token" in out and "427,008 B/request" in out


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--config", "/nonexistent/dir"], "no config.json at /nonexistent/dir"),
    (["--config", str(FIXTURES / "deepseek-v4.1-flash"), "--json"], "unsupported architecture"),
])
def test_capacity_command_errors_are_one_line_on_stderr_and_exit_2(capsys, argv, message):
    assert capacity_cmd.run(parse(*argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("v4serve capacity: ") and message in err


# ---- what fits in a memory budget (workers.capacity.budget_capacity, --budget-gib) -------------

GIB = 2**30
FLASH_GROWING, FLASH_FIXED = 3514.25, 3_214_336 + 11_776_000
FLASH_CHECKPOINT = 43 * 128 * MAIN + 21 * 2 * F32 * 4 * (D + DI)  # window tails + CSA overlap [4,D]+[4,Di]


def test_budget_json_for_flash_matches_the_hand_computed_formulas(capsys):
    B = 80 * GIB
    assert capacity_cmd.run(parse("--config", str(FIXTURES / "deepseek-v4-flash"), "--budget-gib", "80", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes_per_token"] == FLASH_GROWING  # the per-request accounting is still there
    assert out["budget_bytes"] == B
    assert out["tokens_per_family"] == {"csa_main": B // (21 * MAIN // 4), "csa_indexer": B // (21 * IDX // 4),
                                        "hca_main": int(B / (20 * MAIN / 128)), "swa_window_full_store": B // (43 * MAIN)}
    assert out["context_tokens"] == 32768
    assert out["concurrent_requests"] == int(B // (FLASH_GROWING * 32768 + FLASH_FIXED)) == 660
    assert out["checkpoint_interval_blocks"] == 16 and out["checkpoint_bytes"] == FLASH_CHECKPOINT == 3_644_416
    per_token = {"full_store": FLASH_GROWING + 43 * MAIN,  # §8.3: 25,112 B/token of raw window keys on top
                 "checkpoint": FLASH_GROWING + FLASH_CHECKPOINT / (16 * 256),
                 "recompute": FLASH_GROWING}
    assert out["prefix_bytes_per_token"] == per_token
    assert out["prefix_tokens_per_gib"] == {p: GIB / b for p, b in per_token.items()}
    ratio = out["prefix_tokens_per_gib_ratio_to_full_store"]
    assert ratio == {p: per_token["full_store"] / b for p, b in per_token.items()}
    assert ratio["full_store"] == 1 and round(ratio["recompute"], 2) == 8.15  # the spec's "about 7x" extra, plus 1


def test_budget_context_and_checkpoint_interval_flags_for_a_preset(capsys):
    cfg = preset("flash-attn")
    info = state_bytes(cfg)
    assert capacity_cmd.run(parse("--preset", "flash-attn", "--budget-gib", "2.5", "--context", "1048576",
                                  "--checkpoint-interval", "64", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    B = int(2.5 * GIB)
    assert out["budget_bytes"] == B and out["context_tokens"] == 2**20
    assert out["concurrent_requests"] == int(B // (info["bytes_per_token"] * 2**20 + info["fixed_bytes_per_request"]))
    assert out["checkpoint_interval_blocks"] == 64
    assert out["prefix_bytes_per_token"]["checkpoint"] == info["bytes_per_token"] + out["checkpoint_bytes"] / (64 * 256)
    assert out["checkpoint_bytes"] == 4 * 128 * MAIN + 2 * 2 * F32 * 4 * (D + DI)  # 1 SWA, 2 CSA, 1 HCA layers


def test_prefix_policies_order_and_checkpoint_tends_to_recompute():
    cfg = ModelConfig.from_file(FIXTURES / "deepseek-v4-pro")
    per_gib = [budget_capacity(cfg, GIB, checkpoint_interval=n)["prefix_tokens_per_gib"] for n in (1, 16, 64, 10**9)]
    for p in per_gib:
        assert p["full_store"] < p["checkpoint"] < p["recompute"]
    checkpoints = [p["checkpoint"] for p in per_gib]
    assert checkpoints == sorted(checkpoints) and math.isclose(checkpoints[-1], per_gib[0]["recompute"], rel_tol=1e-6)
    # Pro: 61 layers x 584 B of raw window keys per token on top of 5031.4375 (§8.3: 35,624 B/token)
    assert budget_capacity(cfg, GIB)["prefix_bytes_per_token"]["full_store"] - 5031.4375 == 35_624


def test_a_family_the_model_lacks_fits_any_number_of_tokens(capsys, tmp_path):
    swa_only = ModelConfig(**{**preset("tiny").model_dump(), "compress_ratios": (0,) * 5})
    out = budget_capacity(swa_only, GIB)
    assert out["tokens_per_family"]["csa_main"] is None and out["tokens_per_family"]["hca_main"] is None
    assert out["tokens_per_family"]["swa_window_full_store"] == GIB // (5 * 200)
    assert out["prefix_bytes_per_token"]["recompute"] == 0  # nothing grows; every request is its fixed state
    assert out["prefix_tokens_per_gib"]["recompute"] is None
    (tmp_path / "config.json").write_text(json.dumps(swa_only.to_json_dict()))
    assert capacity_cmd.run(parse("--config", str(tmp_path), "--budget-gib", "1")) == 0  # the table copes with nulls
    assert "unbounded (no such layer)" in capsys.readouterr().out
    assert out["concurrent_requests"] == GIB // state_bytes(swa_only)["fixed_bytes_per_request"]


def test_budget_table_for_a_preset(capsys):
    assert capacity_cmd.run(parse("--preset", "flash-attn", "--budget-gib", "80")) == 0
    out = capsys.readouterr().out
    assert "budget 80 GiB (85,899,345,920 B)" in out and "concurrent requests at 32,768 tokens:" in out
    assert "recompute" in out and "8.07x full_store" in out


@pytest.mark.parametrize("argv, message", [
    (["--context", "4096"], "need --budget-gib"),
    (["--checkpoint-interval", "4"], "need --budget-gib"),
    (["--budget-gib", "0"], "--budget-gib must be positive"),
    (["--budget-gib", "1", "--context", "0"], "must be positive"),
    (["--budget-gib", "1", "--checkpoint-interval", "0"], "at least 1 block"),
])
def test_budget_flag_errors_are_one_line_on_stderr_and_exit_2(capsys, argv, message):
    assert capacity_cmd.run(parse("--preset", "tiny", *argv, "--json")) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err


def test_bench_capacity_prints_the_policies_and_the_recompute_ceiling(capsys):
    from load_tests import bench_capacity
    bench_capacity.main(["--config", str(FIXTURES / "deepseek-v4-flash")])
    out = capsys.readouterr().out
    for policy in ("full_store", "checkpoint N=16", "checkpoint N=64", "recompute"):
        assert sum(line.startswith(f"  {policy} ") for line in out.splitlines()) == 2  # flash-attn preset, Flash config
    assert "= (3514.25 + 43*584) / 3514.25 = 8.15x" in out
