"""Checkpoint directories: the released DeepSeek-V4 layout (v4-architecture.md §10) and what
transformers' `save_pretrained` writes for DeepseekV4ForCausalLM (5.23.0), read into one dict of
DeepSeek-native names -> dequantized tensors, checked against the model's inventory.

Loading reads only safetensors headers until every name, dtype and shape has been checked, then
reads tensors one at a time (memory-mapped), so a bad checkpoint fails fast with one message
naming the file and tensor instead of after gigabytes of reads.

On disk a weight `X.weight` may be stored
  * in any float dtype (F32 / BF16 / F16);
  * as F8_E4M3 with a sibling `X.scale` (one power-of-two multiplier per 128x128 block);
  * for routed experts also as I8 holding two FP4 codes per byte, with `X.scale` per 32 inputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import CSA, ConfigError, ModelConfig
from .quant import dequant_fp4_weight, dequant_fp8_weight, quant_fp4_weight, quant_fp8_weight

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "BF16", "F16")
SCALE_DTYPES = ("F8_E8M0", "F32", "BF16")
INT_DTYPES = ("I64", "I32")
_MAX_LISTED = 8  # names per error message; the count says how many more there are


class CheckpointError(ValueError):
    """A checkpoint we cannot load or write; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]  # logical (dequantized) shape
    kind: Literal["float", "int", "fp8", "expert"]


# ---- inventory ----------------------------------------------------------------------------------

