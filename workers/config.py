"""Model configuration: one pydantic model, read from a released `config.json` (DeepSeek-native
legacy keys or the transformers keys), validated once, shared by every component.

Layer kinds are fixed by the architecture: 0 = sliding-window only, 4 = CSA, 128 = HCA. Our
256-token cache blocks are built on those two rates, so any other rate is rejected here rather
than producing a model whose cache layout silently does not fit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kernels.geometry import CSA, HCA, SWA

KNOWN_RATIOS = (SWA, CSA, HCA)
LAYER_KIND_NAMES = {SWA: "sliding_attention", CSA: "compressed_sparse_attention", HCA: "heavily_compressed_attention"}
_KIND_BY_NAME = {v: k for k, v in LAYER_KIND_NAMES.items()}


class ConfigError(ValueError):
    """A model configuration we cannot serve; the message names the offending key and value."""


class YarnScaling(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


class ModelConfig(BaseModel):
    """Hyper-parameters of a DeepSeek-V4-class model (names follow the released config.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "custom"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = Field(gt=0)
    o_groups: int = Field(gt=0)
    o_lora_rank: int = Field(gt=0)
    sliding_window: int = 128
    compress_ratios: tuple[int, ...]
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: YarnScaling | None = YarnScaling()
    max_position_embeddings: int = 1_048_576
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    n_routed_experts: int = Field(gt=0)
    num_experts_per_tok: int = Field(gt=0)
    n_shared_experts: int = 1
    moe_intermediate_size: int = Field(gt=0)
    num_hash_layers: int = 3
    scoring_func: Literal["sqrtsoftplus"] = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_id: int = 1
    num_nextn_predict_layers: int = 0
    # Checkpoint storage (what the loader expects), not compute precision.
    weight_format: Literal["fp8", "bf16", "f32"] = "bf16"
    expert_format: Literal["fp4", "fp8", "bf16", "f32"] = "bf16"

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        n = self.num_hidden_layers
        if len(self.compress_ratios) != n:
            raise ValueError(f"compress_ratios has {len(self.compress_ratios)} entries; num_hidden_layers is {n}")
        bad = sorted({r for r in self.compress_ratios if r not in KNOWN_RATIOS})
        if bad:
            raise ValueError(f"unknown compress ratio(s) {bad}; supported: 0 (SWA), 4 (CSA), 128 (HCA)")
        if self.qk_rope_head_dim % 2 or not 0 < self.qk_rope_head_dim < self.head_dim:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and below head_dim={self.head_dim}")
        if (self.head_dim - self.qk_rope_head_dim) % 64:
            raise ValueError("head_dim - qk_rope_head_dim must be a multiple of 64 (FP8 scale blocks)")
        if self.index_head_dim < self.qk_rope_head_dim or self.index_head_dim % 32:
            raise ValueError(f"index_head_dim={self.index_head_dim} must be >= the RoPE dims and a multiple of 32")
        if self.index_head_dim & (self.index_head_dim - 1):
            raise ValueError(f"index_head_dim={self.index_head_dim} must be a power of two (Hadamard rotation)")
        if self.num_attention_heads % self.o_groups:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by o_groups={self.o_groups}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok exceeds n_routed_experts")
        if not 0 <= self.num_hash_layers <= n:
            raise ValueError(f"num_hash_layers={self.num_hash_layers} outside [0, {n}]")
        if self.sliding_window < 2:
            raise ValueError("sliding_window must be at least 2")
        return self

    # ---- derived facts -------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def layer_kinds(self) -> list[str]:
        return [LAYER_KIND_NAMES[r] for r in self.compress_ratios]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    def to_json_dict(self) -> dict[str, Any]:
        """The config.json we write: released key names, loadable by this class and by transformers."""
        d = self.model_dump(exclude={"yarn", "name", "weight_format", "expert_format"})
        d["compress_ratios"] = list(self.compress_ratios)
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        d["model_type"] = "deepseek_v4"
        d["num_key_value_heads"] = 1
        d["v4serve_name"] = self.name
        if self.yarn is not None:
            d["rope_scaling"] = {"type": "yarn", **self.yarn.model_dump()}
        if self.weight_format == "fp8":
            d["quantization_config"] = {
                "quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                "weight_block_size": [128, 128], "activation_scheme": "dynamic",
            }
        if self.expert_format in ("fp4", "fp8"):
            d["expert_dtype"] = self.expert_format
        return d

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any], name: str | None = None) -> "ModelConfig":
        return parse_config(raw, name=name)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a binary file fails before JSON parsing
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        return parse_config(raw, name=path.parent.name)


# Keys that only V4.1-style (different architecture) configs carry.
_FOREIGN_ARCH_KEYS = ("kv_source_layer_ids", "engram_config", "engram_layer_ids", "vision_config")


