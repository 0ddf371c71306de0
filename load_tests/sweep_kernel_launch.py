"""Launch shapes of the indexer scan and HCA decode, swept over the bench_kernels inputs (GPU).

    python -m load_tests.sweep_kernel_launch

For the scan: programs per SM x warps; for HCA decode: heads per program x warps x pipeline
stages. Prints time, the fraction of the binding ceiling (measured first, in the same run) and
whether the result equals the first shape's bit for bit (a shape that changes the rounding must
be fixed, not autotuned: see kernels/sparse_decode.py). The chosen shapes are the constants
_PROGRAMS_PER_SM / SCAN_WARPS in kernels/indexer_topk.py and _GPU_LAUNCH in kernels/sparse_decode.py.
"""

from __future__ import annotations

import itertools

import torch

from kernels import hca_decode as hca
from kernels import indexer_topk as idx
from kernels import sparse_decode as sp
from workers.config import preset

from . import bench_kernels as bk


def sweep(name, shapes, apply, fn, traffic, ceil):
    first = None
    for shape in shapes:
        apply(*shape)
        try:
            out = fn()
            first = out if first is None else first
            t = bk.graph_time(fn)
            r = bk.roofline(t, *traffic, ceil)
            print(f"{name} {shape}: {t * 1e3:.3f} ms, {r['of_binding_ceiling']:.1%} of the binding ceiling, "
                  f"same bits as the first: {torch.equal(out, first)}", flush=True)
        except Exception as e:  # a shape that does not compile must not hide the others
            print(f"{name} {shape}: {type(e).__name__}: {str(e)[:120]}", flush=True)


def main() -> None:
    cfg = preset("flash-attn")
    ceil = bk.ceilings()
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
          f"{ceil['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    rows = bk.encoded_rows(cfg)
    scan_default = (idx._PROGRAMS_PER_SM, idx.SCAN_WARPS)
    hca_default = dict(sp._GPU_LAUNCH[False])
    for T, B in ((131072, 32), (1048576, 32), (1048576, 1)):
        x = bk.kernel_inputs(cfg, T, B, rows)

        def set_scan(pps, warps):
            idx._PROGRAMS_PER_SM, idx.SCAN_WARPS = pps, warps

        sweep(f"scan T={T} B={B} (programs/SM, warps)", itertools.product((1, 2, 4, 8, 16), (4, 8)), set_scan,
              lambda: idx.index_score_keys(x["iq"], x["iw"], x["csa_index"], x["block_table"], x["positions"],
                                           x["block_table"].shape[1] * idx.PAGE_ENTRIES),
              idx.scan_traffic(B, T, cfg.index_n_heads, cfg.index_head_dim), ceil)
        set_scan(*scan_default)

        def set_hca(heads, warps, stages):
            sp._GPU_LAUNCH[False] = dict(BLOCK_H=heads, num_warps=warps, num_stages=stages)

        sweep(f"hca T={T} B={B} (heads, warps, stages)", itertools.product((16, 32, 64), (4, 8), (1, 2, 3)), set_hca,
              lambda: hca.hca_decode(x["q"], x["sink"], x["swa"], x["swa_table"], x["positions"], x["hca_main"],
                                     x["block_table"], bk.WINDOW, cfg.nope_head_dim),
              hca.decode_traffic(B, T), ceil)
        sp._GPU_LAUNCH[False] = hca_default
        del x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
