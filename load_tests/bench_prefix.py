"""Time to first token of a prefix-cache hit under each window policy, against a cold prefill.

    python -m load_tests.bench_prefix [--preset tiny] [--lengths 4096,16384,65536] [--device cpu]

For each prefix length: a cold request (empty cache), then a request with a different suffix to
fill the cache, then the measured hit (same prefix, a third suffix). Engine in its product
configuration: compact cache layout, reference rounding. Prints TTFT, hit and recomputed tokens,
the bytes the policy keeps beyond the compressed entries, and the speed-up over cold.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from workers.config import preset
from workers.engine import Engine, EngineConfig
from workers.init import random_weights
from workers.model import V4Model
from workers.sampling import SamplingParams

SUFFIX = 64
ONE = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def ttft(eng: Engine, prompt: list[int]) -> float:
    t = time.perf_counter()
    rid = eng.add_request(prompt, ONE)
    while eng.seqs[rid].finish_reason is None:
        eng.step()
    if eng.pools.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run(preset_name: str, lengths: list[int], device: str, budget_gib: float, interval: int) -> list[dict]:
    cfg = preset(preset_name)
    model = V4Model(cfg, dtype=torch.float32 if device == "cpu" else torch.bfloat16, rounding=True)
    model.load_weights(random_weights(cfg, 0)).to(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in lengths:
        prefix = torch.randint(2, cfg.vocab_size, (n,), generator=gen).tolist()
        suffixes = [torch.randint(2, cfg.vocab_size, (SUFFIX,), generator=gen).tolist() for _ in range(3)]
        conf = dict(budget_bytes=int(budget_gib * 2**30), layout="compact", max_requests=2,
                    prefill_chunk=2048, max_batch_tokens=2048, checkpoint_interval=interval)
        cold = ttft(Engine(model, EngineConfig(policy="recompute", prefix_cache=False, **conf)), prefix + suffixes[0])
        for policy in ("full_store", "checkpoint", "recompute"):
            eng = Engine(model, EngineConfig(policy=policy, **conf))
            ttft(eng, prefix + suffixes[1])
            before = (eng.cache.stats.hit_tokens, eng.cache.stats.recomputed_tokens)
            hit = ttft(eng, prefix + suffixes[2])
            held = eng.cache.held_bytes()
            rows.append({
                "prefix": n, "policy": policy, "cold_ttft_s": cold, "hit_ttft_s": hit, "speedup": cold / hit,
                "hit_tokens": eng.cache.stats.hit_tokens - before[0],
                "recomputed_tokens": eng.cache.stats.recomputed_tokens - before[1],
                "kept_beyond_entries_bytes": held["window_bytes"] + held["overlap_bytes"],
                "entry_bytes": held["entry_bytes"],
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget-gib", type=float, default=2.0)
    ap.add_argument("--checkpoint-interval", type=int, default=16)
    a = ap.parse_args()
    rows = run(a.preset, [int(x) for x in a.lengths.split(",")], a.device, a.budget_gib, a.checkpoint_interval)
    print(f"\n{'prefix':>7} {'policy':>11} {'cold s':>8} {'hit s':>8} {'x cold':>7} {'hit tok':>8} {'recomp':>7} {'kept MiB':>9}")
    for r in rows:
        print(f"{r['prefix']:>7} {r['policy']:>11} {r['cold_ttft_s']:8.3f} {r['hit_ttft_s']:8.3f} {r['speedup']:7.1f} "
              f"{r['hit_tokens']:>8} {r['recomputed_tokens']:>7} {r['kept_beyond_entries_bytes'] / 2**20:9.2f}")


if __name__ == "__main__":
    main()
