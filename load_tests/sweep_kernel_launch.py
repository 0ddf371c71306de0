"""Launch shapes of the decode kernels, swept over the bench_kernels inputs (GPU).

    python -m load_tests.sweep_kernel_launch [--only scan|scan-gluon|hca|hca-gluon|csa|csa-gluon]

For the FP8 scan in Triton (the kernel of GPUs other than Hopper's; Hopper runs the Gluon one of
kernels/indexer_scan_hopper.py, whose launch is fixed there): pages per step x warps x programs per
SM x pipeline stages; for the Gluon scan (Hopper only) how its pages reach a program (the
LOADER of kernels/indexer_scan_hopper.py: each thread's own loads, or bulk copies into a ring of
STAGES slots by a loader warp of their own) x programs per SM x the pages of a step its scorer
holds at once (SCORED_PAGES), and the shipped setting with every block scale multiplied
(FIRST_SCALE_OUT off) without and with dependent launches (the Gluon scan after the kernel before
it, the general scan after the Gluon scan: kernels/grid_dependency.py), then as it ships;
for HCA decode:
heads per program x keys per tile x warps x pipeline stages x keys per split; for CSA decode the
same; for HCA decode's Gluon kernel (kernels/split_attention_hopper.py, Hopper only) its SCHEDULE (who
decodes the key tiles) under the split rule it ships with, then x keys per split, one size for
every query (KEYS_PER_SPLIT, SHORT_QUERY_KEYS, SHORT_QUERY_SPLIT there; a split size changes the
rounding too); for CSA decode's Gluon kernel (the same split programs over the top-k picks) its
schedules at the shipped SPARSE_KEYS_PER_SPLIT there, then other split sizes. The Triton sweeps
("hca", "csa") switch the Gluon kernels off on Hopper. Prints time, the fraction of the binding ceiling (measured first, in the same run), whether
the result equals the first shape's bit for bit (a shape that changes the rounding must be
fixed, not autotuned: see kernels/sparse_decode.py) and how far it is from it. The chosen shapes
are the constants FP8_PAGES / SCAN_WARPS / FP8_PROGRAMS_PER_SM / SCAN_STAGES in
kernels/indexer_topk.py, _GPU_LAUNCH and SPARSE_KEYS_PER_SPLIT in kernels/sparse_decode.py,
HCA_KEYS_PER_SPLIT in kernels/hca_decode.py, and the split sizes of kernels/split_attention_hopper.py.
"""

from __future__ import annotations

import argparse

import torch

from kernels import grid_dependency
from kernels import hca_decode as hca
from kernels import indexer_scan_hopper as scan_hopper
from kernels import indexer_topk as idx
from kernels import sparse_decode as sp
from kernels.key_select_ref import scores_from_keys
from workers.config import preset

from . import bench_kernels as bk


