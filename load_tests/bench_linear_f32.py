"""The float32 projection kernel (kernels/linear_f32.py) against cuBLAS (numerics.linear), both
replayed from CUDA graphs, at the flash-attn preset's float32 weights.

    python -m load_tests.bench_linear_f32 [--rows 16,32,128]

Weights: the CSA compressor's wkv / wgate (1,024 x 4,096), the indexer compressor's (256 x
4,096), the HCA compressor's (512 x 4,096), mHC's fn (24 x 16,384) and the head's (4 x 16,384).
Prints us per call of each, the kernel's weight bytes per second against the copy rate measured
first in the same run, and the kernel's largest error against a float64 product (relative to the
largest entry); then one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from kernels import linear_f32 as K
from load_tests.bench_kernels import ceilings, cuda_time, graph_time

SHAPES = ((1024, 4096), (256, 4096), (512, 4096), (24, 16384), (4, 16384))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="16,32,128")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    copy = ceilings()["copy_bytes_per_s"]
    out = []
    print(f"{'rows':>5} {'weight':>12} {'splits':>6} {'kernel us':>10} {'cuBLAS us':>10} {'cuBLAS/kernel':>13} "
          f"{'kernel GB/s':>11} {'of copy':>8} {'max err':>8}")
    for m in map(int, a.rows.split(",")):
        for n, k in SHAPES:
            g = torch.Generator(device="cuda").manual_seed(n + m)
            x = torch.randn(m, k, device="cuda", generator=g)
            w = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
            exact = x.double() @ w.double().T
            err = ((K.linear_f32(x, w).double() - exact).abs().max() / exact.abs().max()).item()
            timed = {}
            for name, fn in (("kernel", lambda: K.linear_f32(x, w)), ("cublas", lambda: K.reference(x, w))):
                cuda_time(fn)
                timed[name] = graph_time(fn)
            rate = n * k * 4 / timed["kernel"]
            out.append({"rows": m, "n": n, "k": k, "splits": K.splits_for(n, k), "kernel_us": timed["kernel"] * 1e6,
                        "cublas_us": timed["cublas"] * 1e6, "weight_bytes_per_s": rate, "max_rel_err": err})
            print(f"{m:>5} {f'{n} x {k}':>12} {K.splits_for(n, k):>6} {timed['kernel'] * 1e6:>10.1f} "
                  f"{timed['cublas'] * 1e6:>10.1f} {timed['cublas'] / timed['kernel']:>13.2f} {rate / 1e9:>11.0f} "
                  f"{rate / copy:>8.1%} {err:>8.1e}", flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_bytes_per_s": copy, "linear_f32": out}))


if __name__ == "__main__":
    main()