def tensor_inventory(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every parameter of the model under its DeepSeek-native name (mtp.* excluded: not run)."""
    d, H, D, q = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    g, o, V, hc = cfg.o_groups, cfg.o_lora_rank, cfg.vocab_size, cfg.hc_mult
    E, I, DI = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.index_head_dim
    inv: dict[str, TensorSpec] = {}

    def add(name: str, kind: str, *shape: int) -> None:
        inv[name] = TensorSpec(tuple(shape), kind)  # type: ignore[arg-type]

    add("embed.weight", "float", V, d)
    add("head.weight", "float", V, d)
    add("norm.weight", "float", d)
    add("hc_head_fn", "float", hc, hc * d)
    add("hc_head_base", "float", hc)
    add("hc_head_scale", "float", 1)
    for L, m in enumerate(cfg.compress_ratios):
        p = f"layers.{L}."
        add(p + "attn_norm.weight", "float", d)
        add(p + "ffn_norm.weight", "float", d)
        for part in ("attn", "ffn"):
            add(p + f"hc_{part}_fn", "float", (2 + hc) * hc, hc * d)
            add(p + f"hc_{part}_base", "float", (2 + hc) * hc)
            add(p + f"hc_{part}_scale", "float", 3)
        a = p + "attn."
        add(a + "attn_sink", "float", H)
        add(a + "wq_a.weight", "fp8", q, d)
        add(a + "q_norm.weight", "float", q)
        add(a + "wq_b.weight", "fp8", H * D, q)
        add(a + "wkv.weight", "fp8", D, d)
        add(a + "kv_norm.weight", "float", D)
        add(a + "wo_a.weight", "fp8", g * o, H * D // g)
        add(a + "wo_b.weight", "fp8", d, g * o)
        if m:
            _add_compressor(add, a + "compressor.", m, D, d)
        if m == CSA:
            add(a + "indexer.wq_b.weight", "fp8", cfg.index_n_heads * DI, q)
            add(a + "indexer.weights_proj.weight", "float", cfg.index_n_heads, d)
            _add_compressor(add, a + "indexer.compressor.", CSA, DI, d)
        f = p + "ffn."
        add(f + "gate.weight", "float", E, d)
        if cfg.is_hash_layer(L):
            add(f + "gate.tid2eid", "int", V, cfg.num_experts_per_tok)
        else:
            add(f + "gate.bias", "float", E)
        for e in range(E):
            add(f + f"experts.{e}.w1.weight", "expert", I, d)
            add(f + f"experts.{e}.w3.weight", "expert", I, d)
            add(f + f"experts.{e}.w2.weight", "expert", d, I)
        S = I * cfg.n_shared_experts
        add(f + "shared_experts.w1.weight", "fp8", S, d)
        add(f + "shared_experts.w3.weight", "fp8", S, d)
        add(f + "shared_experts.w2.weight", "fp8", d, S)
    return inv


def _add_compressor(add, prefix: str, m: int, width: int, d: int) -> None:
    c = 2 if m == CSA else 1  # CSA windows overlap: two halves (A, B) per slot
    add(prefix + "wkv.weight", "float", c * width, d)
    add(prefix + "wgate.weight", "float", c * width, d)
    add(prefix + "ape", "float", m, c * width)
    add(prefix + "norm.weight", "float", width)


# ---- names ----------------------------------------------------------------------------------------

# transformers names -> native, the inverse of conversion_mapping.py["deepseek_v4"] (5.23.0), applied
# in order. save_pretrained writes mostly native names with a `model.` prefix; with
# save_original_format=False (or from state_dict()) it writes the module names.
_RENAMES = [(re.compile(a), b) for a, b in [
    (r"^model\.", ""),
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.sinks$", ".attn_sink"),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    # HF maps native `.norm.` -> `.kv_norm.`, so its inverse writes the attention's kv_norm as `attn.norm`.
    (r"^(layers\.\d+\.attn)\.norm\.", r"\1.kv_norm."),
    (r"\.position_bias$", ".ape"),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    # Stacked experts get weight/scale suffixes so they pair like any other quantized weight.
    (r"\.experts\.(gate_up_proj|down_proj)$", r".experts.\1.weight"),
    (r"\.experts\.(gate_up_proj|down_proj)_scale_inv$", r".experts.\1.scale"),
    (r"\.weight_scale_inv$", ".scale"),  # transformers' FP8 name for the (multiplier) scale
]]
_STACKED = re.compile(r"^(layers\.(\d+)\.ffn\.experts)\.(gate_up_proj|down_proj)\.weight$")


def native_name(name: str) -> str:
    """The DeepSeek-native name of a tensor saved under a native or a transformers name."""
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


# ---- loading --------------------------------------------------------------------------------------

@dataclass
class _Disk:
    """One tensor as stored: where, under which name, and its header dtype/shape."""
    file: Path
    key: str
    dtype: str
    shape: list[int]

    def where(self) -> str:
        return f"{self.file.name}: tensor '{self.key}'"


@dataclass
class _Unit:
    """A stored weight (+ scale) and the native tensors it yields: one, or 2E / E for stacked experts."""
    weight: _Disk
    scale: _Disk | None
    logical: tuple[int, ...]  # expected dequantized shape
    kind: str
    targets: list[tuple[str, tuple]]  # (native name, index into the dequantized tensor)


def load_checkpoint(path: str | Path, cfg: ModelConfig | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint directory into native names -> tensors (floats in `dtype`, tid2eid int64)."""
    path = Path(path)
    cfg = cfg if cfg is not None else _read_config(path)
    inventory = tensor_inventory(cfg)
    with ExitStack() as stack:
        handles = {f: stack.enter_context(_open(f)) for f in _shard_files(path)}
        units = _plan(path, handles, inventory, cfg)
        out: dict[str, torch.Tensor] = {}
        for u in units:
            w = _decode(u, handles)
            for name, idx in u.targets:
                t = w[idx] if idx else w
                t = t.long() if u.kind == "int" else t.to(dtype)
                # Splits of a stacked tensor are cloned so each result owns its storage.
                out[name] = t.clone() if idx else t
    return cfg, {name: out[name] for name in inventory}


def _read_config(path: Path) -> ModelConfig:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: missing config.json")
    try:
        return ModelConfig.from_file(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None


def _shard_files(path: Path) -> list[Path]:
    """The shards an index names (each must exist), else every *.safetensors in the directory."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} references missing shard file(s): {_listing(missing)}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return files


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers / sizes
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def _plan(path: Path, handles: dict, inventory: dict[str, TensorSpec], cfg: ModelConfig) -> list[_Unit]:
    """Check every header against the inventory; return what to read. One kind of problem per error."""
    found: dict[str, _Disk] = {}  # native name -> stored tensor (weights and scales alike)
    duplicates, unexpected = [], []
    for file, h in handles.items():
        for key in h.keys():
            name = native_name(key)
            if name.startswith("mtp."):
                continue  # the multi-token-prediction block: we do not run it
            sl = h.get_slice(key)
            disk = _Disk(file, key, sl.get_dtype(), list(sl.get_shape()))
            if name in found:
                duplicates.append(f"{disk.where()} and {found[name].where()} are both '{name}'")
            found[name] = disk
    if duplicates:
        raise CheckpointError(f"{path}: duplicate tensors: {_listing(duplicates)}")

    units, provided = [], set()
    for name, disk in found.items():
        if name.endswith(".scale") and name.removesuffix("scale") + "weight" in found:
            continue  # paired with its weight below
        stacked = _STACKED.match(name)
        if name in inventory:
            spec = inventory[name]
            units.append(_Unit(disk, _scale_of(name, found), spec.shape, spec.kind, [(name, ())]))
        elif stacked and int(stacked[2]) < cfg.num_hidden_layers:
            units.append(_stacked_unit(stacked, disk, found, cfg))
        else:
            unexpected.append(f"{disk.where()} ('{name}')" if name != disk.key else disk.where())
            continue
        for target, _ in units[-1].targets:
            if target in provided:
                duplicates.append(f"{disk.where()} provides '{target}' again")
            provided.add(target)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) not in the model: {_listing(unexpected)}")
    if duplicates:
        raise CheckpointError(f"{path}: duplicate tensors: {_listing(duplicates)}")
    missing = [n for n in inventory if n not in provided]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s): {_listing(missing)}")
    for check in (_check_dtype, _check_scale_present, _check_shape):
        problems = [p for u in units if (p := check(u))]
        if problems:
            raise CheckpointError(f"{path}: {_listing(problems)}")
    return units


def _scale_of(name: str, found: dict[str, _Disk]) -> _Disk | None:
    """The stored `X.scale` of weight `X.weight`, if any (other names never have one)."""
    return found.get(name.removesuffix("weight") + "scale") if name.endswith(".weight") else None


def _stacked_unit(m: re.Match, disk: _Disk, found: dict[str, _Disk], cfg: ModelConfig) -> _Unit:
    """transformers' stacked experts: gate_up_proj [E, 2I, d] (w1 rows, then w3 rows), down_proj [E, d, I]."""
    prefix, E, I, d = m[1], cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    scale = _scale_of(m[0], found)
    if m[3] == "gate_up_proj":
        targets = [t for e in range(E) for t in ((f"{prefix}.{e}.w1.weight", (e, slice(0, I))),
                                                 (f"{prefix}.{e}.w3.weight", (e, slice(I, 2 * I))))]
        return _Unit(disk, scale, (E, 2 * I, d), "expert", targets)
    return _Unit(disk, scale, (E, d, I), "expert", [(f"{prefix}.{e}.w2.weight", (e,)) for e in range(E)])


def _check_scale_present(u: _Unit) -> str | None:
    quantized = u.weight.dtype in ("F8_E4M3", "I8")
    if quantized and u.scale is None:
        return f"{u.weight.where()} is {u.weight.dtype} but has no .scale tensor"
    if u.scale is not None and not quantized:
        return f"{u.scale.where()} is a scale for a {u.weight.dtype} (unquantized) weight"
    return None


def _check_dtype(u: _Unit) -> str | None:
    dt, rank = u.weight.dtype, len(u.logical)
    if u.kind == "int":
        allowed = INT_DTYPES
    else:
        # FP8 block scales are defined for matrices only; packed FP4 for routed experts only.
        allowed = FLOAT_DTYPES + ("F8_E4M3",) * (rank >= 2) + ("I8",) * (u.kind == "expert")
    if dt not in allowed:
        return f"{u.weight.where()} has dtype {dt}; expected one of {'/'.join(allowed)}"
    if u.scale is not None and u.scale.dtype not in SCALE_DTYPES:
        return f"{u.scale.where()} has dtype {u.scale.dtype}; expected one of {'/'.join(SCALE_DTYPES)}"
    return None


def _check_shape(u: _Unit) -> str | None:
    want, want_scale = list(u.logical), None
    if u.weight.dtype in ("F8_E4M3", "I8"):  # matrices only (_check_dtype)
        *lead, out, inn = u.logical
        if u.weight.dtype == "F8_E4M3":
            want_scale = [*lead, -(-out // 128), -(-inn // 128)]
        else:
            want, want_scale = [*lead, out, inn // 2], [*lead, out, inn // 32]
    if u.weight.shape != want:
        return f"{u.weight.where()}: wrong shape, expected {want} got {u.weight.shape}"
    if want_scale is not None and u.scale.shape != want_scale:
        return f"{u.scale.where()}: wrong shape, expected {want_scale} got {u.scale.shape}"
    return None


def _decode(u: _Unit, handles: dict) -> torch.Tensor:
    """The stored tensor in logical form: dequantized to float32 if it was FP8 / FP4."""
    try:
        w = handles[u.weight.file].get_tensor(u.weight.key)
        if u.scale is None:
            return w
        scale = handles[u.scale.file].get_tensor(u.scale.key)
        return dequant_fp8_weight(w, scale) if u.weight.dtype == "F8_E4M3" else dequant_fp4_weight(w, scale)
    except Exception as e:  # unreadable data or a format the headers did not reveal
        raise CheckpointError(f"{u.weight.where()}: cannot decode ({e})") from None


def _listing(items: list[str]) -> str:
    more = len(items) - _MAX_LISTED
    return "; ".join(items[:_MAX_LISTED]) + (f"; ... and {more} more" if more > 0 else "")


# ---- saving ---------------------------------------------------------------------------------------

def save_checkpoint(path: str | Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                    tokenizer_json: str | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Write a checkpoint directory that load_checkpoint (and transformers) can read.

    `tensors` are logical native-named tensors (the inventory, exactly). Weights are stored as
    cfg declares: FP8 + scale for fp8-kind tensors when cfg.weight_format == "fp8", routed experts
    packed FP4 / FP8 + scale per cfg.expert_format; other floats in `dtype`, ints as int64.

    The directory appears atomically: everything is written into a temporary sibling that is then
    renamed. If `path` already exists (e.g. another process won a race to create it), the
    temporary directory is removed, `path` is left untouched, and FileExistsError is raised.
    """
    path = Path(path)
    _check_tensors(cfg, tensors)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path}: checkpoint directory already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the checkpoint is meant to be shared
        (tmp / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2))
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
        save_file(_encode_all(cfg, tensors, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in tmp.iterdir():  # data on disk before the rename makes the directory visible
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        try:
            os.rename(tmp, path)  # atomic; fails on a non-empty target, so a winner is never replaced
        except OSError as e:
            raise FileExistsError(f"{path}: checkpoint directory already exists (lost a race: {e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    inventory = tensor_inventory(cfg)
    unexpected = [n for n in tensors if n not in inventory]
    missing = [n for n in inventory if n not in tensors]
    wrong = [f"{n}: expected {list(s.shape)} got {list(tensors[n].shape)}"
             for n, s in inventory.items() if n in tensors and tuple(tensors[n].shape) != s.shape]
    for what, items in (("unexpected tensor(s)", unexpected), ("missing tensor(s)", missing), ("bad shapes", wrong)):
        if items:
            raise CheckpointError(f"cannot save: {what}: {_listing(items)}")


def _encode_all(cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    inventory, out = tensor_inventory(cfg), {}
    for name, t in tensors.items():
        kind, t = inventory[name].kind, t.detach().cpu()
        fmt = cfg.expert_format if kind == "expert" else cfg.weight_format if kind == "fp8" else None
        if fmt in ("fp8", "fp4"):
            w, s = (quant_fp8_weight if fmt == "fp8" else quant_fp4_weight)(t)
            out[name], out[name.removesuffix("weight") + "scale"] = w.contiguous(), s.contiguous()
        else:
            out[name] = (t.long() if kind == "int" else t.to(dtype)).contiguous()
    return out
