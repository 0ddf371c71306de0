"""`v4serve capacity` reproduces the spec's per-token accounting (v4-architecture.md §6.3)."""

import json
from pathlib import Path

from cluster.cli import main
from workers.capacity import state_bytes
from workers.config import ModelConfig

FIXTURES = Path(__file__).parent / "fixtures"
MAIN, IDX = 584, 68


def capacity_json(capsys, *args):
    assert main(["capacity", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_flash_grows_3514_25_bytes_per_token(capsys):
    info = capacity_json(capsys, "--config", str(FIXTURES / "deepseek-v4-flash" / "config.json"))
    assert info["bytes_per_token"] == 3514.25 == 21 * (MAIN + IDX) / 4 + 20 * MAIN / 128
    assert (info["main_entry_bytes"], info["indexer_entry_bytes"]) == (MAIN, IDX)
    assert info["layer_types"][:3] == ["sliding_attention", "sliding_attention", "compressed_sparse_attention"]
    ring = 43 * 128 * MAIN
    csa = 2 * 4 * (4 * 1024 + 4 * 512) + 2 * 4 * (4 * 256 + 4 * 128)  # open + overlap, main + indexer
    hca = 2 * 4 * 128 * 512
    assert info["fixed_bytes_per_request"] == ring + 21 * csa + 20 * hca


def test_pro_grows_5031_44_bytes_per_token(capsys):
    info = capacity_json(capsys, "--config", str(FIXTURES / "deepseek-v4-pro"))
    assert info["bytes_per_token"] == 5031.4375 == 30 * (MAIN + IDX) / 4 + 31 * MAIN / 128
    assert info["layers"] == {"sliding_attention": 0, "compressed_sparse_attention": 30, "heavily_compressed_attention": 31}


def test_one_million_flash_tokens_take_3_43_gib():
    cfg = ModelConfig.from_file(FIXTURES / "deepseek-v4-flash")
    assert round(state_bytes(cfg)["bytes_per_token"] * 2**20 / 2**30, 2) == 3.43


def test_bad_config_is_one_line_on_stderr_and_exit_2(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "compress_ratios": [0, 7]}))
    assert main(["capacity", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown compress ratio" in err
