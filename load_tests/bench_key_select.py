"""The indexer's top-k: the radix-select kernel (kernels/key_select.py) against torch.topk
(indexer_topk.topk_of_keys, then the entries' -1 mapping), both replayed from CUDA graphs.

    python -m load_tests.bench_key_select [--rows 1,2,4,8,32] [--widths 8192,32768,49152,262144] [--live 1]
        [--bits 4,8] [--distinct 64]

Keys are the scan's int64 keys of random scores (every column visible), k = 512 (flash-attn's
top-k). `--live L`: only the first L rows see every column, the others one (a decode bucket's
padded rows, at position 0: their chunks are all sentinels). `--distinct D`: scores are the
integers 0 to D - 1 at random, so the k-th score is tied in every chunk, as repeated index keys
make it (the step section's synthetic states repeat 4,096 encoded rows: at 1M, 8 distinct scores
among a row's top 512). `--bits`: the kernel with each digit width (key_select.RADIX_BITS) in
turn, one column each, every one's picks checked against torch.topk. Prints ms per call of each
and torch.topk's time over the best, then one JSON line. indexer_topk takes the kernel where
key_select.kernel_wins says so; this is the measurement behind that rule.
"""

from __future__ import annotations

import argparse
import json

import torch

from kernels import key_select as KS
from kernels import key_select_ref as R
from kernels.indexer_topk import topk_of_keys
from load_tests.bench_kernels import cuda_time, graph_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,32")
    ap.add_argument("--widths", default="8192,32768,49152,262144,393216")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--live", type=int, default=0, help="rows that see every column (0: all of them)")
    ap.add_argument("--distinct", type=int, default=0, help="distinct score values (0: continuous)")
    ap.add_argument("--bits", default=str(KS.RADIX_BITS), help="digit widths to time the kernel with")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    bits = [int(b) for b in a.bits.split(",")]
    names = [f"{b}-bit" for b in bits]
    rows = []
    print(f"{'rows':>5} {'keys':>7} " + " ".join(f"{name + ' ms':>10}" for name in names)
          + f" {'torch ms':>9} {'torch/kernel':>12}")
    for n in map(int, a.widths.split(",")):
        for S in map(int, a.rows.split(",")):
            g = torch.Generator(device="cuda").manual_seed(n + S)
            scores = torch.randn(S, n, device="cuda", generator=g)
            if a.distinct:
                scores = torch.randint(0, a.distinct, (S, n), device="cuda", generator=g).float()
            live = a.live or S
            keys = R.keys_of_scores(scores, torch.tensor([n] * min(live, S) + [1] * max(S - live, 0)))
            want = R.select_entries(keys, a.k)

            def torch_path():
                best, idx = topk_of_keys(keys, a.k)
                return R.entries_of_keys(best, idx)

            timed = {}
            for b, name in zip(bits, names):
                KS.RADIX_BITS = b
                if not torch.equal(KS.select_entries(keys, a.k), want):
                    raise SystemExit(f"kernel {name} picks differ from torch.topk at rows={S} keys={n}")
                cuda_time(lambda: KS.select_entries(keys, a.k))
                timed[f"kernel_{name}_ms"] = graph_time(lambda: KS.select_entries(keys, a.k)) * 1e3
            cuda_time(torch_path)
            timed["torch_ms"] = graph_time(torch_path) * 1e3
            best = min(v for name, v in timed.items() if name.startswith("kernel"))
            rows.append({"rows": S, "live": min(live, S), "keys": n, **timed})
            print(f"{S:>5} {n:>7} " + " ".join(f"{timed[f'kernel_{name}_ms']:>10.4f}" for name in names)
                  + f" {timed['torch_ms']:>9.4f} {timed['torch_ms'] / best:>12.2f}", flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "k": a.k, "select": rows}))


if __name__ == "__main__":
    main()
