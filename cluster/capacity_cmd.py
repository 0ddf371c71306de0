"""`v4serve capacity`: how many bytes of state a request costs, per token and fixed, and with
--budget-gib what fits in that much memory (formulas in the workers.capacity docstring)."""

from __future__ import annotations

import argparse
import json
import sys

from workers.capacity import DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_CONTEXT, budget_capacity, state_bytes
from workers.config import ConfigError, ModelConfig, preset

MIB, GIB = 2**20, 2**30


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("capacity", help="per-request inference state bytes of a model config")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="PATH", help="a config.json or a checkpoint directory")
    src.add_argument("--preset", metavar="NAME", help="a preset name (see workers.config.PRESETS)")
    p.add_argument("--json", action="store_true", help="print the accounting as one JSON object")
    p.add_argument("--budget-gib", type=float, metavar="G", help="also report what fits in G GiB of state memory")
    p.add_argument("--context", type=int, metavar="T",
                   help=f"context length for concurrent_requests (needs --budget-gib; default {DEFAULT_CONTEXT})")
    p.add_argument("--checkpoint-interval", type=int, metavar="N", help="blocks of 256 tokens between prefix "
                   f"checkpoints for the checkpoint policy (needs --budget-gib; default {DEFAULT_CHECKPOINT_INTERVAL})")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        cfg = ModelConfig.from_file(args.config) if args.config else preset(args.preset)
    except ConfigError as e:
        print(f"v4serve capacity: {e}", file=sys.stderr)
        return 2
    info = state_bytes(cfg)
    try:
        budget = _budget(cfg, args)
    except ValueError as e:
        print(f"v4serve capacity: {e}", file=sys.stderr)
        return 2
    info.update(budget or {})
    if args.json:
        print(json.dumps(info))
        return 0
    counts = ", ".join(f"{n} {kind}" for kind, n in info["layer_counts"].items())
    per_token, fixed = info["bytes_per_token"], info["fixed_bytes_per_request"]
    rows = [  # (what, bytes, unit, note); float bytes print exactly (entry/4 and entry/128 are short binary fractions)
        *((fam, b, "B/token", "") for fam, b in info["bytes_per_token_by_family"].items()),
        ("total", per_token, "B/token", f"{per_token * 2**20 / GIB:.3f} GiB per 1M tokens"),
        *((fam, b, "B/request", "") for fam, b in info["fixed_bytes_by_family"].items()),
        ("total fixed", fixed, "B/request", f"{fixed / MIB:.2f} MiB"),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"model {info['model']}: {len(info['layer_types'])} layers ({counts})")
    print(f"entry bytes: main {info['main_entry_bytes']}, indexer {info['indexer_entry_bytes']}")
    for what, b, unit, note in rows:
        print(f"  {what:<{width}}  {b:>14,} {unit:<9}  {note}".rstrip())
    if budget:
        _print_budget(budget)
    return 0


def _budget(cfg: ModelConfig, args: argparse.Namespace) -> dict | None:
    if args.budget_gib is None:
        if args.context is not None or args.checkpoint_interval is not None:
            raise ValueError("--context and --checkpoint-interval need --budget-gib")
        return None
    if not args.budget_gib > 0:
        raise ValueError(f"--budget-gib must be positive, got {args.budget_gib}")
    return budget_capacity(
        cfg, round(args.budget_gib * GIB),
        DEFAULT_CONTEXT if args.context is None else args.context,
        DEFAULT_CHECKPOINT_INTERVAL if args.checkpoint_interval is None else args.checkpoint_interval)


def _print_budget(b: dict) -> None:
    print(f"budget {b['budget_bytes'] / GIB:g} GiB ({b['budget_bytes']:,} B)")
    print("  tokens if the whole budget held one family:")
    for fam, n in b["tokens_per_family"].items():
        print(f"    {fam:<22}  {'unbounded (no such layer)' if n is None else f'{n:,}'}")
    print(f"  concurrent requests at {b['context_tokens']:,} tokens: {b['concurrent_requests']:,}")
    print(f"  cached-prefix tokens per GiB (checkpoint every {b['checkpoint_interval_blocks']} blocks):")
    for policy, n in b["prefix_tokens_per_gib"].items():
        if n is None:  # nothing grows (no CSA/HCA layers): the policy costs nothing per token
            print(f"    {policy:<10}  {'unbounded':>12}")
            continue
        print(f"    {policy:<10}  {n:>12,.0f}  {b['prefix_tokens_per_gib_ratio_to_full_store'][policy]:5.2f}x full_store")
