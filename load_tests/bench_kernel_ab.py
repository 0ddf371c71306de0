"""A module-level switch of the kernels, A/B on one indexer kernel call, in one process (GPU;
flash-attn preset, bench_kernels' inputs).

    python -m load_tests.bench_kernel_ab --set kernels.indexer_scan_hopper.GENERAL_HERE=False,True
        [--kernel scan|scan_lengths|topk|select|hca|csa] [--cases 131072x32,1048576x32] [--general 0] [--rounds 3]

The call is replayed from a CUDA graph (bench_kernels.graph_time), recaptured for each value, and
the values alternate --rounds times. --kernel: the scan with its sentinels (index_score_keys, what
bench_kernels' scan rows time), the scan with each row's length (what the decode top-k runs),
the scan and the selection (indexer_topk), the selection alone on the scan's keys and lengths
(key_select.select_entries), or HCA or CSA decode attention (hca_decode, sparse_mqa_decode: their
split programs and merge, what bench_kernels' HCA and CSA rows time). --general N: every Nth
query is sent to the general scan (its mode flipped: the general scan scores any query exactly,
the model's included); 1 sends all, 0 none. Before timing, each value's output must be the first
value's bits: a switch of launch or schedule must not move a key. The attention outputs are held
to the bf16 tolerance of the kernels' tests instead (tests/test_kernels_decode.py), since a split
size moves the float sums. Prints a line per case and value (each round's ms, the median's ratio
to the first value's and its share of the copy rate measured first), then one JSON line. Machines differ, so only ratios within one run mean anything (kernels/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from load_tests import bench_kernels as bk
from load_tests import bench_step_ab as AB


def kernel_call(kind: str, x: dict, ops: tuple, cfg):
    """The call timed: a function of no arguments returning what is compared between values."""
    from kernels import hca_decode as hca
    from kernels import indexer_topk as idx
    from kernels import key_select
    from kernels import sparse_decode as sparse

    if kind == "csa":
        topk = bk.csa_picks(int(x["positions"][0]) + 1, x["q"].shape[0])
        return lambda: sparse.sparse_mqa_decode(x["q"], x["sink"], x["swa"], x["swa_table"], x["positions"],
                                                x["csa_main"], x["block_table"], topk, bk.WINDOW, cfg.nope_head_dim)
    if kind == "hca":
        return lambda: hca.hca_decode(x["q"], x["sink"], x["swa"], x["swa_table"], x["positions"], x["hca_main"],
                                      x["block_table"], bk.WINDOW, cfg.nope_head_dim)

    args = (x["iq"], x["iw"], x["csa_index"], x["block_table"], x["positions"])
    n_cols = x["block_table"].shape[1] * idx.PAGE_ENTRIES
    if kind == "scan":
        return lambda: idx.index_score_keys(*args, n_cols, ops)
    if kind == "scan_lengths":
        def keys_to_lengths():
            keys, lengths = idx.index_score_keys_and_lengths(*args, n_cols, ops)
            # only each row's keys up to its length are written
            cols = torch.arange(n_cols, device=keys.device)
            return torch.where(cols[None, :] < lengths[:, None].long(), keys, 0), lengths
        return keys_to_lengths
    if kind == "select":  # the selection alone, on the scan's keys and row lengths (found once)
        keys, lengths = idx.index_score_keys_and_lengths(*args, n_cols, ops)
        return lambda: key_select.select_entries(keys, bk.INDEX_TOPK, lengths)
    assert kind == "topk", kind  # main's choices
    return lambda: idx.indexer_topk(*args, bk.INDEX_TOPK, ops)


def bytes_moved(kind: str, B: int, T: int, cfg) -> tuple[int, str]:
    """The bytes a call must move at the least, and what they are: the scan's (indexer_topk.scan_traffic)
    for the scans and the top-k, each visible key read once for the selection alone, HCA's
    (hca_decode.decode_traffic), CSA's (sparse_decode.decode_traffic)."""
    from kernels import hca_decode as hca
    from kernels import indexer_topk as idx
    from kernels import sparse_decode as sparse

    if kind == "hca":
        return hca.decode_traffic(B, T)[0], "HCA's bytes"
    if kind == "csa":
        return sparse.decode_traffic(B, T)[0], "CSA's bytes"
    if kind == "select":
        return B * ((T + 1) // 4) * 8, "the keys read once"
    return idx.scan_traffic(B, T, cfg.index_n_heads, cfg.index_head_dim)[0], "the scan's bytes"


def with_general(ops: tuple, every: int) -> tuple:
    """The operands with every `every`-th query's mode set to the general scan's (0: unchanged)."""
    from kernels import indexer_topk as idx

    if every <= 0:
        return ops
    mode = ops[3].clone()
    mode[::every] = idx.MODE_GENERAL
    return (*ops[:3], mode, ops[4])


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(same(u, v) for u, v in zip(a, b))
    return torch.equal(a, b)


# the attention outputs under two values: within the bf16 tolerance of tests/test_kernels_decode.py
ATTENTION_TOL = dict(atol=2e-2, rtol=2e-2)


def agree(kind: str, a, b) -> bool:
    """Whether two values' outputs agree: the same bits, or for attention within ATTENTION_TOL."""
    if kind in ("hca", "csa"):
        return torch.allclose(a.float(), b.float(), **ATTENTION_TOL)
    return same(a, b)


def time_case(cfg, rows, ceil, T: int, B: int, kind: str, every: int, module, attr: str, values: list,
              rounds: int) -> dict:
    from kernels import indexer_topk as idx

    x = bk.kernel_inputs(cfg, T, B, rows)
    ops = with_general(idx.query_operands(x["iq"], x["iw"]), every)
    fn = kernel_call(kind, x, ops, cfg)
    saved = getattr(module, attr)
    named = {repr(v): v for v in values}
    try:
        first = None
        for v in values:
            setattr(module, attr, v)
            out = fn()
            first = out if first is None else first
            if not agree(kind, out, first):
                raise SystemExit(f"{T}x{B}: {attr}={v!r} gives other results than {values[0]!r}")
        ms = {name: [] for name in named}
        for _ in range(rounds):
            for name, v in named.items():
                setattr(module, attr, v)
                ms[name].append(bk.graph_time(fn) * 1e3)
    finally:
        setattr(module, attr, saved)
    nbytes, what = bytes_moved(kind, B, T, cfg)
    share = {name: f"; {nbytes / (statistics.median(t) / 1e3) / ceil['copy_bytes_per_s']:.1%} of the copy rate "
                   f"({what})" for name, t in ms.items()}
    AB.report(f"{T}x{B} {kind} general every {every} {attr}=", ms, share, what="ms", digits=4)
    return dict(context=T, batch=B, kernel=kind, general_every=every, ms=ms)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", required=True, help="package.module.NAME=value,value (Python literals)")
    ap.add_argument("--kernel", default="scan", choices=("scan", "scan_lengths", "topk", "select", "hca", "csa"))
    ap.add_argument("--cases", default="131072x32,1048576x32,131072x1,8192x32")
    ap.add_argument("--general", type=int, default=0, help="every Nth query to the general scan (0: none)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    module, attr, values = AB.parse_switch(args.set)
    from workers.config import preset

    cfg = preset("flash-attn")
    ceil = bk.ceilings()
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    rows = bk.encoded_rows(cfg)
    res = []
    for case in args.cases.split(","):
        T, _, B = case.partition("x")
        res.append(time_case(cfg, rows, ceil, int(T), int(B), args.kernel, args.general, module, attr, values,
                             args.rounds))
        bk.empty_cache()
    out = dict(switch=args.set, ceilings=ceil, cases=res)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
