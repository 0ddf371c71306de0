"""Decode kernels and the decode step against the roofline measured in the same run (issue 5).

    python -m load_tests.bench_kernels [--sections kernels,step,prefill,hf]
        [--contexts 8192,131072,1048576] [--batches 1,32] [--step-contexts 8192,131072,1048576]
        [--step-batches 1,32] [--torch-step-upto 1048576] [--hf-contexts 8192,32768,131072,1048576] [--hf-chunk 2048]
        [--prefill-chunks 8192,32768,131072] [--out results.json]

One GPU, flash-attn preset (64 heads x 512, top-512, indexer 64 x 128), compact layout, bf16.
Sections (each guarded: a failure prints its error and the others still run):
  ceilings   HBM copy rate (a 2 GiB device-to-device copy; bytes read + written per second) and
             bf16 matmul FLOP/s (8192^3);
  kernels    indexer_topk, sparse_mqa_decode (CSA), hca_decode at each context and batch: median
             time, bytes/s against the copy rate, FLOP/s against the matmul rate, the ceiling that
             binds (the larger of bytes/copy rate and FLOPs/matmul rate) and the fraction of it
             reached; bytes and FLOPs from each kernel module's own traffic formula;
  step       the whole decode step of the flash-attn preset (V4Model, random weights, rounding on)
             on states at position P whose pages hold valid encoded rows (no prefill run), with
             the kernels and with the torch reference: ms per step, the state-bytes floor
             (KV state a step must read / copy rate) and the bytes floor ("w+s floor": that
             state plus every weight a graphed step reads, all but the embedding table since
             its MoE runs every expert / copy rate); with the kernels, once with the decode
             CUDA graphs (workers/decode_graphs.py) and once without ("no-graph ms");
  hf         transformers' DeepseekV4ForCausalLM (same config and weights, bf16) decode after a
             prefill of P tokens through its cache in --hf-chunk pieces, where it fits ("did not
             run" and the error otherwise; contexts above one that ran out of memory are not
             tried);
  prefill    engine prefill throughput with one chunk of 8K, 32K, 128K tokens (kernels on);
  engine     (only when named) Engine.step() decoding B greedy requests after their prefills:
             ms per step and tokens/s as a replica's user sees them (scheduling and sampling in),
             against the state-bytes floor and, when hf runs too, transformers' tokens/s.
In the kernels section pages are distinct per batch row when they fit in half the free GPU
memory; otherwise every row's block table points at the same pages ("shared" in the output: then
repeated reads can hit in L2, so those rows overstate bandwidth). The step section always uses
distinct pages (its batch 32 at 1M needs about 11 GB). The ceilings run first in every
invocation, so `--sections` can split the work over several commands and each keeps its ratios
within one run.
Prints a table per section and one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager

import torch

from workers.config import preset

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu": a smoke run of this script (small shapes, interpreter)
WARMUP, REPEAT = (3, 20) if DEVICE == "cuda" else (0, 1)
INDEX_TOPK, WINDOW = 512, 128


# ---- timing and ceilings ----------------------------------------------------------------------

def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn, warmup: int = WARMUP, repeat: int = REPEAT) -> float:
    """Median seconds of fn() between CUDA events (wall time on the CPU smoke run)."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def graph_time(fn, calls: int = 10) -> float:
    """Median seconds of one fn() replayed from a CUDA graph holding `calls` of them: the GPU's
    own time, without the Python and launch overhead an eager call adds (a serving engine replays
    its decode step the same way). fn must already be compiled (cuda_time warms up)."""
    if DEVICE != "cuda":
        return cuda_time(fn)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up calls torch.cuda.graph asks for
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    t = cuda_time(g.replay) / calls
    del g
    return t


def ceilings() -> dict:
    n = 2 << 30 if DEVICE == "cuda" else 64 << 20
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    copy_s = cuda_time(lambda: dst.copy_(src))
    del src, dst
    m = 8192 if DEVICE == "cuda" else 512
    a = torch.randn(m, m, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=DEVICE)
    mm_s = cuda_time(lambda: a @ b)
    return {"copy_bytes_per_s": 2 * n / copy_s, "bf16_matmul_flop_per_s": 2 * m**3 / mm_s}


