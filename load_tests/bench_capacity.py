"""Cached-prefix tokens per GiB under each prefix-cache policy (design.md "Prefix reuse"):
arithmetic from workers.capacity, no model runs.

    python -m load_tests.bench_capacity [--preset flash-attn] [--config PATH ...] [--budget-gib 80]

One table per model: tokens per GiB and in the whole budget, for full_store, checkpoint every
N blocks (N = 16, 64) and recompute, each as a ratio to full_store (higher is better: more
prefix cached per byte; what it costs on a hit is time to first token, measured elsewhere).
"""

from __future__ import annotations

import argparse

from workers.capacity import GIB, budget_capacity, main_entry_bytes, state_bytes
from workers.config import ModelConfig, preset

INTERVALS = (16, 64)


def rows(cfg: ModelConfig, budget_bytes: int) -> list[tuple[str, float, float]]:
    """(policy, tokens per GiB, ratio to full_store) for full_store, checkpoint N..., recompute."""
    per_n = {n: budget_capacity(cfg, budget_bytes, checkpoint_interval=n) for n in INTERVALS}
    first = per_n[INTERVALS[0]]
    tok, ratio = first["prefix_tokens_per_gib"], first["prefix_tokens_per_gib_ratio_to_full_store"]
    out = [("full_store", tok["full_store"], ratio["full_store"])]
    for n, b in per_n.items():
        out.append((f"checkpoint N={n}", b["prefix_tokens_per_gib"]["checkpoint"],
                    b["prefix_tokens_per_gib_ratio_to_full_store"]["checkpoint"]))
    out.append(("recompute", tok["recompute"], ratio["recompute"]))
    return out


def report(cfg: ModelConfig, budget_gib: float) -> None:
    budget = round(budget_gib * GIB)
    info = state_bytes(cfg)
    L, main, per_token = len(cfg.compress_ratios), main_entry_bytes(cfg), info["bytes_per_token"]
    counts = ", ".join(f"{n} {k}" for k, n in info["layer_counts"].items() if n)
    print(f"{cfg.name}: {L} layers ({counts}); compressed state {per_token} B/token, "
          f"raw window keys {L} x {main} = {L * main} B/token")
    print(f"  {'policy':<16} {'tokens/GiB':>12} {f'tokens in {budget_gib:g} GiB':>18} {'x full_store':>12}")
    for policy, per_gib, ratio in rows(cfg, budget):
        print(f"  {policy:<16} {per_gib:>12,.0f} {per_gib * budget / GIB:>18,.0f} {ratio:>12.2f}")
    ceiling = (per_token + L * main) / per_token
    print("  arithmetic ceiling for recompute = (bytes_per_token + L*main_entry_bytes) / bytes_per_token"
          " (about 8x for Flash-like schedules)")
    print(f"    = ({per_token} + {L}*{main}) / {per_token} = {ceiling:.2f}x; checkpoint approaches it as N grows")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="flash-attn")
    ap.add_argument("--config", action="append", default=[], metavar="PATH", help="also a released config (repeatable)")
    ap.add_argument("--budget-gib", type=float, default=80.0)
    args = ap.parse_args(argv)
    cfgs = [preset(args.preset), *(ModelConfig.from_file(p) for p in args.config)]
    print(f"cached-prefix capacity, budget {args.budget_gib:g} GiB, blocks of 256 tokens, checkpoint = window tail "
          "of every layer + float32 CSA compressor overlap\n")
    for i, cfg in enumerate(cfgs):
        if i:
            print()
        report(cfg, args.budget_gib)


if __name__ == "__main__":
    main()
