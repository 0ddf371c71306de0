"""The indexer scan's split of pages over programs, A/B in one process (Hopper GPU; flash-attn
preset's indexer, random keys):

    python -m load_tests.bench_scan_split [--cases 131072x32,1048576x32,1048576x1,8192x32]
        [--mixed one-long,spread] [--rounds 3]

Times `index_score_keys` (the Gluon FP8 scan and the general scan's launch, as bench_kernels'
"indexer_scan" row) with kernels/scan_plan.PLANNED on and off (the plan or the per-query split),
alternating --rounds times, each from a CUDA graph of ten calls. A case CxB is B queries of context C; --mixed adds
batches of 32 queries of different lengths in one launch, which is where the split matters most:
`one-long` is one query of 1M and 31 of 8K, `spread` 32 lengths evenly from 8K to 1M. Before
timing, both splits' keys must be equal bit for bit. Prints each case's ms per round and the
median's share of the copy rate (measured first, in the same run; the bytes are scan_traffic's,
summed over the queries' own lengths), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from kernels import indexer_topk as idx
from kernels import scan_plan
from workers.config import preset

from . import bench_kernels as bk

MIXED = {
    "one-long": lambda: [1 << 20] + [8192] * 31,
    "spread": lambda: [int(c) // 4 * 4 for c in torch.linspace(8192, 1 << 20, 32)],
}


def case_inputs(cfg, contexts: list[int], rows) -> dict:
    """bench_kernels' inputs for len(contexts) queries of the longest context, then each query's
    position set to its own context's last token (its table holds the longest one's pages)."""
    x = bk.kernel_inputs(cfg, max(contexts), len(contexts), rows)
    x["positions"] = torch.tensor([c - 1 for c in contexts], dtype=torch.int32, device=bk.DEVICE)
    return x


def traffic(cfg, contexts: list[int]) -> tuple[int, int]:
    parts = [idx.scan_traffic(1, c, cfg.index_n_heads, cfg.index_head_dim) for c in contexts]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def run_case(name: str, cfg, contexts: list[int], rows, ceil: dict, rounds: int) -> dict:
    x = case_inputs(cfg, contexts, rows)
    ops = idx.query_operands(x["iq"], x["iw"])  # as a decode step has them, from its graph
    n_cols = x["block_table"].shape[1] * idx.PAGE_ENTRIES

    def scan():
        return idx.index_score_keys(x["iq"], x["iw"], x["csa_index"], x["block_table"], x["positions"], n_cols, ops)

    keys, ms = {}, {True: [], False: []}
    try:
        for planned in (True, False):
            scan_plan.PLANNED = planned
            keys[planned] = scan()
        same = torch.equal(keys[True], keys[False])
        del keys
        if not idx.HOPPER_SCAN:
            raise SystemExit("the Gluon scan is off (not a Hopper GPU, or it failed: see the log)")
        for _ in range(rounds):
            for planned in (True, False):
                scan_plan.PLANNED = planned
                ms[planned].append(bk.graph_time(scan) * 1e3)
    finally:
        scan_plan.PLANNED = True
    nbytes, flops = traffic(cfg, contexts)
    row = {"case": name, "contexts": contexts, "same_keys": same, "ms": {"planned": ms[True], "per_query": ms[False]}}
    for planned, label in ((True, "planned"), (False, "per_query")):
        med = statistics.median(ms[planned])
        share = bk.roofline(med / 1e3, nbytes, flops, ceil)["of_copy_rate"]
        row[f"{label}_of_copy_rate"] = share
        print(f"{name:>12} {label:>9}: ms {' '.join(f'{t:.4f}' for t in ms[planned])} "
              f"({share:.1%} of the copy rate)", flush=True)
    print(f"{name:>12} same keys: {same}; planned / per query: "
          f"{statistics.median(ms[True]) / statistics.median(ms[False]):.3f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="131072x32,1048576x32,1048576x1,8192x32")
    ap.add_argument("--mixed", default="one-long,spread", help=f"mixed batches, of {sorted(MIXED)}")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = preset("flash-attn")
    ceil = bk.ceilings()
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    rows = bk.encoded_rows(cfg)
    out = []
    for case in filter(None, args.cases.split(",")):
        T, B = map(int, case.split("x"))
        out.append(run_case(case, cfg, [T] * B, rows, ceil, args.rounds))
    for name in filter(None, args.mixed.split(",")):
        out.append(run_case(name, cfg, MIXED[name](), rows, ceil, args.rounds))
    print(json.dumps({"device": torch.cuda.get_device_name(), "ceilings": ceil, "cases": out}))


if __name__ == "__main__":
    main()
