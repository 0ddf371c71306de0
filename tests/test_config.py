"""Released configs parse to the spec's schedules (v4-architecture.md §1.1); bad configs fail with
one ConfigError that names the problem."""

import json
from pathlib import Path

import pytest

from workers.config import CSA, HCA, SWA, ConfigError, ModelConfig, parse_config, preset

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


FLASH, PRO = fixture("deepseek-v4-flash"), fixture("deepseek-v4-pro")

# §1.1: Flash L0, L1 SWA-only, L2 and even L4..L42 CSA, odd L3..L41 HCA;
#       Pro L0, L1 HCA, even L2..L60 CSA, odd L3..L59 HCA.
FLASH_SCHEDULE = tuple(SWA if i < 2 else CSA if i % 2 == 0 else HCA for i in range(43))
PRO_SCHEDULE = tuple(HCA if i < 2 else CSA if i % 2 == 0 else HCA for i in range(61))


def test_released_fixtures_carry_the_mtp_entry_in_compress_ratios():
    assert (len(FLASH["compress_ratios"]), len(PRO["compress_ratios"])) == (44, 62)
    assert FLASH["compress_ratios"][-1] == PRO["compress_ratios"][-1] == 0


def test_flash_parses_to_two_swa_layers_then_csa_on_even_and_hca_on_odd_layers():
    cfg = ModelConfig.from_file(FIXTURES / "deepseek-v4-flash")
    assert cfg.name == "deepseek-v4-flash"
    assert cfg.compress_ratios == FLASH_SCHEDULE  # the trailing MTP entry is dropped
    assert cfg.layer_kinds[:4] == ["sliding_attention", "sliding_attention",
                                   "compressed_sparse_attention", "heavily_compressed_attention"]
    assert [cfg.compress_ratios.count(r) for r in (SWA, CSA, HCA)] == [2, 21, 20]
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.o_groups) == (4096, 64, 1024, 8)
    assert (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.routed_scaling_factor) == (256, 2048, 1.5)
    assert (cfg.o_lora_rank, cfg.index_topk, cfg.num_hash_layers, cfg.num_nextn_predict_layers) == (1024, 512, 3, 1)
    assert (cfg.weight_format, cfg.expert_format) == ("fp8", "fp4")
    assert (cfg.rope_theta, cfg.compress_rope_theta) == (10000, 160000)
    assert cfg.yarn is not None and (cfg.yarn.factor, cfg.yarn.original_max_position_embeddings) == (16, 65536)


def test_pro_parses_to_two_hca_layers_then_csa_on_even_and_hca_on_odd_layers():
    cfg = ModelConfig.from_file(FIXTURES / "deepseek-v4-pro" / "config.json")
    assert cfg.compress_ratios == PRO_SCHEDULE
    assert [cfg.compress_ratios.count(r) for r in (SWA, CSA, HCA)] == [0, 30, 31]
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.o_groups) == (7168, 128, 1536, 16)
    assert (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.routed_scaling_factor) == (384, 3072, 2.5)
    assert cfg.index_topk == 1024


@pytest.mark.parametrize("raw", [FLASH, PRO], ids=["flash", "pro"])
def test_transformers_keys_parse_to_the_same_config(raw):
    from transformers import DeepseekV4Config

    d = DeepseekV4Config(**raw).to_dict()
    assert "layer_types" in d and "rope_parameters" in d and "compress_ratios" not in d
    want = parse_config(raw).model_dump(exclude={"name"})
    assert parse_config(d).model_dump(exclude={"name"}) == want
    # Without the legacy keys transformers also keeps, the RoPE facts come from
    # partial_rotary_factor and the nested rope_parameters alone.
    legacy = ("qk_rope_head_dim", "rope_theta", "compress_rope_theta")
    hf_only = {k: v for k, v in d.items() if k not in legacy}
    assert parse_config(hf_only).model_dump(exclude={"name"}) == want


def test_our_written_config_reads_back_equal_through_us_and_transformers():
    from transformers import DeepseekV4Config

    cfg = preset("tiny")
    assert parse_config(cfg.to_json_dict()) == cfg
    assert parse_config(DeepseekV4Config(**cfg.to_json_dict()).to_dict()) == cfg


def test_flash_0731_with_three_dspark_stages_parses_as_the_43_layer_flash():
    raw = fixture("deepseek-v4-flash-0731")
    assert len(raw["compress_ratios"]) == 46 and raw["compress_ratios"][-3:] == [0, 0, 0]
    assert any(k.startswith("dspark_") for k in raw)
    cfg = parse_config(raw)
    assert cfg.num_hidden_layers == 43 and cfg.compress_ratios == FLASH_SCHEDULE
    assert cfg.model_dump(exclude={"name"}) == parse_config(FLASH).model_dump(exclude={"name"})