def parse_config(raw: dict[str, Any], name: str | None = None) -> ModelConfig:
    """Normalise a released / transformers / v4serve config.json into a ModelConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures") or []
    foreign = [k for k in _FOREIGN_ARCH_KEYS if k in raw]
    if foreign or any(a not in ("DeepseekV4ForCausalLM",) for a in archs) or raw.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise ConfigError(
            f"unsupported architecture (architectures={archs}, model_type={raw.get('model_type')!r}"
            + (f", V4.1-only keys {foreign}" if foreign else "")
            + "); v4serve serves DeepSeek-V4 (DeepseekV4ForCausalLM) only"
        )
    d = dict(raw)
    out: dict[str, Any] = {"name": name or d.get("v4serve_name") or "custom"}
    n_layers = d.get("num_hidden_layers")
    if not isinstance(n_layers, int) or n_layers <= 0:
        raise ConfigError(f"num_hidden_layers must be a positive integer, got {n_layers!r}")
    n_mtp = _typed(d, "num_nextn_predict_layers", int, 0)

    # --- layer schedule: transformers `layer_types` or legacy `compress_ratios` -------------
    rates = d.get("compress_rates")
    if rates is not None:
        expect = {"compressed_sparse_attention": CSA, "heavily_compressed_attention": HCA}
        if not isinstance(rates, dict) or any(rates.get(k, v) != v for k, v in expect.items()):
            raise ConfigError(f"unknown compress ratio(s) in compress_rates={rates}; supported: CSA 4, HCA 128")
    if d.get("layer_types") is not None:
        kinds = _typed(d, "layer_types", list)
        unknown = sorted({repr(k) for k in kinds if not isinstance(k, str) or k not in _KIND_BY_NAME})
        if unknown:
            raise ConfigError(f"unknown layer type(s) [{', '.join(unknown)}] in layer_types")
        ratios = [_KIND_BY_NAME[k] for k in kinds]
        if len(ratios) != n_layers:
            raise ConfigError(f"layer_types has {len(ratios)} entries; num_hidden_layers is {n_layers}")
    elif d.get("compress_ratios") is not None:
        ratios = _typed(d, "compress_ratios", list)
        # repr: entries may be unhashable JSON (lists, objects); `type is int` rejects booleans.
        bad = sorted({repr(r) for r in ratios if type(r) is not int or r not in KNOWN_RATIOS})
        if bad:
            raise ConfigError(f"unknown compress ratio(s) [{', '.join(bad)}] in compress_ratios; supported: 0, 4, 128")
        extra = ratios[n_layers:]
        # Trailing entries describe MTP / DSpark stages (all SWA-only); we do not run them.
        allowed_extra = len(extra) == n_mtp or any(k.startswith("dspark") for k in d)
        if len(ratios) < n_layers or (extra and (not allowed_extra or any(extra))):
            raise ConfigError(
                f"compress_ratios has {len(ratios)} entries; expected {n_layers} layers"
                + (f" (+ {n_mtp} MTP entries of 0)" if n_mtp else "")
            )
        ratios = ratios[:n_layers]
    else:
        raise ConfigError("config has neither compress_ratios nor layer_types: not a DeepSeek-V4 config")
    out["compress_ratios"] = tuple(ratios)

    # --- hash-MoE layers --------------------------------------------------------------------
    if d.get("mlp_layer_types") is not None:
        mlp = _typed(d, "mlp_layer_types", list)[:n_layers]
        n_hash = sum(1 for t in mlp if t == "hash_moe")
        if mlp != ["hash_moe"] * n_hash + ["moe"] * (n_layers - n_hash):
            raise ConfigError(f"mlp_layer_types must be hash_moe layers followed by moe layers, got {mlp}")
        out["num_hash_layers"] = n_hash
    elif "num_hash_layers" in d:
        out["num_hash_layers"] = d["num_hash_layers"]

    # --- RoPE -------------------------------------------------------------------------------
    head_dim = d.get("head_dim", 512)
    if "qk_rope_head_dim" in d:
        out["qk_rope_head_dim"] = d["qk_rope_head_dim"]
    elif d.get("partial_rotary_factor") is not None:
        try:
            out["qk_rope_head_dim"] = int(round(head_dim * d["partial_rotary_factor"]))
        except TypeError:  # a non-numeric factor or head_dim
            raise ConfigError(f"partial_rotary_factor={d['partial_rotary_factor']!r} with head_dim={head_dim!r} "
                              "does not give a number of RoPE dims") from None
    rp = _typed(d, "rope_parameters", dict, {})
    if "main" in rp:
        main = _typed(rp, "main", dict, {}, "rope_parameters.main")
        out["rope_theta"] = main.get("rope_theta", d.get("rope_theta", 10000.0))
        comp = _typed(rp, "compress", dict, {}, "rope_parameters.compress")
        out["compress_rope_theta"] = comp.get("rope_theta", d.get("compress_rope_theta", 160000.0))
        out["yarn"] = _yarn_from(comp)
    else:
        if "rope_theta" in d:
            out["rope_theta"] = d["rope_theta"]
        if "compress_rope_theta" in d:
            out["compress_rope_theta"] = d["compress_rope_theta"]
        out["yarn"] = _yarn_from(_typed(d, "rope_scaling", dict, {}) or rp)

    # --- checkpoint formats -----------------------------------------------------------------
    q = _typed(d, "quantization_config", dict, {})
    if q:
        if q.get("quant_method") != "fp8" or q.get("weight_block_size", [128, 128]) != [128, 128]:
            raise ConfigError(f"unsupported quantization_config {q}; expected fp8 with 128x128 blocks")
        out["weight_format"] = "fp8"
        out["expert_format"] = q.get("expert_dtype") or d.get("expert_dtype") or "fp8"
    else:
        out["expert_format"] = d.get("expert_dtype") or "bf16"
        out["weight_format"] = "bf16"
    if out["expert_format"] not in ("fp4", "fp8", "bf16", "f32"):
        raise ConfigError(f"unsupported expert_dtype {out['expert_format']!r}")

    eos = d.get("eos_token_id", 1)
    if isinstance(eos, list) and eos:  # an empty list is left for the field validation to reject
        eos = eos[0]
    out["eos_token_id"] = eos
    if d.get("bos_token_id") is not None:
        out["bos_token_id"] = d["bos_token_id"]
    if d.get("num_key_value_heads", 1) != 1:
        raise ConfigError(f"num_key_value_heads={d['num_key_value_heads']}; V4 has one shared K=V head")
    if d.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
        raise ConfigError(f"unsupported scoring_func {d['scoring_func']!r}; V4 routes with sqrtsoftplus")

    handled = {
        "layer_types", "compress_rates", "compress_ratios", "mlp_layer_types", "num_hash_layers",
        "qk_rope_head_dim", "partial_rotary_factor", "rope_parameters", "rope_scaling", "rope_theta",
        "compress_rope_theta", "quantization_config", "expert_dtype", "eos_token_id", "bos_token_id",
        "num_key_value_heads", "scoring_func",
    }
    # Everything else: keys named like our fields are taken as they are; unknown keys are ignored.
    out.update({k: d[k] for k in set(ModelConfig.model_fields) - handled - out.keys() if k in d})
    try:
        return ModelConfig(**out)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "config"
        raise ConfigError(f"invalid model config ({where}): {first['msg']}") from None


def _typed(d: dict[str, Any], key: str, kind: type, default: Any = None, label: str | None = None) -> Any:
    """d[key] checked to be a JSON array/object/integer, so malformed input ends as one ConfigError."""
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, kind) or isinstance(v, bool):
        names = {list: "a list", dict: "an object", int: "an integer"}
        raise ConfigError(f"{label or key} must be {names[kind]}, got {v!r:.80}")
    return v


def _yarn_from(rs: dict[str, Any]) -> dict[str, Any] | None:
    """YarnScaling fields; validated with the rest of ModelConfig so bad values give a ConfigError."""
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"unsupported rope scaling type {kind!r}; V4 uses yarn on CSA/HCA layers")
    return dict(
        factor=rs.get("factor", 16.0),
        original_max_position_embeddings=rs.get("original_max_position_embeddings", 65536),
        beta_fast=rs.get("beta_fast") or 32.0,
        beta_slow=rs.get("beta_slow") or 1.0,
    )


# ---- presets ------------------------------------------------------------------------------

def _tiny(**over: Any) -> ModelConfig:
    base = dict(
        name="tiny", vocab_size=258, hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
        head_dim=128, qk_rope_head_dim=64, q_lora_rank=32, o_groups=2, o_lora_rank=32,
        sliding_window=128, compress_ratios=(SWA, CSA, HCA, CSA, HCA), index_n_heads=16,
        index_head_dim=64, index_topk=16, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, num_hash_layers=2, max_position_embeddings=1_048_576,
    )
    base.update(over)
    return ModelConfig(**base)


PRESETS: dict[str, Any] = {
    # The embedded default: real window (128) and rates (4, 128), tiny widths, every layer kind,
    # hash- and routed-MoE layers.
    "tiny": _tiny,
    # Real V4-Flash attention shapes, few layers and a small MoE: for GPU kernel benchmarks.
    "flash-attn": lambda: ModelConfig(
        name="flash-attn", vocab_size=129280, hidden_size=4096, num_hidden_layers=4, num_attention_heads=64,
        head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
        compress_ratios=(SWA, CSA, HCA, CSA), index_n_heads=64, index_head_dim=128, index_topk=512,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, num_hash_layers=1,
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


def yarn_inv_freq_params(cfg: ModelConfig) -> tuple[float, float]:
    """The YaRN correction range (low, high) in rotary-pair units, as the reference computes it."""
    assert cfg.yarn is not None
    dim, base = cfg.qk_rope_head_dim, cfg.compress_rope_theta

    def corr(rot: float) -> float:
        return dim * math.log(cfg.yarn.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr(cfg.yarn.beta_fast)), 0)
    high = min(math.ceil(corr(cfg.yarn.beta_slow)), dim - 1)
    return low, high
