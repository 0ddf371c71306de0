"""Released configs parse to the spec's schedules; bad configs fail with one clear error."""

import json
from pathlib import Path

import pytest

from workers.config import CSA, HCA, SWA, ConfigError, ModelConfig, parse_config, preset

FIXTURES = Path(__file__).parent / "fixtures"
FLASH = json.loads((FIXTURES / "deepseek-v4-flash" / "config.json").read_text())
PRO = json.loads((FIXTURES / "deepseek-v4-pro" / "config.json").read_text())


def test_flash_schedule_is_two_swa_then_csa_and_hca_alternating():
    cfg = parse_config(FLASH)
    assert cfg.num_hidden_layers == 43 and len(cfg.compress_ratios) == 43  # MTP entry dropped
    assert cfg.compress_ratios[:2] == (SWA, SWA)
    assert all(cfg.compress_ratios[i] == CSA for i in [2, *range(4, 43, 2)])
    assert all(cfg.compress_ratios[i] == HCA for i in range(3, 42, 2))
    assert (cfg.weight_format, cfg.expert_format, cfg.index_topk) == ("fp8", "fp4", 512)
    assert cfg.yarn is not None and cfg.yarn.factor == 16 and cfg.compress_rope_theta == 160000


def test_pro_schedule_is_two_hca_then_csa_on_even_layers():
    cfg = parse_config(PRO)
    assert cfg.num_hidden_layers == 61
    assert cfg.compress_ratios[:2] == (HCA, HCA)
    assert all(cfg.compress_ratios[i] == CSA for i in range(2, 61, 2))
    assert all(cfg.compress_ratios[i] == HCA for i in range(3, 61, 2))
    assert SWA not in cfg.compress_ratios


def test_transformers_keys_parse_to_the_same_config():
    from transformers import DeepseekV4Config

    hf = DeepseekV4Config(**{k: v for k, v in FLASH.items() if k not in ("architectures", "quantization_config", "expert_dtype")})
    d = hf.to_dict()
    assert "layer_types" in d and "rope_parameters" in d and "compress_ratios" not in d
    ours = parse_config(d)
    want = parse_config({k: v for k, v in FLASH.items() if k not in ("quantization_config", "expert_dtype")})
    assert ours.model_dump(exclude={"name"}) == want.model_dump(exclude={"name"})


def test_our_written_config_reads_back_equal():
    cfg = preset("tiny")
    assert parse_config(cfg.to_json_dict()) == cfg


def test_flash_0731_with_dspark_stages_parses_as_43_layers():
    raw = dict(FLASH, compress_ratios=FLASH["compress_ratios"][:43] + [0, 0, 0], dspark_num_stages=3)
    assert parse_config(raw).num_hidden_layers == 43


@pytest.mark.parametrize("change, message", [
    ({"compress_ratios": [0, 0, 8] + [128, 4] * 20 + [0]}, r"unknown compress ratio\(s\) \[8\]"),
    ({"compress_ratios": [0, 4, 128]}, r"compress_ratios has 3 entries; expected 43 layers"),
    ({"compress_ratios": [0, 0, 4] + [128, 4] * 20 + [0, 4]}, r"compress_ratios has 45 entries"),
    ({"compress_ratios": [2, 1] * 21 + [1], "kv_source_layer_ids": [0]}, r"unsupported architecture.*V4.1"),
    ({"architectures": ["DeepseekV3ForCausalLM"]}, r"unsupported architecture"),
    ({"compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}}, r"compress_rates"),
    ({"layer_types": ["sliding_attention"] * 42 + ["full_attention"]}, r"unknown layer type"),
    ({"num_key_value_heads": 8}, r"num_key_value_heads=8"),
    ({"index_head_dim": 96}, r"index_head_dim"),
])
def test_bad_configs_give_one_error_naming_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(dict(FLASH, **change))


def test_unreadable_config_files_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)


def test_tiny_preset_covers_every_layer_kind_and_both_moe_kinds():
    cfg = preset("tiny")
    assert {SWA, CSA, HCA} <= set(cfg.compress_ratios)
    assert 0 < cfg.num_hash_layers < cfg.num_hidden_layers
    assert (cfg.sliding_window, cfg.qk_rope_head_dim) == (128, 64)


def test_flash_attn_preset_has_real_v4_flash_attention_shapes():
    cfg = preset("flash-attn")
    assert (cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank, cfg.o_groups) == (64, 512, 1024, 8)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 512)
    assert {CSA, HCA} <= set(cfg.compress_ratios)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")