def sweep(name, shapes, apply, fn, traffic, ceil, values=lambda out: out.float()):
    """Time fn under each launch shape; `values` maps an output to numbers to compare with the first."""
    first = None
    for shape in shapes:
        apply(*shape)
        try:
            out = fn()
            first = out if first is None else first
            t = bk.graph_time(fn)
            r = bk.roofline(t, *traffic, ceil)
            a, b = values(out), values(first)
            ok = a.isfinite() & b.isfinite()
            rel = ((a - b).abs()[ok].max() / b.abs()[ok].max()).item() if ok.any() else 0.0
            print(f"{name} {shape}: {t * 1e3:.3f} ms, {r['of_binding_ceiling']:.1%} of the binding ceiling, "
                  f"same bits as the first: {torch.equal(out, first)} (max difference / max: {rel:.1e})", flush=True)
        except Exception as e:  # a shape that does not compile must not hide the others
            print(f"{name} {shape}: {type(e).__name__}: {str(e)[:120]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("scan", "scan-gluon", "hca", "hca-gluon", "csa", "csa-gluon"),
                    help="sweep one kernel only")
    ap.add_argument("--cases", default="131072x32,1048576x32,1048576x1",
                    help="context x batch of each input set, comma-separated")
    args = ap.parse_args()
    only = args.only
    cases = [tuple(map(int, c.split("x"))) for c in args.cases.split(",")]
    cfg = preset("flash-attn")
    ceil = bk.ceilings()
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
          f"{ceil['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    rows = bk.encoded_rows(cfg)
    scan_gluon_default = (scan_hopper.LOADER, scan_hopper.STAGES, scan_hopper.PROGRAMS_PER_SM,
                          scan_hopper.SCORED_PAGES, scan_hopper.FIRST_SCALE_OUT, grid_dependency.DEPENDENT_LAUNCHES)
    scan_default = (idx.FP8_PAGES, idx.SCAN_WARPS, idx.FP8_PROGRAMS_PER_SM, idx.SCAN_STAGES)
    hca_default = (dict(sp._GPU_LAUNCH[False]), hca.HCA_KEYS_PER_SPLIT)
    csa_default = (dict(sp._GPU_LAUNCH[True]), sp.SPARSE_KEYS_PER_SPLIT)
    hopper = hca.hopper
    gluon_default = (hopper.SCHEDULE, hopper.KEYS_PER_SPLIT, hopper.SHORT_QUERY_KEYS, hopper.SHORT_QUERY_SPLIT)
    csa_gluon_default = (hopper.SCHEDULE, hopper.SPARSE_KEYS_PER_SPLIT)
    for T, B in cases:
        x = bk.kernel_inputs(cfg, T, B, rows)

        def set_scan(pages, warps, pps, stages):
            idx.FP8_PAGES, idx.SCAN_WARPS, idx.FP8_PROGRAMS_PER_SM, idx.SCAN_STAGES = pages, warps, pps, stages

        ops = idx.query_operands(x["iq"], x["iw"])  # as a decode step has them, from its graph
        if only in (None, "scan"):
            with bk.triton_scan():  # the shapes swept are the Triton kernel's (docstring)
                sweep(f"fp8 scan T={T} B={B} (pages per step, warps, programs/SM, stages)",
                      ((2, 4, 2, 3), (2, 4, 2, 1), (2, 4, 2, 2), (2, 4, 2, 4), (1, 4, 3, 1), (1, 4, 3, 2), (1, 4, 4, 3)),
                      set_scan,
                      lambda: idx.index_score_keys(x["iq"], x["iw"], x["csa_index"], x["block_table"], x["positions"],
                                                   x["block_table"].shape[1] * idx.PAGE_ENTRIES, ops),
                      idx.scan_traffic(B, T, cfg.index_n_heads, cfg.index_head_dim), ceil, scores_from_keys)
        set_scan(*scan_default)

        def set_scan_gluon(loader, stages, pps, scored, first_scale_out, dependent):
            scan_hopper.LOADER, scan_hopper.STAGES, scan_hopper.PROGRAMS_PER_SM = loader, stages, pps
            scan_hopper.SCORED_PAGES, scan_hopper.FIRST_SCALE_OUT = scored, first_scale_out
            grid_dependency.DEPENDENT_LAUNCHES = dependent

        if only in (None, "scan-gluon") and idx.HOPPER_SCAN and scan_hopper.usable(ops[0], x["csa_index"]):
            shapes = (("registers", 2, 2, 2), ("bulk_ws", 4, 2, 2), ("bulk_ws", 2, 1, 2), ("bulk_ws", 2, 2, 1),
                      ("bulk_ws", 4, 3, 2), ("bulk_ws", 4, 3, 1), ("bulk_ws", 3, 3, 1))
            shipped = scan_gluon_default  # its last two: FIRST_SCALE_OUT, DEPENDENT_LAUNCHES
            sweep(f"fp8 scan gluon T={T} B={B} (loader, bulk-copy stages, programs/SM, pages scored at once, "
                  f"first block scale out, dependent launches)",
                  tuple(shape + (True, True) for shape in shapes)
                  # the shipped setting with each block scale multiplied, without and with dependent
                  # launches, then as it ships (the last row)
                  + (shipped[:-2] + (False, False), shipped[:-2] + (False, True), shipped),
                  set_scan_gluon,
                  lambda: idx.index_score_keys(x["iq"], x["iw"], x["csa_index"], x["block_table"], x["positions"],
                                               x["block_table"].shape[1] * idx.PAGE_ENTRIES, ops),
                  idx.scan_traffic(B, T, cfg.index_n_heads, cfg.index_head_dim), ceil, scores_from_keys)
        set_scan_gluon(*scan_gluon_default)

        def set_hca(heads, block_n, warps, stages, split):
            sp._GPU_LAUNCH[False] = dict(BLOCK_H=heads, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
            hca.HCA_KEYS_PER_SPLIT = split

        if only in (None, "hca"):
            with bk.triton_hca():  # the shapes swept are the Triton kernel's
                sweep(f"hca T={T} B={B} (heads, keys per tile, warps, stages, keys per split)",
                      ((64, 128, 8, 1, 512), (64, 128, 8, 1, 256), (64, 128, 8, 1, 768), (64, 128, 8, 1, 1024),
                       (64, 64, 8, 1, 512), (64, 64, 8, 2, 512),
                       # fewer heads per program: more programs for a batch-1 query (same bits?)
                       (32, 128, 8, 1, 512), (16, 128, 4, 1, 512), (16, 128, 8, 1, 512), (16, 64, 4, 1, 512)),
                      set_hca,
                      lambda: hca.hca_decode(x["q"], x["sink"], x["swa"], x["swa_table"], x["positions"],
                                             x["hca_main"], x["block_table"], bk.WINDOW, cfg.nope_head_dim),
                      hca.decode_traffic(B, T), ceil)
        sp._GPU_LAUNCH[False], hca.HCA_KEYS_PER_SPLIT = hca_default

        def set_gluon(schedule, split, short_keys, short_split):
            hopper.SCHEDULE = schedule
            hopper.KEYS_PER_SPLIT, hopper.SHORT_QUERY_KEYS, hopper.SHORT_QUERY_SPLIT = split, short_keys, short_split

        if only in (None, "hca-gluon") and hopper.usable(x["q"], x["swa"], x["hca_main"], bk.WINDOW, cfg.nope_head_dim):
            # the shipped rule under each schedule first (same split, so the same bits), then split sizes
            sweep(f"hca gluon T={T} B={B} (schedule, keys per split, short query keys, their split)",
                  tuple((sched, *gluon_default[1:]) for sched in hopper.SCHEDULES)
                  + tuple((sched, n, 0, n) for sched in hopper.SCHEDULES for n in (320, 512, 768)),
                  set_gluon,
                  lambda: hca.hca_decode(x["q"], x["sink"], x["swa"], x["swa_table"], x["positions"],
                                         x["hca_main"], x["block_table"], bk.WINDOW, cfg.nope_head_dim),
                  hca.decode_traffic(B, T), ceil)
        set_gluon(*gluon_default)

        def set_csa(heads, block_n, warps, split):
            sp._GPU_LAUNCH[True] = dict(BLOCK_H=heads, BLOCK_N=block_n, num_warps=warps, num_stages=1)
            sp.SPARSE_KEYS_PER_SPLIT = split

        topk = torch.randint(0, T // 4, (B, bk.INDEX_TOPK), device="cuda", dtype=torch.int32)

        def csa():
            return sp.sparse_mqa_decode(x["q"], x["sink"], x["swa"], x["swa_table"], x["positions"], x["csa_main"],
                                        x["block_table"], topk, bk.WINDOW, cfg.nope_head_dim)

        if only in (None, "csa"):
            with bk.triton_csa():  # the shapes swept are the Triton kernel's
                sweep(f"csa T={T} B={B} (heads, keys per tile, warps, keys per split)",
                      ((64, 128, 8, 256), (16, 16, 8, 256), (64, 128, 8, 128), (64, 64, 8, 128), (64, 64, 8, 256),
                       (32, 128, 8, 256), (16, 128, 4, 256), (16, 128, 8, 256), (16, 64, 4, 256)),
                      set_csa, csa, sp.decode_traffic(B, T), ceil)
        sp._GPU_LAUNCH[True], sp.SPARSE_KEYS_PER_SPLIT = csa_default

        def set_csa_gluon(schedule, split):
            hopper.SCHEDULE, hopper.SPARSE_KEYS_PER_SPLIT = schedule, split

        if only in (None, "csa-gluon") and hopper.usable(x["q"], x["swa"], x["csa_main"], bk.WINDOW, cfg.nope_head_dim):
            # the shipped split under each schedule first (the same bits), then split sizes
            sweep(f"csa gluon T={T} B={B} (schedule, keys per split)",
                  tuple((sched, csa_gluon_default[1]) for sched in hopper.SCHEDULES)
                  + tuple((csa_gluon_default[0], n) for n in (128, 320, 640)),
                  set_csa_gluon, csa, sp.decode_traffic(B, T), ceil)
        set_csa_gluon(*csa_gluon_default)
        del x, ops, topk
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