def roofline(seconds: float, nbytes: int, flops: int, ceil: dict) -> dict:
    t_mem, t_flop = nbytes / ceil["copy_bytes_per_s"], flops / ceil["bf16_matmul_flop_per_s"]
    return {
        "ms": seconds * 1e3, "bytes": nbytes, "flops": flops,
        "bytes_per_s": nbytes / seconds, "of_copy_rate": t_mem / seconds,
        "flop_per_s": flops / seconds, "of_matmul_rate": t_flop / seconds,
        "binds": "memory" if t_mem >= t_flop else "compute", "of_binding_ceiling": max(t_mem, t_flop) / seconds,
    }


@contextmanager
def kernels_mode(mode: str):
    old = os.environ.get("V4SERVE_KERNELS")
    os.environ["V4SERVE_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("V4SERVE_KERNELS")
        else:
            os.environ["V4SERVE_KERNELS"] = old


def fits(nbytes: int, share: float = 0.5) -> bool:
    free = torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 4 << 30
    return nbytes < share * free


# ---- valid page contents ------------------------------------------------------------------------

def fill_rows(store: torch.Tensor, rows: torch.Tensor, chunk: int = 1 << 20) -> None:
    """Every row of store [..., row_bytes] (contiguous) := a random one of `rows` [n, row_bytes]."""
    flat = store.view(-1, store.shape[-1])
    for s in range(0, flat.shape[0], chunk):
        e = min(flat.shape[0], s + chunk)
        flat[s:e] = rows[torch.randint(0, rows.shape[0], (e - s,), device=rows.device)]


def encoded_rows(cfg, n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """n valid compact main rows and indexer rows (encoded from Gaussian keys, as the model stores them)."""
    from workers.kv_layout import encode_index, encode_main

    main = encode_main(torch.randn(n, cfg.head_dim, device=DEVICE), cfg)
    index = encode_index(torch.randn(n, cfg.index_head_dim, device=DEVICE), cfg)
    return main, index


# ---- decode kernels -------------------------------------------------------------------------------

@contextmanager
def _switched_off(module, flag: str):
    old = getattr(module, flag)
    setattr(module, flag, False)
    try:
        yield
    finally:
        setattr(module, flag, old)


def triton_scan():
    """The Triton FP8 scan where a Hopper GPU would run the Gluon one (kernels/indexer_scan_hopper.py)."""
    from kernels import indexer_topk as idx

    return _switched_off(idx, "HOPPER_SCAN")


def triton_hca():
    """The Triton HCA kernel where a Hopper GPU would run the Gluon one (kernels/split_attention_hopper.py)."""
    from kernels import hca_decode as hca

    return _switched_off(hca, "HOPPER_HCA")


def triton_csa():
    """The Triton CSA decode kernel where a Hopper GPU would run the Gluon one (split_attention_hopper.py)."""
    from kernels import sparse_decode as sparse

    return _switched_off(sparse, "HOPPER_SPARSE")


def _with(switch, fn):
    with switch():
        return fn()


def kernel_inputs(cfg, context: int, B: int, rows: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Per-layer page views and tables for B queries at position context-1."""
    from kernels.block_quant import fp4_e2m1_block_qdq
    from workers.pools import BLOCK, SWA_PAGE

    main_rows, index_rows = rows
    RB, IB = main_rows.shape[1], index_rows.shape[1]
    n_blk = -(-context // BLOCK)
    per_block = 64 * (RB + IB) + 2 * RB
    shared = not fits(B * n_blk * per_block)
    pages = n_blk if shared else B * n_blk
    csa_main = torch.empty(pages, 64, RB, dtype=torch.uint8, device=DEVICE)
    csa_index = torch.empty(pages, 64, IB, dtype=torch.uint8, device=DEVICE)
    hca_main = torch.empty(pages, 2, RB, dtype=torch.uint8, device=DEVICE)
    swa = torch.empty(B * 3, SWA_PAGE, RB, dtype=torch.uint8, device=DEVICE)
    for store, src in ((csa_main, main_rows), (csa_index, index_rows), (hca_main, main_rows), (swa, main_rows)):
        fill_rows(store, src)
    blk = torch.arange(n_blk, device=DEVICE, dtype=torch.int32)
    block_table = blk.expand(B, -1).contiguous() if shared else (blk[None] + n_blk * torch.arange(B, device=DEVICE)[:, None]).to(torch.int32)
    t = context - 1
    first = max(0, t - WINDOW + 1) // SWA_PAGE
    swa_table = torch.zeros(B, 3, dtype=torch.int32, device=DEVICE)  # the window's pages (page_tables.py)
    for i in range(t // SWA_PAGE + 1 - first):
        swa_table[:, i] = torch.arange(B, device=DEVICE, dtype=torch.int32) * 3 + i
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return dict(
        shared=shared, swa=swa, swa_table=swa_table, csa_main=csa_main, csa_index=csa_index, hca_main=hca_main,
        block_table=block_table, positions=torch.full((B,), t, dtype=torch.int32, device=DEVICE),
        q=torch.randn(B, cfg.num_attention_heads, cfg.head_dim, device=DEVICE, generator=g).to(torch.bfloat16),
        sink=torch.randn(cfg.num_attention_heads, device=DEVICE, generator=g),
        # on the FP4 grid, as the model's indexer queries are (the scan needs one bf16 part for those)
        iq=fp4_e2m1_block_qdq(torch.randn(B, cfg.index_n_heads, cfg.index_head_dim, device=DEVICE, generator=g), 32),
        iw=torch.randn(B, cfg.index_n_heads, device=DEVICE, generator=g),
    )


def csa_picks(context: int, B: int) -> torch.Tensor:
    """B queries' CSA top-k picks [B, INDEX_TOPK] at position context-1: random visible entries,
    or every visible one and -1 after them where fewer than INDEX_TOPK are."""
    n_vis = context // 4
    if n_vis >= INDEX_TOPK:
        return torch.randint(0, n_vis, (B, INDEX_TOPK), device=DEVICE, dtype=torch.int32)
    return torch.where(torch.arange(INDEX_TOPK, device=DEVICE) < n_vis,
                       torch.arange(INDEX_TOPK, device=DEVICE), -1).to(torch.int32).expand(B, -1)


def kernel_section(cfg, ceil: dict, contexts: list[int], batches: list[int]) -> list[dict]:
    from kernels import hca_decode as hca
    from kernels import indexer_topk as idx
    from kernels import sparse_decode as sparse

    rows = encoded_rows(cfg)
    nope, out = cfg.nope_head_dim, []
    for T in contexts:
        for B in batches:
            try:
                x = kernel_inputs(cfg, T, B, rows)
            except torch.OutOfMemoryError as e:
                out.append({"kernel": "all", "context": T, "batch": B, "error": f"out of memory: {e}"})
                continue
            topk = csa_picks(T, B)
            # the scan's query operands, computed once as a decode step does inside its graph
            ops = idx.query_operands(x["iq"], x["iw"])
            ops_general = (*ops[:3], torch.full_like(ops[3], idx.MODE_GENERAL), ops[4])
            runs = {
                "indexer_topk": (lambda: idx.indexer_topk(x["iq"], x["iw"], x["csa_index"], x["block_table"],
                                                          x["positions"], INDEX_TOPK, ops),
                                 idx.scan_traffic(B, T, cfg.index_n_heads, cfg.index_head_dim)),
                # the scan alone (score keys, no top-k): what scan_traffic counts
                "indexer_scan": (lambda: idx.index_score_keys(x["iq"], x["iw"], x["csa_index"], x["block_table"],
                                                              x["positions"], x["block_table"].shape[1] * idx.PAGE_ENTRIES,
                                                              ops),
                                 idx.scan_traffic(B, T, cfg.index_n_heads, cfg.index_head_dim)),
                # the Triton FP8 scan, where Hopper runs the Gluon one (indexer_scan_hopper.py)
                "indexer_scan_triton": (lambda: _with(triton_scan, lambda: idx.index_score_keys(
                    x["iq"], x["iw"], x["csa_index"], x["block_table"], x["positions"],
                    x["block_table"].shape[1] * idx.PAGE_ENTRIES, ops)),
                    idx.scan_traffic(B, T, cfg.index_n_heads, cfg.index_head_dim)),
                # the same queries through the general scan (three BF16 parts, tl.dot_scaled)
                "indexer_scan_general": (lambda: idx.index_score_keys(
                    x["iq"], x["iw"], x["csa_index"], x["block_table"], x["positions"],
                    x["block_table"].shape[1] * idx.PAGE_ENTRIES, ops_general),
                    idx.scan_traffic(B, T, cfg.index_n_heads, cfg.index_head_dim)),
                "sparse_mqa_decode": (lambda: sparse.sparse_mqa_decode(x["q"], x["sink"], x["swa"], x["swa_table"],
                                                                       x["positions"], x["csa_main"], x["block_table"],
                                                                       topk, WINDOW, nope),
                                      sparse.decode_traffic(B, T)),
                # the Triton kernel, where Hopper runs the Gluon one (split_attention_hopper.py)
                "sparse_mqa_decode_triton": (lambda: _with(triton_csa, lambda: sparse.sparse_mqa_decode(
                    x["q"], x["sink"], x["swa"], x["swa_table"], x["positions"], x["csa_main"], x["block_table"],
                    topk, WINDOW, nope)),
                    sparse.decode_traffic(B, T)),
                "hca_decode": (lambda: hca.hca_decode(x["q"], x["sink"], x["swa"], x["swa_table"], x["positions"],
                                                      x["hca_main"], x["block_table"], WINDOW, nope),
                               hca.decode_traffic(B, T)),
                # the Triton kernel, where Hopper runs the Gluon one (split_attention_hopper.py)
                "hca_decode_triton": (lambda: _with(triton_hca, lambda: hca.hca_decode(
                    x["q"], x["sink"], x["swa"], x["swa_table"], x["positions"], x["hca_main"], x["block_table"],
                    WINDOW, nope)),
                    hca.decode_traffic(B, T)),
            }
            for name, (fn, (nbytes, flops)) in runs.items():
                try:
                    eager = cuda_time(fn)
                    r = {**roofline(graph_time(fn), nbytes, flops, ceil), "eager_ms": eager * 1e3}
                except Exception as e:  # one kernel failing must not hide the others' figures
                    r = {"error": f"{type(e).__name__}: {e}"}
                if name in ("sparse_mqa_decode", "sparse_mqa_decode_triton", "hca_decode", "hca_decode_triton"):
                    # the launch shape that ran: the Gluon split programs where their switch is on and
                    # they take these pages, else the Triton kernel's fixed shape
                    sparse_kind = name.startswith("sparse")
                    switch = {"sparse_mqa_decode": sparse.HOPPER_SPARSE, "hca_decode": hca.HOPPER_HCA}.get(name, False)
                    gluon = switch and hca.hopper.usable(x["q"], x["swa"], x["csa_main" if sparse_kind else "hca_main"],
                                                         WINDOW, nope)
                    r["config"] = "gluon" if gluon else str(sparse._GPU_LAUNCH[sparse_kind])
                out.append({"kernel": name, "context": T, "batch": B, "pages": "shared" if x["shared"] else "distinct", **r})
            del x, topk, ops, ops_general
            empty_cache()
    return out


# ---- the whole decode step ----------------------------------------------------------------------

def flash_model():
    from workers.init import random_weights
    from workers.model import V4Model

    cfg = preset("flash-attn")
    weights = random_weights(cfg, 0)
    return cfg, weights, V4Model(cfg, dtype=torch.bfloat16, rounding=True).load_weights(weights).to(DEVICE)


def state_bytes_per_token(cfg, T: int) -> int:
    """KV state one decode query at position T-1 must read (v4-architecture.md §9): every layer's
    window; CSA the top-k main entries and every indexer key; HCA every entry."""
    from workers.capacity import indexer_entry_bytes, main_entry_bytes
    from workers.config import CSA, HCA

    main, index = main_entry_bytes(cfg), indexer_entry_bytes(cfg)
    total = 0
    for r in cfg.compress_ratios:
        total += min(T, cfg.sliding_window) * main
        if r == CSA:
            total += min(cfg.index_topk, T // CSA) * main + (T // CSA) * index
        elif r == HCA:
            total += (T // HCA) * main
    return total


def step_weight_bytes(model) -> int:
    """Weight bytes a graphed decode step reads: every parameter but the embedding table (a
    step gathers a few of its rows), the dense MoE's every expert included."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith("embed."))


def synthetic_states(cfg, model, P: int | list[int], B: int, rows, room: int = 64,
                     random_index_codes: bool = False) -> list:
    """B request states at position P (or at P[b] each: a batch of mixed lengths) on distinct
    pages of valid rows (compressor state random), with room for `room` more tokens; as
    load_tests/bench_transfer.py fakes a state without a prefill. Each row is one of `rows`
    (encoded_rows' 4,096), so the indexer's scores repeat and tie; `random_index_codes` gives every
    indexer row random FP4 codes under its row's block scales instead, so that nearly every key is
    its own."""
    from workers.paged_state import PagedRequestState
    from workers.pools import BLOCK, KVPools, PoolSizes

    positions = [P] * B if isinstance(P, int) else list(P)
    if len(positions) != B:
        raise ValueError(f"{len(positions)} positions for {B} states")
    n_blk = sum(-(-(p + room) // BLOCK) for p in positions)
    pools = KVPools(cfg, PoolSizes(blocks=n_blk, swa=6 * B, comp=B, overlap=1), "compact", model.dtype, DEVICE)
    states = []
    for p in positions:
        st = PagedRequestState(pools)
        st.prepare_import(p)
        for ls in st.layers:
            for f in ls.families():
                ls.count[f] = p // ls.ratio
            for comp in ls.compressors.values():
                comp.n_open = p % ls.ratio
                comp.has_overlap = comp._ov_kv is not None and p >= 4
        states.append(st)
    main_rows, index_rows = rows
    for store, src in ((pools.csa_main, main_rows), (pools.csa_index, index_rows), (pools.hca_main, main_rows),
                       (pools.swa, main_rows)):
        fill_rows(store, src)
    if random_index_codes:  # a row's codes come first, its block scales after them (kv_layout)
        pools.csa_index[..., : cfg.index_head_dim // 2].random_(0, 256)
    pools.comp.normal_()
    return states


@torch.no_grad()
def decode_once(model, states, around=contextlib.nullcontext) -> float:
    """One batched decode forward as the engine runs it (reserve a position, forward, release the
    window page left behind), inside `around()` (a profiler); returns its seconds."""
    for st in states:
        st.reserve(1)
    sync()
    with around():
        t = time.perf_counter()
        model([(st, [5]) for st in states])
        sync()
        t = time.perf_counter() - t
    for st in states:
        st.release_old_window()
    return t


def step_time(model, states, steps: int = 20) -> float:
    """Median seconds of one batched decode forward, after two untimed ones."""
    return statistics.median([decode_once(model, states) for _ in range(steps + 2)][2:])


def profile_step(model, states) -> str:
    """torch.profiler's table of one decode step (after step_time warmed it up): top GPU kernels."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    decode_once(model, states, lambda: prof)
    avg = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    gpu_us = sum(e.device_time for e in kernels)
    head = f"GPU kernels in the step: {len(kernels)}, {gpu_us / 1e3:.3f} ms of GPU time\n" + idle_gaps(kernels)
    return (head + avg.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
            + avg.table(sort_by="count", row_limit=40, max_name_column_width=70) + host_profile(model, states))


def idle_gaps(kernels, long_us: float = 4.0, show: int = 12) -> str:
    """Where the GPU waits within the step: gaps between one kernel's end and the next one's start.
    Short gaps are the launches inside a graph; long ones are the host's (between graphs, eager
    work), named by the kernels around them."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in kernels)
    gaps, busy_until = [], spans[0][1]  # the latest end so far: kernels of one graph may overlap
    for (_, _, before), (start, end, after) in zip(spans, spans[1:]):
        if start > busy_until:
            gaps.append((start - busy_until, before, after))
        busy_until = max(busy_until, end)
    long = sorted((g for g in gaps if g[0] >= long_us), reverse=True)
    span = spans[-1][1] - spans[0][0]
    lines = [f"first kernel to last: {span / 1e3:.3f} ms; idle {sum(g[0] for g in gaps) / 1e3:.3f} ms: "
             f"{sum(g[0] for g in gaps if g[0] < long_us) / 1e3:.3f} ms in {sum(g[0] < long_us for g in gaps)} gaps "
             f"under {long_us:g} us, {sum(g[0] for g in long) / 1e3:.3f} ms in {len(long)} longer ones"]
    lines += [f"  {us:8.1f} us after {a[:60]} before {b[:60]}" for us, a, b in long[:show]]
    return "\n".join(lines) + "\n"


def host_profile(model, states) -> str:
    """cProfile of one decode step: where the host's time goes (the step is bound by Python)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    decode_once(model, states, lambda: prof)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    return buf.getvalue()


def step_section(cfg, model, ceil: dict, contexts: list[int], batches: list[int], torch_upto: int,
                 profile: bool = False) -> list[dict]:
    rows, out, weight_bytes = encoded_rows(cfg), [], step_weight_bytes(model)
    for P in contexts:
        for B in batches:
            # every token the section decodes (22 timed, 6 without graphs, 2 profiled, 5 on the
            # reference) must stay below the model's last position (1M = 2**20)
            pos = min(P, cfg.max_position_embeddings - 48)
            row = {"context": P, "position": pos, "batch": B}
            try:
                states = synthetic_states(cfg, model, pos, B, rows)
                floor_s = B * state_bytes_per_token(cfg, pos) / ceil["copy_bytes_per_s"]
                bytes_floor_s = floor_s + weight_bytes / ceil["copy_bytes_per_s"]
                row.update(state_bytes=B * state_bytes_per_token(cfg, pos), floor_ms=floor_s * 1e3,
                           weight_bytes=weight_bytes, bytes_floor_ms=bytes_floor_s * 1e3)
                with kernels_mode("auto"):
                    s = step_time(model, states)
                row.update(kernels_ms=s * 1e3, kernels_tok_s=B / s, floor_over_kernels=floor_s / s,
                           bytes_floor_over_kernels=bytes_floor_s / s,
                           graphs=len(model.graphs) if model.graphs is not None else 0)
                if model.graphs is not None:  # the same step without the decode graphs
                    model.cuda_graphs = False
                    try:
                        with kernels_mode("auto"):
                            row["eager_ms"] = step_time(model, states, steps=4) * 1e3
                    finally:
                        model.cuda_graphs = True
                if profile:
                    with kernels_mode("auto"):
                        row["profile"] = profile_step(model, states)
                    print(f"step at {P}, batch {B}: where the time goes\n{row['profile']}", flush=True)
                if P <= torch_upto and B == 1:
                    with kernels_mode("torch"):
                        s = step_time(model, states, steps=3)
                    row.update(torch_ms=s * 1e3, torch_tok_s=B / s)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            out.append(row)
            states = None
            empty_cache()
    return out


# ---- transformers -----------------------------------------------------------------------------------

@torch.no_grad()
def hf_section(cfg, weights, contexts: list[int], steps: int = 8, chunk: int = 2048) -> list[dict]:
    """transformers' decode after its own prefill of P tokens, shortest context first; once one
    context runs out of memory the longer ones are not tried. The prefill goes in `chunk`-token
    pieces through its cache (it supports prefill after prefill): in one piece its eager
    attention asks for 64 heads x P^2 scores, 128 GiB at 32K; in pieces its CSA indexer's scores
    (chunk x 64 heads x P/4 keys) are what bounds the length."""
    from .transformers_peer import hf_model_from

    with tempfile.TemporaryDirectory() as d:
        hf = hf_model_from(cfg, weights, d).to(torch.bfloat16).to(DEVICE)
    out, oom = [], None
    for P in sorted(contexts):
        if oom is not None:
            out.append({"context": P, "hf": "did not run", "error": f"out of memory at {oom} already"})
            continue
        cache = None
        try:
            ids = torch.randint(2, cfg.vocab_size, (1, P), device=DEVICE)
            t = time.perf_counter()
            for lo in range(0, P, chunk):
                cache = hf(ids[:, lo : lo + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
            sync()
            prefill_s = time.perf_counter() - t
            tok = torch.tensor([[5]], device=DEVICE)
            times = []
            for i in range(steps + 2):
                sync()
                t = time.perf_counter()
                cache = hf(tok, past_key_values=cache, use_cache=True).past_key_values
                sync()
                if i >= 2:
                    times.append(time.perf_counter() - t)
            s = statistics.median(times)
            out.append({"context": P, "hf_ms": s * 1e3, "hf_tok_s": 1 / s, "hf_prefill_s": prefill_s, "hf_chunk": chunk})
        except torch.OutOfMemoryError as e:  # the expected way for it not to run at long contexts
            oom = P
            out.append({"context": P, "hf": "did not run", "error": f"OutOfMemoryError: {str(e)[:200]}"})
        cache = None
        empty_cache()
    return out


# ---- prefill ---------------------------------------------------------------------------------------

def prefill_section(cfg, model, chunks: list[int]) -> list[dict]:
    from workers.engine import Engine, EngineConfig
    from workers.sampling import SamplingParams

    out = []
    for n in chunks:
        try:
            eng = Engine(model, EngineConfig(budget_bytes=4 << 30, max_requests=1, prefill_chunk=n,
                                             max_batch_tokens=n, prefix_cache=False))
            times = []
            for i in range(3):
                eng.add_request(torch.randint(2, cfg.vocab_size, (n,)).tolist(), SamplingParams(max_tokens=1, temperature=0))
                sync()
                t = time.perf_counter()
                eng.run()
                sync()
                if i:  # the first one compiles the kernels
                    times.append(time.perf_counter() - t)
            s = statistics.median(times)
            out.append({"chunk": n, "s": s, "tok_s": n / s})
        except Exception as e:
            out.append({"chunk": n, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        eng = None
        empty_cache()
    return out


# ---- engine decode -----------------------------------------------------------------------------------

def engine_section(cfg, model, ceil: dict, contexts: list[int], batches: list[int], steps: int = 12) -> list[dict]:
    """What a user of one replica sees: Engine.step() (scheduling, the forward, sampling, stop
    checks) over `steps` decode steps of B greedy requests after prefills of P tokens, against
    the state-bytes floor (as the step section)."""
    from workers.engine import Engine, EngineConfig
    from workers.pools import BLOCK, page_bytes
    from workers.sampling import SamplingParams

    out = []
    for P in contexts:
        for B in batches:
            eng = None
            try:
                # Requests whose prefill ends first decode while the others prefill (one token per
                # step, at most P * B / 8192 steps), so none may run out of tokens or pages before
                # the timed steps: room for `extra` tokens each, and 1 GiB for windows and slots.
                extra = P * B // 8192 + steps + 16
                blocks = B * -(-(P + extra) // BLOCK)
                eng = Engine(model, EngineConfig(layout="compact", budget_bytes=blocks * page_bytes(cfg)["blocks"] + (1 << 30),
                                                 max_requests=B, prefill_chunk=8192, max_batch_tokens=8192,
                                                 prefix_cache=False))
                greedy = SamplingParams(max_tokens=extra, temperature=0, ignore_eos=True)
                for _ in range(B):
                    eng.add_request(torch.randint(2, cfg.vocab_size, (P,)).tolist(), greedy)
                while eng.waiting or any(seq.prefilling for seq in eng.running):  # every prefill done
                    eng.step()
                for _ in range(2):  # then two steps of every request decoding (graphs recorded)
                    eng.step()
                assert len(eng.running) == B, "a request finished or was preempted before the timed steps"
                sync()
                t = time.perf_counter()
                for _ in range(steps):
                    eng.step()
                sync()
                s = (time.perf_counter() - t) / steps
                floor_s = B * state_bytes_per_token(cfg, P) / ceil["copy_bytes_per_s"]
                out.append({"context": P, "batch": B, "step_ms": s * 1e3, "tok_s": B / s, "floor_ms": floor_s * 1e3,
                            "floor_over_step": floor_s / s})
            except Exception as e:
                out.append({"context": P, "batch": B, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            eng = None
            empty_cache()
    return out


# ---- report ----------------------------------------------------------------------------------------

def print_tables(res: dict) -> None:
    c = res.get("ceilings", {})
    if c:
        print(f"\nceilings: HBM copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {c['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s")
    if res.get("kernels"):
        print(f"\n{'kernel':24} {'ctx':>8} {'B':>3} {'pages':>8} {'ms':>8} {'eager ms':>8} {'GB/s':>8} {'%copy':>6} {'TFLOP/s':>8} {'%mm':>6} {'binds':>8} {'%bind':>6}")
    for r in res.get("kernels", []):
        if "error" in r:
            print(f"{r['kernel']:24} {r['context']:>8} {r['batch']:>3} error: {r['error']}")
            continue
        print(f"{r['kernel']:24} {r['context']:>8} {r['batch']:>3} {r['pages']:>8} {r['ms']:8.3f} {r['eager_ms']:8.3f} {r['bytes_per_s'] / 1e9:8.0f} "
              f"{r['of_copy_rate']:6.1%} {r['flop_per_s'] / 1e12:8.1f} {r['of_matmul_rate']:6.1%} {r['binds']:>8} {r['of_binding_ceiling']:6.1%}"
              f"  {r.get('config', '')}")
    hf = {r["context"]: r for r in res.get("hf", [])}
    if res.get("step"):
        print(f"\n{'step ctx':>9} {'B':>3} {'floor ms':>9} {'w+s floor':>9} {'kernels ms':>11} {'no-graph ms':>11} {'floor/k':>8} {'w+s/k':>6} {'torch ms':>9} {'hf ms':>9} {'k/hf tok/s':>11}")
    for r in res.get("step", []):
        if "error" in r:
            print(f"{r['context']:>9} {r['batch']:>3} error: {r['error']}")
            continue
        h = hf.get(r["context"], {})
        ratio = f"{h['hf_ms'] / r['kernels_ms'] * r['batch']:11.1f}" if "hf_ms" in h else f"{'-':>11}"
        torch_ms = f"{r['torch_ms']:9.1f}" if "torch_ms" in r else f"{'-':>9}"
        hf_ms = f"{h['hf_ms']:9.1f}" if "hf_ms" in h else f"{h.get('hf', '-'):>9}"
        eager = f"{r['eager_ms']:11.2f}" if "eager_ms" in r else f"{'-':>11}"
        print(f"{r['context']:>9} {r['batch']:>3} {r['floor_ms']:9.3f} {r['bytes_floor_ms']:9.3f} {r['kernels_ms']:11.2f} "
              f"{eager} {r['floor_over_kernels']:8.1%} {r['bytes_floor_over_kernels']:6.1%} {torch_ms} {hf_ms} {ratio}")
    for r in res.get("hf", []):
        if "hf_ms" in r:
            print(f"transformers decode at {r['context']}: {r['hf_ms']:.1f} ms/token")
        else:
            print(f"transformers decode at {r['context']}: did not run ({r.get('error', '')})")
    for r in res.get("engine", []):
        if "tok_s" not in r:
            print(f"engine decode at {r['context']:>7}, batch {r['batch']:>3}: error: {r['error']}")
            continue
        h = hf.get(r["context"], {})
        vs_hf = f", {h['hf_ms'] / r['step_ms'] * r['batch']:.1f}x transformers' tok/s" if "hf_ms" in h else ""
        print(f"engine decode at {r['context']:>7}, batch {r['batch']:>3}: {r['step_ms']:7.2f} ms per step, "
              f"{r['tok_s']:8.0f} tok/s, floor {r['floor_ms']:.3f} ms ({r['floor_over_step']:.1%} of the step){vs_hf}")
    for r in res.get("prefill", []):
        print(f"prefill chunk {r['chunk']:>7}: " + (f"{r['tok_s']:10.0f} tok/s ({r['s']:.2f} s)" if "tok_s" in r else f"error: {r['error']}"))


def guarded(res: dict, name: str, fn) -> None:
    """res[name] = fn(); a failure is printed and recorded, and the next section still runs."""
    try:
        res[name] = fn()
    except Exception as e:
        traceback.print_exc()
        res[name + "_error"] = f"{type(e).__name__}: {e}"
    print(f"[{name}] done", flush=True)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="8192,131072,1048576")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--step-contexts", default="8192,131072,1048576")
    ap.add_argument("--step-batches", default="1,32")
    ap.add_argument("--torch-step-upto", type=int, default=1048576, help="torch reference step for batch 1 up to this context")
    ap.add_argument("--hf-contexts", default="8192,32768,131072,1048576")
    ap.add_argument("--hf-chunk", type=int, default=2048, help="transformers' prefill goes in pieces of this many tokens")
    ap.add_argument("--prefill-chunks", default="8192,32768,131072")
    ap.add_argument("--engine-contexts", default="8192", help="prompt lengths of the engine section (batches: --step-batches)")
    ap.add_argument("--sections", default="kernels,step,prefill,hf", help="which sections run (ceilings always do)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's kernel table of each decode step")
    a = ap.parse_args()
    torch.manual_seed(0)
    import triton

    res: dict = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)", "torch": torch.__version__, "triton": triton.__version__,
                 "command": "python -m load_tests.bench_kernels " + " ".join(sys.argv[1:])}
    want = set(a.sections.split(","))
    guarded(res, "ceilings", ceilings)  # every run measures its own ceilings: ratios are within one run
    if "ceilings" in res:
        cfg = preset("flash-attn")
        if "kernels" in want:
            guarded(res, "kernels", lambda: kernel_section(cfg, res["ceilings"], ints(a.contexts), ints(a.batches)))
        if want & {"step", "prefill", "hf", "engine"}:
            cfg, weights, model = flash_model()
        if "step" in want:
            guarded(res, "step", lambda: step_section(cfg, model, res["ceilings"], ints(a.step_contexts),
                                                      ints(a.step_batches), a.torch_step_upto, a.profile))
        if "engine" in want:
            guarded(res, "engine", lambda: engine_section(cfg, model, res["ceilings"], ints(a.engine_contexts),
                                                          ints(a.step_batches)))
        if "prefill" in want:
            guarded(res, "prefill", lambda: prefill_section(cfg, model, ints(a.prefill_chunks)))
        if "hf" in want:
            model = None
            empty_cache()
            guarded(res, "hf", lambda: hf_section(cfg, weights, ints(a.hf_contexts), chunk=a.hf_chunk))
    print_tables(res)
    line = json.dumps(res)
    print(line)
    if a.out:
        with open(a.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
