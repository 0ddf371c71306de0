"""The indexer's selection inside the decode step: on the keys a step's CSA layers select from, and
the whole step with each implementation (GPU; flash-attn preset, bf16, random weights).

    python -m load_tests.bench_select_step [--cases 8192x1,131072x1,1048576x1,131072x32,1048576x32]
        [--old DIR] [--rounds 3] [--steps 12] [--random-index]

States are bench_kernels' synthetic ones (its step section). One eager step records the keys each
CSA layer hands to the selection (indexer_topk.select_entries; every row's keys to the batch's
widest table, indexer_topk.ROW_LENGTHS off, as an older tree's kernel takes them). Then, per
implementation, in --rounds alternations: the selection's time on those keys (a CUDA graph of ten calls, its picks
checked against torch.topk first) and the step's median time with the decode graphs recaptured.
Implementations: `kernel` (key_select.select_entries as committed), `torch` (torch.topk, the path
V4SERVE_SELECT=torch keeps) and, with --old DIR, `old`: the kernel of another tree, for an A/B in
one process (DIR holds that tree's kernels/, e.g. `mkdir DIR && git archive REF | tar -x -C DIR`).

Prints, per case, the keys' shape and how many distinct scores a row's top k hold (the synthetic
states repeat 4,096 encoded rows, so scores tie: about 400 of 512 at 8K, 60 at 128K, 8 at 1M;
`--random-index` gives every indexer row random codes, so nearly every key is its own), then a
line per implementation, and one JSON line. kernels/RESULTS.md has the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from kernels import indexer_topk as IT
from kernels import key_select as KS
from kernels import key_select_ref as R
from load_tests import bench_kernels as bk
from load_tests import bench_step_ab as AB

TOPK = bk.INDEX_TOPK


def torch_select(keys: torch.Tensor, k: int) -> torch.Tensor:
    """indexer_topk's path where the kernel does not win: torch.topk, then the entries."""
    return R.entries_of_keys(*IT.topk_of_keys(keys, k))


def load_old(tree: str):
    """select_entries of DIR/kernels/key_select.py, imported as a module of its own (its relative
    import of key_select_ref resolves inside DIR/kernels)."""
    root = Path(tree, "kernels")
    if not (root / "key_select.py").is_file():
        raise SystemExit(f"--old {tree}: no kernels/key_select.py there")
    spec = importlib.util.spec_from_file_location("old_kernels", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["old_kernels"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("old_kernels.key_select").select_entries


def step_keys(model, states) -> list[torch.Tensor]:
    """The keys each CSA layer's selection gets in one eager step."""
    seen, real = [], IT.select_entries

    def record(keys, k):
        seen.append(keys.clone())
        return real(keys, k)

    IT.select_entries, model.cuda_graphs = record, False
    try:
        with bk.kernels_mode("auto"):
            bk.decode_once(model, states)
    finally:
        IT.select_entries, model.cuda_graphs = real, True
    return seen


def distinct_top_scores(keys: torch.Tensor) -> int:
    """Distinct score halves among row 0's top TOPK keys."""
    return int((torch.topk(keys[0], TOPK).values >> 32).unique().numel())


def run_case(model, cfg, rows, P: int, B: int, impls: dict, rounds: int, steps: int,
             random_index: bool = False) -> dict:
    # one step records the keys, then each round of each implementation decodes steps + 2
    states = AB.fresh_states(cfg, model, rows, P, B, 1 + rounds * len(impls) * (steps + 2),
                             random_index_codes=random_index)
    keys = step_keys(model, states)
    if not keys:
        raise SystemExit("the step ran no selection kernel (is the kernel path on, and a CSA layer there?)")
    distinct = [distinct_top_scores(k) for k in keys]
    print(f"{P}x{B}: keys {[list(k.shape) for k in keys]}, distinct scores in a row's top {TOPK}: {distinct}",
          flush=True)
    select_us = {name: [] for name in impls}
    for name, fn in [item for _ in range(rounds) for item in impls.items()]:
        for k in keys:
            if not torch.equal(fn(k, TOPK), R.select_entries(k, TOPK)):
                raise SystemExit(f"{name}: picks differ from torch.topk at {P}x{B}")
            bk.cuda_time(lambda: fn(k, TOPK))
            select_us[name].append(bk.graph_time(lambda: fn(k, TOPK)) * 1e6)
    step_ms = AB.time_steps(model, states, IT, "select_entries", impls, rounds, steps)
    AB.report(f"{P}x{B}", step_ms, {name: "; selection us per layer " + " ".join(f"{t:.1f}" for t in us)
                                    for name, us in select_us.items()})
    return dict(context=P, batch=B, keys=[list(k.shape) for k in keys], distinct_top_scores=distinct,
                step_ms=step_ms, select_us=select_us)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="8192x1,131072x1,1048576x1,131072x32,1048576x32")
    ap.add_argument("--old", help="a tree whose kernels/key_select.py to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--random-index", action="store_true", help="random indexer codes: keys that rarely tie")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (the step's graphs)")
    # every row's keys to the batch's widest table, sentinels past its visible ones: what each of
    # the selections compared takes (an older tree's kernel knows no row lengths)
    IT.ROW_LENGTHS = False
    impls = {"old": load_old(a.old)} if a.old else {}
    impls.update(kernel=KS.select_entries, torch=torch_select)
    cfg, _, model = bk.flash_model()
    rows = bk.encoded_rows(cfg)
    out = []
    for case in a.cases.split(","):
        P, B = map(int, case.split("x"))
        out.append(run_case(model, cfg, rows, P, B, impls, a.rounds, a.steps, a.random_index))
        torch.cuda.empty_cache()
    print(json.dumps({"device": torch.cuda.get_device_name(), "random_index": a.random_index, "cases": out}))


if __name__ == "__main__":
    main()
