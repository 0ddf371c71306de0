"""workers/checkpoint.py: inventory, save -> load round trips, quantized and transformers checkpoints,
and one clear CheckpointError per kind of broken checkpoint."""

import json
import os
import shutil
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kernels.block_quant import fp4_e2m1_block_qdq
from workers.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, tensor_inventory
from workers.config import preset
from workers.quant import dequant_fp8_weight, quant_fp4_weight, quant_fp8_weight


def model_tensors(cfg, seed=0):
    """Random logical tensors for every inventory entry."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in tensor_inventory(cfg).items():
        if spec.kind == "int":
            out[name] = torch.randint(0, cfg.n_routed_experts, spec.shape, generator=g)
        else:
            out[name] = torch.randn(spec.shape, generator=g) * 0.1
    return out


def disk_dtypes(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.fixture(scope="module")
def tiny():
    return preset("tiny")


@pytest.fixture(scope="module")
def tiny_tensors(tiny):
    return model_tensors(tiny)


@pytest.fixture
def saved(tmp_path, tiny, tiny_tensors):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny, tiny_tensors, tokenizer_json='{"model": {}}')
    return path


def rewrite(path, mutate):
    """Apply `mutate` to the raw {name: tensor} of model.safetensors and write it back."""
    raw = load_file(str(path / "model.safetensors"))
    mutate(raw)
    save_file(raw, str(path / "model.safetensors"))


# ---- inventory ----------------------------------------------------------------------------------

def test_inventory_has_per_layer_kind_tensors_with_spec_shapes(tiny):
    inv = tensor_inventory(tiny)  # layers: SWA, CSA, HCA, CSA, HCA; hash layers 0-1
    assert inv["layers.0.attn.wo_a.weight"].shape == (64, 256)
    assert inv["layers.0.hc_attn_fn"].shape == (24, 256)
    assert "layers.0.attn.compressor.ape" not in inv
    assert inv["layers.1.attn.compressor.ape"].shape == (4, 256)
    assert inv["layers.1.attn.indexer.compressor.wkv.weight"].shape == (128, 64)
    assert inv["layers.2.attn.compressor.ape"].shape == (128, 128)
    assert "layers.2.attn.indexer.wq_b.weight" not in inv
    assert inv["layers.1.ffn.gate.tid2eid"].shape == (258, 2) and inv["layers.1.ffn.gate.tid2eid"].kind == "int"
    assert "layers.2.ffn.gate.tid2eid" not in inv and inv["layers.2.ffn.gate.bias"].shape == (8,)
    assert inv["layers.4.ffn.experts.7.w2.weight"].kind == "expert"
    assert inv["layers.4.attn.wq_b.weight"].kind == "fp8"


# ---- round trips --------------------------------------------------------------------------------

def test_f32_save_then_load_returns_identical_tensors_config_and_tokenizer(saved, tiny, tiny_tensors):
    cfg, got = load_checkpoint(saved)
    assert cfg.model_dump(exclude={"name"}) == tiny.model_dump(exclude={"name"})
    assert list(got) == list(tensor_inventory(tiny))
    for name, t in tiny_tensors.items():
        assert got[name].dtype == (torch.int64 if t.dtype == torch.int64 else torch.float32), name
        assert torch.equal(got[name], t), name
    assert (saved / "tokenizer.json").read_text() == '{"model": {}}'


def test_bf16_save_stores_bf16_and_loads_the_rounded_values_in_any_dtype(tmp_path, tiny, tiny_tensors):
    save_checkpoint(tmp_path / "c", tiny, tiny_tensors, dtype=torch.bfloat16)
    dtypes = disk_dtypes(tmp_path / "c")
    assert dtypes["embed.weight"] == "BF16" and dtypes["layers.0.ffn.gate.tid2eid"] == "I64"
    _, f32 = load_checkpoint(tmp_path / "c")
    _, bf16 = load_checkpoint(tmp_path / "c", dtype=torch.bfloat16)
    for name, t in tiny_tensors.items():
        if t.is_floating_point():
            assert torch.equal(bf16[name], t.bfloat16()), name
            assert torch.equal(f32[name], t.bfloat16().float()), name
        else:
            assert torch.equal(bf16[name], t), name


@pytest.mark.parametrize("expert_format", ["fp4", "fp8"])
def test_fp8_checkpoint_with_quantized_experts_loads_exactly_the_dequantized_values(tmp_path, tiny, tiny_tensors, expert_format):
    cfg = tiny.model_copy(update={"weight_format": "fp8", "expert_format": expert_format})
    save_checkpoint(tmp_path / "q", cfg, tiny_tensors)
    dtypes = disk_dtypes(tmp_path / "q")
    assert dtypes["layers.1.attn.wq_b.weight"] == "F8_E4M3" and dtypes["layers.1.attn.wq_b.scale"] == "F8_E8M0"
    assert dtypes["layers.1.ffn.experts.0.w1.weight"] == ("I8" if expert_format == "fp4" else "F8_E4M3")
    assert dtypes["layers.1.attn.compressor.wkv.weight"] == "F32"  # "float" kind stays unquantized
    loaded_cfg, got = load_checkpoint(tmp_path / "q")
    assert (loaded_cfg.weight_format, loaded_cfg.expert_format) == ("fp8", expert_format)
    inv = tensor_inventory(cfg)
    for name, t in tiny_tensors.items():
        kind = inv[name].kind
        if kind == "fp8" or (kind == "expert" and expert_format == "fp8"):
            want = dequant_fp8_weight(*quant_fp8_weight(t))
        elif kind == "expert":
            want = fp4_e2m1_block_qdq(t, 32)
        else:
            want = t
        assert torch.equal(got[name], want), name
    assert not torch.equal(got["layers.1.attn.wq_b.weight"], tiny_tensors["layers.1.attn.wq_b.weight"])


def test_transformers_quantized_names_stacked_fp4_experts_and_weight_scale_inv_decode(tmp_path, tiny, tiny_tensors):
    cfg = tiny.model_copy(update={"weight_format": "fp8"})
    save_checkpoint(tmp_path / "q", cfg, tiny_tensors)
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    w1 = torch.stack([tiny_tensors[f"layers.4.ffn.experts.{e}.w1.weight"] for e in range(E)])
    w3 = torch.stack([tiny_tensors[f"layers.4.ffn.experts.{e}.w3.weight"] for e in range(E)])
    packed, scale = quant_fp4_weight(torch.cat([w1, w3], dim=1))  # [E, 2I, d]: gate rows first

    def to_hf_names(raw):
        for e in range(E):
            raw.pop(f"layers.4.ffn.experts.{e}.w1.weight")
            raw.pop(f"layers.4.ffn.experts.{e}.w3.weight")
        raw["model.layers.4.mlp.experts.gate_up_proj"] = packed
        raw["model.layers.4.mlp.experts.gate_up_proj_scale_inv"] = scale
        raw["model.layers.1.self_attn.q_b_proj.weight"] = raw.pop("layers.1.attn.wq_b.weight")
        raw["model.layers.1.self_attn.q_b_proj.weight_scale_inv"] = raw.pop("layers.1.attn.wq_b.scale")

    rewrite(tmp_path / "q", to_hf_names)
    _, got = load_checkpoint(tmp_path / "q")
    for e in (0, E - 1):
        assert torch.equal(got[f"layers.4.ffn.experts.{e}.w1.weight"], fp4_e2m1_block_qdq(w1[e], 32))
        assert torch.equal(got[f"layers.4.ffn.experts.{e}.w3.weight"], fp4_e2m1_block_qdq(w3[e], 32))
    want = dequant_fp8_weight(*quant_fp8_weight(tiny_tensors["layers.1.attn.wq_b.weight"]))
    assert torch.equal(got["layers.1.attn.wq_b.weight"], want)


def test_checkpoint_without_mtp_layers_ignores_mtp_tensors_on_disk(saved, tiny_tensors):
    rewrite(saved, lambda raw: raw.update({"mtp.0.e_proj.weight": torch.zeros(64, 64)}))
    _, got = load_checkpoint(saved)
    assert torch.equal(got["embed.weight"], tiny_tensors["embed.weight"])


def test_explicit_cfg_overrides_and_config_json_is_then_not_needed(saved, tiny):
    (saved / "config.json").unlink()
    cfg, got = load_checkpoint(saved, cfg=tiny)
    assert cfg is tiny and len(got) == len(tensor_inventory(tiny))


# ---- transformers checkpoints -------------------------------------------------------------------

HF_KW = dict(
    vocab_size=258, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
    head_dim=128, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=8, o_groups=2, o_lora_rank=32,
    index_n_heads=8, index_head_dim=64, index_topk=16, compress_ratios=[0, 4, 128], num_hash_layers=1,
    qk_rope_head_dim=64,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1},
)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A random transformers model saved twice: default format, and module names in several shards."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**HF_KW))
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "native")
    model.save_pretrained(root / "modules", save_original_format=False, max_shard_size="100KB")
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}, root


# transformers module name -> native name, one per rename rule (layer 1 is CSA, layer 2 HCA).
HF_PAIRS = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
    "model.layers.1.input_layernorm.weight": "layers.1.attn_norm.weight",
    "model.layers.1.post_attention_layernorm.weight": "layers.1.ffn_norm.weight",
    "model.layers.1.attn_hc.fn": "layers.1.hc_attn_fn",
    "model.layers.1.ffn_hc.scale": "layers.1.hc_ffn_scale",
    "model.layers.1.self_attn.sinks": "layers.1.attn.attn_sink",
    "model.layers.1.self_attn.q_a_proj.weight": "layers.1.attn.wq_a.weight",
    "model.layers.1.self_attn.q_a_norm.weight": "layers.1.attn.q_norm.weight",
    "model.layers.1.self_attn.q_b_proj.weight": "layers.1.attn.wq_b.weight",
    "model.layers.1.self_attn.kv_proj.weight": "layers.1.attn.wkv.weight",
    "model.layers.1.self_attn.kv_norm.weight": "layers.1.attn.kv_norm.weight",
    "model.layers.1.self_attn.o_a_proj.weight": "layers.1.attn.wo_a.weight",
    "model.layers.1.self_attn.o_b_proj.weight": "layers.1.attn.wo_b.weight",
    "model.layers.1.self_attn.compressor.kv_proj.weight": "layers.1.attn.compressor.wkv.weight",
    "model.layers.1.self_attn.compressor.gate_proj.weight": "layers.1.attn.compressor.wgate.weight",
    "model.layers.1.self_attn.compressor.position_bias": "layers.1.attn.compressor.ape",
    "model.layers.1.self_attn.compressor.kv_norm.weight": "layers.1.attn.compressor.norm.weight",
    "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight": "layers.1.attn.indexer.wq_b.weight",
    "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight": "layers.1.attn.indexer.weights_proj.weight",
    "model.layers.1.self_attn.compressor.indexer.kv_proj.weight": "layers.1.attn.indexer.compressor.wkv.weight",
    "model.layers.1.self_attn.compressor.indexer.gate_proj.weight": "layers.1.attn.indexer.compressor.wgate.weight",
    "model.layers.1.self_attn.compressor.indexer.position_bias": "layers.1.attn.indexer.compressor.ape",
    "model.layers.1.self_attn.compressor.indexer.kv_norm.weight": "layers.1.attn.indexer.compressor.norm.weight",
    "model.layers.2.self_attn.compressor.position_bias": "layers.2.attn.compressor.ape",
    "model.layers.0.mlp.gate.tid2eid": "layers.0.ffn.gate.tid2eid",
    "model.layers.1.mlp.gate.weight": "layers.1.ffn.gate.weight",
    "model.layers.1.mlp.gate.e_score_correction_bias": "layers.1.ffn.gate.bias",
    "model.layers.1.mlp.shared_experts.gate_proj.weight": "layers.1.ffn.shared_experts.w1.weight",
    "model.layers.1.mlp.shared_experts.up_proj.weight": "layers.1.ffn.shared_experts.w3.weight",
    "model.layers.1.mlp.shared_experts.down_proj.weight": "layers.1.ffn.shared_experts.w2.weight",
}


def check_against_hf(got, sd):
    for hf_name, native in HF_PAIRS.items():
        assert torch.equal(got[native], sd[hf_name]), (hf_name, native)
    for L in range(3):
        gate_up, down = sd[f"model.layers.{L}.mlp.experts.gate_up_proj"], sd[f"model.layers.{L}.mlp.experts.down_proj"]
        for e in range(8):  # gate_up rows: gate (w1) first, then up (w3)
            assert torch.equal(got[f"layers.{L}.ffn.experts.{e}.w1.weight"], gate_up[e, :32])
            assert torch.equal(got[f"layers.{L}.ffn.experts.{e}.w3.weight"], gate_up[e, 32:])
            assert torch.equal(got[f"layers.{L}.ffn.experts.{e}.w2.weight"], down[e])
    assert sum(t.numel() for t in got.values()) == sum(t.numel() for t in sd.values())


def test_transformers_save_pretrained_checkpoint_loads_every_parameter_by_name(hf):
    _, sd, root = hf
    cfg, got = load_checkpoint(root / "native")
    assert cfg.compress_ratios == (0, 4, 128) and cfg.num_hash_layers == 1
    check_against_hf(got, sd)


def test_sharded_transformers_checkpoint_with_module_names_and_stacked_experts_loads_the_same(hf):
    _, sd, root = hf
    assert (root / "modules" / "model.safetensors.index.json").is_file()
    assert len(list((root / "modules").glob("*.safetensors"))) > 1
    _, got = load_checkpoint(root / "modules")
    check_against_hf(got, sd)


def test_our_save_of_a_transformers_checkpoint_loads_back_into_transformers_unchanged(hf, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, sd, root = hf
    cfg, got = load_checkpoint(root / "native")
    save_checkpoint(tmp_path / "ours", cfg, got)
    again, info = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, t in again.state_dict().items():
        assert torch.equal(t, sd[name]), name


# ---- errors -------------------------------------------------------------------------------------

def drop(name):
    return lambda raw: raw.pop(name)


def put(name, value):
    return lambda raw: raw.update({name: value})


ERRORS = {
    "missing_tensor": (drop("layers.3.attn.indexer.wq_b.weight"), ["missing", "layers.3.attn.indexer.wq_b.weight"]),
    "unexpected_tensor": (put("layers.0.attn.bogus.weight", torch.zeros(2)), ["unexpected", "layers.0.attn.bogus.weight"]),
    "unexpected_shape": (put("layers.2.attn.wq_a.weight", torch.zeros(32, 65)),
                         ["model.safetensors", "layers.2.attn.wq_a.weight", "expected [32, 64] got [32, 65]"]),
    "int_where_float": (put("embed.weight", torch.zeros(258, 64, dtype=torch.int32)), ["embed.weight", "I32"]),
    "float_tid2eid": (put("layers.0.ffn.gate.tid2eid", torch.zeros(258, 2)), ["layers.0.ffn.gate.tid2eid", "F32"]),
    "fp4_outside_experts": (put("layers.0.attn.wkv.weight", torch.zeros(128, 32, dtype=torch.int8)),
                            ["layers.0.attn.wkv.weight", "I8"]),
    "fp8_without_scale": (put("layers.0.attn.wo_b.weight", torch.zeros(64, 64).to(torch.float8_e4m3fn)),
                          ["layers.0.attn.wo_b.weight", "no .scale"]),
    "scale_on_float_weight": (put("layers.0.attn.wo_b.scale", torch.ones(1, 1)), ["layers.0.attn.wo_b.scale"]),
    "duplicate_under_hf_name": (put("model.embed_tokens.weight", torch.zeros(258, 64)),
                                ["duplicate", "model.embed_tokens.weight", "embed.weight"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_broken_tensor_raises_checkpoint_error_naming_the_tensor(saved, case):
    mutate, needles = ERRORS[case]
    rewrite(saved, mutate)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(saved)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_fp8_scale_of_wrong_shape_raises_checkpoint_error_naming_the_scale(tmp_path, tiny, tiny_tensors):
    save_checkpoint(tmp_path / "q", tiny.model_copy(update={"weight_format": "fp8"}), tiny_tensors)
    rewrite(tmp_path / "q", put("layers.1.attn.wq_b.scale", torch.ones(4, 4)))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wq_b\.scale.*expected \[4, 1\] got \[4, 4\]"):
        load_checkpoint(tmp_path / "q")


def test_fp4_expert_with_wrong_packed_shape_raises_checkpoint_error(tmp_path, tiny, tiny_tensors):
    save_checkpoint(tmp_path / "q", tiny.model_copy(update={"expert_format": "fp4"}), tiny_tensors)
    rewrite(tmp_path / "q", put("layers.1.ffn.experts.2.w2.weight", torch.zeros(64, 32, dtype=torch.int8)))
    with pytest.raises(CheckpointError, match=r"layers\.1\.ffn\.experts\.2\.w2\.weight.*expected \[64, 16\] got \[64, 32\]"):
        load_checkpoint(tmp_path / "q")


def test_missing_config_json_raises_checkpoint_error_naming_it(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_checkpoint(saved)


def test_invalid_config_json_raises_checkpoint_error_naming_the_file(saved):
    (saved / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="config.json.*unsupported architecture"):
        load_checkpoint(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_file_raises_checkpoint_error_naming_the_file(saved, damage):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1000] if damage == "truncate" else b"\x10\x00" + os.urandom(100))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_checkpoint(saved)


def test_index_referencing_a_missing_shard_raises_checkpoint_error_naming_shard_and_index(hf, tmp_path):
    _, _, root = hf
    shutil.copytree(root / "modules", tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "m" / gone).unlink()
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json references missing shard.*{gone}"):
        load_checkpoint(tmp_path / "m")


def test_directory_without_safetensors_raises_checkpoint_error(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_checkpoint(saved)


# ---- saving -------------------------------------------------------------------------------------

def test_save_rejects_incomplete_or_misshaped_tensors_before_writing(tmp_path, tiny, tiny_tensors):
    partial = dict(tiny_tensors)
    partial.pop("head.weight")
    with pytest.raises(CheckpointError, match="missing.*head.weight"):
        save_checkpoint(tmp_path / "a", tiny, partial)
    bad = dict(tiny_tensors, **{"norm.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"norm.weight: expected \[64\] got \[3\]"):
        save_checkpoint(tmp_path / "a", tiny, bad)
    assert list(tmp_path.iterdir()) == []


def test_save_into_existing_checkpoint_raises_and_leaves_it_untouched(saved, tiny, tiny_tensors):
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    other = {k: v + 1 if v.is_floating_point() else v for k, v in tiny_tensors.items()}
    with pytest.raises(FileExistsError):
        save_checkpoint(saved, tiny, other)
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir()] == ["ckpt"]  # no temporary directory left


def test_racing_saves_leave_exactly_one_complete_winner(tmp_path, tiny, tiny_tensors):
    versions = [{k: v + i if v.is_floating_point() else v for k, v in tiny_tensors.items()} for i in range(4)]
    barrier, results = threading.Barrier(4), [None] * 4

    def run(i):
        barrier.wait()
        try:
            save_checkpoint(tmp_path / "race", tiny, versions[i])
            results[i] = "won"
        except FileExistsError:
            results[i] = "lost"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("won") == 1 and results.count("lost") == 3
    _, got = load_checkpoint(tmp_path / "race")
    winner = versions[results.index("won")]
    assert all(torch.equal(got[k], winner[k]) for k in winner)
    assert [p.name for p in tmp_path.iterdir()] == ["race"]


def test_model_parameters_are_exactly_the_checkpoint_inventory():
    from model_configs import ALL
    from workers.model import V4Model

    for cfg in ALL:
        own = {k: tuple(v.shape) for k, v in V4Model(cfg).state_dict().items()}
        assert own == {k: s.shape for k, s in tensor_inventory(cfg).items()}
