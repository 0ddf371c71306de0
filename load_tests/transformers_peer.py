"""The peer implementation: transformers' DeepseekV4ForCausalLM built from our config and weights.

Used as the correctness oracle by the tests and as the baseline by the benchmarks.

The weights go through transformers' own checkpoint conversion (native names -> its module
names), so the name mapping is theirs, not ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def hf_model_from(cfg, weights: dict[str, torch.Tensor], tmpdir: Path):
    from transformers import DeepseekV4ForCausalLM

    tmpdir = Path(tmpdir)
    (tmpdir / "config.json").write_text(json.dumps(cfg.to_json_dict()))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmpdir / "model.safetensors"))
    model = DeepseekV4ForCausalLM.from_pretrained(str(tmpdir), dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]), use_cache=False).logits[0].float()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()