def test_three_trailing_entries_without_dspark_keys_are_rejected():
    raw = {k: v for k, v in fixture("deepseek-v4-flash-0731").items() if not k.startswith("dspark_")}
    with pytest.raises(ConfigError, match=r"compress_ratios has 46 entries; expected 43 layers \(\+ 1 MTP"):
        parse_config(raw)


def one_error(raw) -> str:
    """The message of the single ConfigError that parsing `raw` raises (one line, no chained cause)."""
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    msg = str(e.value)
    assert "\n" not in msg and e.value.__cause__ is None
    return msg


def test_v41_release_config_is_rejected_as_a_different_architecture():
    v41 = fixture("deepseek-v4.1-flash")
    assert "DeepseekV41ForCausalLM" in one_error(v41) and "V4.1" in one_error(v41)
    # Its text config on its own, and even relabelled as V4, is still recognised by its V4.1-only keys.
    text = v41["text_config"]
    assert "V4.1-only keys ['kv_source_layer_ids', 'engram_layer_ids']" in one_error(text)
    relabelled = dict(text, model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"])
    assert "V4.1-only keys" in one_error(relabelled)


@pytest.mark.parametrize("change, message", [
    ({"compress_ratios": [0, 0, 8] + [128, 4] * 20 + [0]}, "unknown compress ratio(s) [8] in compress_ratios"),
    ({"compress_ratios": [0, 0] + [2] * 18 + [1] * 23 + [0]}, "unknown compress ratio(s) [1, 2]"),
    ({"compress_ratios": [0, 0, 4, 128]}, "compress_ratios has 4 entries; expected 43 layers (+ 1 MTP entries of 0)"),
    ({"compress_ratios": [0, 0, 4] + [128, 4] * 20 + [0, 0]}, "compress_ratios has 45 entries"),
    ({"compress_ratios": [0, 0, 4] + [128, 4] * 20 + [4]}, "compress_ratios has 44 entries"),  # MTP entry not SWA
    ({"compress_ratios": 4}, "compress_ratios must be a list, got 4"),
    ({"compress_ratios": [[4]] * 44}, "unknown compress ratio(s) [[4]]"),
    ({"compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 64}}, "compress_rates="),
    ({"layer_types": ["sliding_attention"] * 42 + ["full_attention"]}, "unknown layer type(s) ['full_attention']"),
    ({"layer_types": ["sliding_attention"] * 42}, "layer_types has 42 entries; num_hidden_layers is 43"),
    ({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}, "unsupported architecture"),
    ({"num_key_value_heads": 8}, "num_key_value_heads=8"),
    ({"index_head_dim": 96}, "index_head_dim=96"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32]}}, "expected fp8 with 128x128"),
    ({"quantization_config": ["fp8"]}, "quantization_config must be an object"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object"),
    ({"rope_scaling": {"type": "yarn", "factor": "big"}}, "(yarn.factor)"),
    ({"num_nextn_predict_layers": "1"}, "num_nextn_predict_layers must be an integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ({"eos_token_id": []}, "(eos_token_id)"),
])
def test_bad_configs_give_one_error_naming_the_problem(change, message):
    assert message in one_error(dict(FLASH, **change))


def test_a_config_that_is_not_an_object_is_one_error():
    assert "must be a JSON object, got list" in one_error([FLASH])


def test_unreadable_config_files_give_one_error_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match=f"no config.json at {tmp_path / 'config.json'}"):
        ModelConfig.from_file(tmp_path)  # a directory without config.json
    with pytest.raises(ConfigError, match="no config.json at .*missing.json"):
        ModelConfig.from_file(tmp_path / "missing.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{bad} is not valid JSON"):
        ModelConfig.from_file(tmp_path)
    bad.write_bytes(b"\x80\x81safetensors\xff")  # e.g. --config pointed at a weights file
    with pytest.raises(ConfigError, match=f"{bad} is not valid JSON"):
        ModelConfig.from_file(bad)


def test_tiny_preset_has_every_layer_kind_both_moe_kinds_and_the_real_window():
    cfg = preset("tiny")
    assert {SWA, CSA, HCA} <= set(cfg.compress_ratios)
    assert 0 < cfg.num_hash_layers < cfg.num_hidden_layers  # hash-routed layers, then routed ones
    assert (cfg.sliding_window, cfg.vocab_size) == (128, 258)


def test_flash_attn_preset_has_real_v4_flash_attention_shapes():
    cfg, flash = preset("flash-attn"), parse_config(FLASH)
    fields = ("hidden_size", "num_attention_heads", "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups",
              "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "index_topk")
    assert {f: getattr(cfg, f) for f in fields} == {f: getattr(flash, f) for f in fields}
    assert {CSA, HCA} <= set(cfg.compress_ratios)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; known: \[.*'tiny'"):
        preset("nope")
