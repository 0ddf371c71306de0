"""Where the Hopper decode kernels wait: launches for Nsight Compute, and its per-instruction stall
samples summed (issue 5).

    ncu --clock-control none --profile-from-start off --set full -o prof \\
        python -m load_tests.profile_kernels launch --case 1048576x32
    ncu -i prof.ncu-rep --page source --csv --print-source sass > source.csv
    python -m load_tests.profile_kernels stalls source.csv [--kernel 1] [--rows 480:1185] [--top 25]

`launch` builds bench_kernels' inputs for one context x batch, compiles and warms every variant
outside the profiled range, then launches each once between cudaProfilerStart and Stop (so
`--profile-from-start off` profiles only those): the Gluon scan under each LOADER of
kernels/indexer_scan_hopper.py, then HCA decode under each SCHEDULE of kernels/split_attention_hopper.py
(its split kernel and the merge). `stalls` reads the source page's CSV (plain or .gz) and prints,
per kernel (numbered in launch order), its warp-state samples by stall reason and the hottest
instructions; `--rows` limits the sums to a range of SASS lines, such as one warp role's loop.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import re

SAMPLES = "Warp Stall Sampling (All Samples)"


def kernel_sections(text: str) -> list[tuple[str, list[dict]]]:
    """ncu's source-page CSV -> [(kernel name, one dict per SASS line)], in launch order."""
    out = []
    for part in text.split('"Kernel Name",')[1:]:
        name, rest = part.split("\n", 1)
        out.append((name.strip().strip(",").strip('"'), list(csv.DictReader(io.StringIO(rest)))))
    return out


def stalls(row: dict) -> dict[str, int]:
    """One SASS line's samples per stall reason ("selected" is a warp issuing); ncu's copies of the
    columns counting only the samples where no warp issued are left out."""
    return {c[len("stall_"):]: int(v or 0) for c, v in row.items() if c.startswith("stall_") and "Not Issued" not in c}


def stall_totals(rows: list[dict]) -> collections.Counter:
    """Samples per stall reason over the given SASS lines."""
    tot = collections.Counter()
    for r in rows:
        tot.update(stalls(r))
    return tot


def hottest(rows: list[dict], top: int) -> list[tuple[int, int, str, list[tuple[str, int]]]]:
    """The `top` lines with the most samples, in SASS order: (line, samples, instruction, its three
    largest reasons)."""
    best = sorted(range(len(rows)), key=lambda i: -int(rows[i][SAMPLES] or 0))[:top]
    out = []
    for i in sorted(best):
        reasons = sorted(stalls(rows[i]).items(), key=lambda x: -x[1])
        out.append((i, int(rows[i][SAMPLES] or 0), rows[i]["Source"].strip(), [x for x in reasons[:3] if x[1]]))
    return out


def read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return f.read()


def print_stalls(path: str, kernel: int | None, rows: str | None, top: int) -> None:
    sections = kernel_sections(read_text(path))
    for k, (name, lines) in enumerate(sections):
        if kernel is not None and k != kernel:
            continue
        lo, hi = (int(x) for x in rows.split(":")) if rows else (0, len(lines) - 1)
        chosen = lines[lo:hi + 1]
        tot = stall_totals(chosen)
        n = sum(tot.values())
        print(f"== kernel {k}: {name}, SASS lines {lo}-{hi}, {n} samples")
        n = n or 1
        print("   " + ", ".join(f"{reason} {v / n:.1%}" for reason, v in tot.most_common(12)))
        for i, s, instr, reasons in hottest(chosen, top):
            instr = re.sub(r"\s+", " ", instr)[:64]
            print(f"   {lo + i:5d} {s / n:6.1%}  {instr:64s} " + " ".join(f"{c}:{v}" for c, v in reasons))


def launch(case: str) -> None:
    """One launch of each Hopper decode kernel variant at context x batch `case`, profiled alone."""
    import torch

    from kernels import hca_decode as hca
    from kernels import indexer_scan_hopper as scan_hopper
    from kernels import indexer_topk as idx
    from kernels import split_attention_hopper as hca_hopper
    from workers.config import preset

    from . import bench_kernels as bk

    T, B = (int(v) for v in case.split("x"))
    cfg = preset("flash-attn")
    x = bk.kernel_inputs(cfg, T, B, bk.encoded_rows(cfg))
    q8, w8, _, mode, _ = idx.query_operands(x["iq"], x["iw"])
    table = x["block_table"].to(torch.int32)
    n_cols = table.shape[1] * idx.PAGE_ENTRIES
    out = torch.empty(B, n_cols, dtype=torch.int64, device="cuda")

    def scan():  # the Gluon launch alone, as index_score_keys makes it (not the general-mode one)
        if not idx._hopper_scan(q8, w8, mode, x["positions"], x["csa_index"], table, out, n_cols):
            raise RuntimeError("the Gluon scan did not run here (see the log)")

    def attend():
        hca.hca_decode(x["q"], x["sink"], x["swa"], x["swa_table"], x["positions"], x["hca_main"], x["block_table"],
                       bk.WINDOW, cfg.nope_head_dim)

    variants = [(scan_hopper, "LOADER", v, scan) for v in scan_hopper.LOADERS]
    variants += [(hca_hopper, "SCHEDULE", v, attend) for v in hca_hopper.SCHEDULES]
    saved = {(m, a): getattr(m, a) for m, a, _, _ in variants}
    try:
        for module, attr, value, fn in variants:  # compiled outside the profiled range
            setattr(module, attr, value)
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for module, attr, value, fn in variants:
            setattr(module, attr, value)
            fn()
            print(f"launched {module.__name__.split('.')[-1]} {attr}={value}", flush=True)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    finally:
        for (module, attr), value in saved.items():
            setattr(module, attr, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("launch", help="one launch of each variant, for ncu --profile-from-start off")
    p.add_argument("--case", default="1048576x32", help="context x batch")
    p = sub.add_parser("stalls", help="stall samples of an ncu source-page CSV export")
    p.add_argument("csv", help="ncu -i REPORT --page source --csv --print-source sass output (.gz too)")
    p.add_argument("--kernel", type=int, help="only this kernel (0 = the first profiled)")
    p.add_argument("--rows", help="lo:hi, only these SASS lines (inclusive)")
    p.add_argument("--top", type=int, default=20, help="hottest instructions to list")
    args = ap.parse_args()
    if args.cmd == "launch":
        launch(args.case)
    else:
        print_stalls(args.csv, args.kernel, args.rows, args.top)


if __name__ == "__main__":
    main()
