"""`v4serve capacity`: how many bytes of state a request costs, per token and fixed."""

from __future__ import annotations

import argparse
import json
import sys

from workers.capacity import state_bytes
from workers.config import ConfigError, ModelConfig, preset

MIB = 2**20


def add_parser(sub) -> None:
    p = sub.add_parser("capacity", help="per-request KV state bytes of a model config")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a config.json or a checkpoint directory")
    src.add_argument("--preset", help="a preset name")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = ModelConfig.from_file(args.config) if args.config else preset(args.preset)
    except ConfigError as e:
        print(f"v4serve capacity: {e}", file=sys.stderr)
        return 2
    info = state_bytes(cfg)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model {info['model']}: {len(info['layer_types'])} layers {info['layers']}")
    print(f"  entry bytes: main {info['main_entry_bytes']}, indexer {info['indexer_entry_bytes']}")
    print(f"  growing state: {info['bytes_per_token']:.2f} B/token "
          f"({info['bytes_per_token'] * 2**20 / 2**30:.3f} GiB per 1M tokens)")
    print(f"  fixed per request: {info['fixed_bytes_per_request'] / MIB:.2f} MiB")
    return 0
