"""Resolve `--model` (a preset name or a checkpoint directory) to a ready model and tokenizer.

The tiny preset is written once as an ordinary checkpoint directory (config.json, safetensors,
tokenizer.json) from deterministic random weights and then read back through the same loader as
any real checkpoint, so the default path exercises the real loading code. Larger presets (for
GPU benchmarks) are built in memory: writing gigabytes of random weights to disk buys nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, ModelConfig, preset
from .init import random_weights
from .model import V4Model
from .tokenizer import Tokenizer, build_byte_tokenizer

DISK_PRESETS = ("tiny",)
INIT_SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("V4SERVE_CACHE", Path.home() / ".cache" / "v4serve"))


def preset_checkpoint(name: str) -> Path:
    """The checkpoint directory of a disk preset, created on first use."""
    cfg = preset(name)
    digest = hashlib.sha256(json.dumps(cfg.to_json_dict(), sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "models" / f"{name}-{digest}-seed{INIT_SEED}"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_checkpoint(path, cfg, random_weights(cfg, INIT_SEED),
                            tokenizer_json=build_byte_tokenizer().to_str())
        except FileExistsError:
            pass  # another process wrote it first; theirs is identical
    return path


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               rounding: bool = False) -> tuple[V4Model, Tokenizer]:
    """`spec`: a preset name (see workers.config.PRESETS) or a checkpoint directory."""
    path = Path(spec)
    if spec in PRESETS and not path.is_dir():
        if spec not in DISK_PRESETS:
            cfg = preset(spec)
            model = _build(cfg, random_weights(cfg, INIT_SEED), dtype, device, rounding)
            return model, Tokenizer(build_byte_tokenizer(), cfg)
        path = preset_checkpoint(spec)
    elif not path.is_dir():
        raise FileNotFoundError(f"--model {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")
    cfg, weights = load_checkpoint(path, dtype=torch.float32)
    return _build(cfg, weights, dtype, device, rounding), Tokenizer.from_dir(path, cfg)


def _build(cfg: ModelConfig, weights, dtype, device, rounding) -> V4Model:
    model = V4Model(cfg, dtype=dtype, rounding=rounding).load_weights(weights)
    return model.to(device)


def load_tokenizer(spec: str) -> tuple[ModelConfig, Tokenizer]:
    """The config and tokenizer of `spec` without loading any weights (for front ends)."""
    path = Path(spec)
    if spec in PRESETS and not path.is_dir():
        cfg = preset(spec)
        return cfg, Tokenizer(build_byte_tokenizer(), cfg)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")
    cfg = ModelConfig.from_file(path)
    return cfg, Tokenizer.from_dir(path, cfg)
