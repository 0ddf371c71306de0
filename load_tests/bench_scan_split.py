"""The indexer's split of a batch's work, A/B in one process (GPU; flash-attn preset's indexer,
random keys):

    python -m load_tests.bench_scan_split [--cases 131072x32,1048576x32,1048576x1,8192x32]
        [--mixed one-long,spread] [--what scan,topk] [--rounds 3]

Three settings, alternating --rounds times, each timed from a CUDA graph of ten calls:
`per-query` (kernels/scan_plan.PLANNED off: query s gets programs (s, j) over equal shares of the
table's columns), `planned` (the plan: programs in proportion to each query's work), `lengths`
(the plan, and indexer_topk.ROW_LENGTHS: each row's keys written and selected up to its own
length, not the batch's widest table). `--what scan` times the scan alone (index_score_keys, or
index_score_keys_and_lengths under `lengths`, as bench_kernels' "indexer_scan" row; its share of
the copy rate counts the visible keys' bytes, scan_traffic); `topk` times indexer_topk, the scan
and the selection a decode step runs. A case CxB is B queries of context C; --mixed adds batches
of 32 queries of different lengths in one launch, where the split matters most: `one-long` one
query of 1M and 31 of 8K, `spread` 32 lengths evenly from 8K to 1M (every query's table as wide as
the longest's, as a decode batch's block table is). Before timing, the settings' picks (topk) or
keys up to each row's length (scan) must be equal bit for bit. Prints each case's ms per round,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import contextmanager

import torch

from kernels import indexer_topk as idx
from kernels import scan_plan
from workers.config import preset

from . import bench_kernels as bk

MIXED = {
    "one-long": lambda: [1 << 20] + [8192] * 31,
    "spread": lambda: [int(c) // 4 * 4 for c in torch.linspace(8192, 1 << 20, 32)],
}
SETTINGS = {"per-query": (False, False), "planned": (True, False), "lengths": (True, True)}


@contextmanager
def setting(name: str):
    planned, row_lengths = SETTINGS[name]
    old = scan_plan.PLANNED, idx.ROW_LENGTHS
    scan_plan.PLANNED, idx.ROW_LENGTHS = planned, row_lengths
    try:
        yield
    finally:
        scan_plan.PLANNED, idx.ROW_LENGTHS = old


def case_inputs(cfg, contexts: list[int], rows) -> dict:
    """bench_kernels' inputs for len(contexts) queries of the longest context, then each query's
    position set to its own context's last token (its table holds the longest one's pages)."""
    x = bk.kernel_inputs(cfg, max(contexts), len(contexts), rows)
    x["positions"] = torch.tensor([c - 1 for c in contexts], dtype=torch.int32, device=bk.DEVICE)
    return x


def traffic(cfg, contexts: list[int]) -> tuple[int, int]:
    parts = [idx.scan_traffic(1, c, cfg.index_n_heads, cfg.index_head_dim) for c in contexts]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def calls(x: dict, what: str):
    """The call a setting times, and what of its result must agree across the settings."""
    ops = idx.query_operands(x["iq"], x["iw"])  # as a decode step has them, from its graph
    args = (x["iq"], x["iw"], x["csa_index"], x["block_table"], x["positions"])
    if what == "topk":
        return lambda: idx.indexer_topk(*args, bk.INDEX_TOPK, ops), lambda out: out
    n_cols = x["block_table"].shape[1] * idx.PAGE_ENTRIES
    n_vis = ((x["positions"].long() + 1) // 4).tolist()

    def scan():
        if idx.ROW_LENGTHS:
            return idx.index_score_keys_and_lengths(*args, n_cols, ops)[0]
        return idx.index_score_keys(*args, n_cols, ops)

    return scan, lambda keys: [keys[r, :n].clone() for r, n in enumerate(n_vis)]


def run_case(name: str, cfg, contexts: list[int], rows, ceil: dict, rounds: int, what: str) -> dict:
    x = case_inputs(cfg, contexts, rows)
    fn, kept = calls(x, what)
    results = {}
    for s in SETTINGS:
        with setting(s):
            results[s] = kept(fn())
    if not idx.HOPPER_SCAN:
        raise SystemExit("the Gluon scan is off (not a Hopper GPU, or it failed: see the log)")
    first = results["per-query"]
    same = all((torch.equal(r, first) if what == "topk" else all(map(torch.equal, r, first)))
               for r in results.values())
    del results
    ms = {s: [] for s in SETTINGS}
    for _ in range(rounds):
        for s in SETTINGS:
            with setting(s):
                ms[s].append(bk.graph_time(fn) * 1e3)
    nbytes, flops = traffic(cfg, contexts)
    row = {"case": name, "what": what, "contexts": contexts, "same": same, "ms": ms}
    base = statistics.median(ms["per-query"])
    for s in SETTINGS:
        med = statistics.median(ms[s])
        share = bk.roofline(med / 1e3, nbytes, flops, ceil)["of_copy_rate"]
        row[f"{s}_of_copy_rate"] = share
        print(f"{what} {name:>11} {s:>9}: ms {' '.join(f'{t:.4f}' for t in ms[s])} (median / per-query's "
              f"{med / base:.3f}; visible keys at {share:.1%} of the copy rate)", flush=True)
    print(f"{what} {name:>11} the same {'picks' if what == 'topk' else 'keys'} under every setting: {same}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="131072x32,1048576x32,1048576x1,8192x32")
    ap.add_argument("--mixed", default="one-long,spread", help=f"mixed batches, of {sorted(MIXED)}")
    ap.add_argument("--what", default="scan,topk", help="scan and/or topk")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = preset("flash-attn")
    ceil = bk.ceilings()
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    rows = bk.encoded_rows(cfg)
    batches = [(c, [int(c.split("x")[0])] * int(c.split("x")[1])) for c in filter(None, args.cases.split(","))]
    batches += [(m, MIXED[m]()) for m in filter(None, args.mixed.split(","))]
    out = [run_case(name, cfg, contexts, rows, ceil, args.rounds, what)
           for what in filter(None, args.what.split(",")) for name, contexts in batches]
    print(json.dumps({"device": torch.cuda.get_device_name(), "ceilings": ceil, "cases": out}))


if __name__ == "__main__":
    main()
