"""Prefill and decode tokens/s of our model against transformers' DeepseekV4ForCausalLM, same
config, same weights, same process (CPU, float32 unless --dtype says otherwise).

    python -m load_tests.bench_model [--preset tiny] [--prompt 1024] [--decode 64] [--repeat 3]

Prints one table; ratios are ours / transformers (higher is better for us).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from workers.config import preset
from workers.init import random_weights
from workers.model import V4Model

from .transformers_peer import hf_model_from


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench(preset_name: str, prompt_len: int, decode: int, repeat: int, chunk: int) -> dict:
    cfg = preset(preset_name)
    weights = random_weights(cfg, seed=0)
    ours = V4Model(cfg).load_weights(weights)
    with tempfile.TemporaryDirectory() as d:
        theirs = hf_model_from(cfg, weights, d)
    ids = torch.randint(2, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    def ours_prefill():
        st = ours.new_state()
        for i in range(0, prompt_len, chunk):
            ours([(st, ids[i : i + chunk])])
        return st

    def ours_decode():
        st = ours_prefill()
        t = time.perf_counter()
        tok = 5
        for _ in range(decode):
            tok = int(ours([(st, [tok])])[0].argmax())
        return time.perf_counter() - t

    @torch.no_grad()
    def hf_prefill():
        return theirs(torch.tensor([ids]), use_cache=True)

    @torch.no_grad()
    def hf_decode():
        out = hf_prefill()
        cache, tok = out.past_key_values, 5
        t = time.perf_counter()
        for _ in range(decode):
            out = theirs(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        return time.perf_counter() - t

    res = {
        "preset": preset_name, "prompt_tokens": prompt_len, "decode_tokens": decode, "chunk": chunk,
        "threads": torch.get_num_threads(),
        "ours_prefill_tok_s": prompt_len / _best(ours_prefill, repeat),
        "hf_prefill_tok_s": prompt_len / _best(hf_prefill, repeat),
        "ours_decode_tok_s": decode / min(ours_decode() for _ in range(repeat)),
        "hf_decode_tok_s": decode / min(hf_decode() for _ in range(repeat)),
    }
    res["prefill_ratio"] = res["ours_prefill_tok_s"] / res["hf_prefill_tok_s"]
    res["decode_ratio"] = res["ours_decode_tok_s"] / res["hf_decode_tok_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=1024, help="our prefill chunk size")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = bench(a.preset, a.prompt, a.decode, a.repeat, a.chunk)
    if a.json:
        print(json.dumps(r))
        return
    print(f"{r['preset']} on CPU ({r['threads']} threads), prompt {r['prompt_tokens']}, decode {r['decode_tokens']}")
    print(f"{'':10}{'ours tok/s':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'prefill':10}{r['ours_prefill_tok_s']:12.1f}{r['hf_prefill_tok_s']:14.1f}{r['prefill_ratio']:8.2f}")
    print(f"{'decode':10}{r['ours_decode_tok_s']:12.1f}{r['hf_decode_tok_s']:14.1f}{r['decode_ratio']:8.2f}")


if __name__ == "__main__":
    main()
