"""`v4serve generate` on the embedded default, through the same loader as a real checkpoint."""

import subprocess
import sys

import pytest
import torch

from cluster.cli import main
from workers.generate import generate_ids
from workers.loader import load_model, preset_checkpoint
from workers.sampling import SamplingParams


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("V4SERVE_CACHE", str(tmp_path_factory.getbasetemp() / "v4cache"))


def test_tiny_default_is_a_checkpoint_directory_loaded_like_any_other():
    path = preset_checkpoint("tiny")
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    from_dir, _ = load_model(str(path))
    from_name, _ = load_model("tiny")
    for (k, a), (_, b) in zip(from_dir.state_dict().items(), from_name.state_dict().items()):
        assert torch.equal(a, b), k


def test_greedy_cli_output_is_the_greedy_continuation(capsys):
    model, tok = load_model("tiny")
    ids = tok.encode("Hello, V4")
    want = [s.token_id for s in generate_ids(model, ids, SamplingParams(max_tokens=12, temperature=0))]
    assert main(["generate", "--prompt", "Hello, V4", "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out == tok.decode([t for t in want if t != model.cfg.eos_token_id]) + "\n"


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(capsys):
    args = ["generate", "--prompt", "abc", "--max-tokens", "24", "--temperature", "1.0", "--top-p", "0.95", "--seed", "4"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first
    main(["generate", "--prompt", "abc", "--max-tokens", "24"])
    assert capsys.readouterr().out != first


@pytest.mark.parametrize("flag, value, name", [("--top-p", "1.5", "--top-p"), ("--temperature", "-1", "--temperature"),
                                               ("--max-tokens", "0", "--max-tokens")])
def test_bad_sampling_flags_exit_2_with_one_line(capsys, flag, value, name):
    assert main(["generate", "--prompt", "x", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "cluster.cli", "capacity", "--preset", "tiny"], capture_output=True, text=True)
    assert res.returncode == 0 and "B/token" in res.stdout


def test_a_transformers_save_pretrained_directory_generates_what_transformers_generates(tmp_path, capsys):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from load_tests.transformers_peer import hf_greedy
    from workers.config import preset
    from workers.tokenizer import Tokenizer, build_byte_tokenizer

    cfg = preset("tiny")
    torch.manual_seed(0)
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_json_dict())).eval()
    with torch.no_grad():  # transformers initialises these to zero/one; make them matter
        for name, p in hf.named_parameters():
            if name.endswith(("position_bias", "sinks", "e_score_correction_bias")):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    tok = Tokenizer(build_byte_tokenizer(), cfg)
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    ids = tok.encode("transformers wrote this")
    want = [t for t in hf_greedy(hf, ids, 16)]
    assert main(["generate", "--model", str(tmp_path), "--prompt", "transformers wrote this", "--max-tokens", "16"]) == 0
    if cfg.eos_token_id in want:
        want = want[: want.index(cfg.eos_token_id)]
    assert capsys.readouterr().out == tok.decode(want) + "\n"
