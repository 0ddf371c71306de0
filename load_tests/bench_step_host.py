"""Where a graphed decode step's host time goes (GPU; flash-attn preset, bf16, random weights).

    python -m load_tests.bench_step_host [--contexts 8192,131072] [--batches 1] [--steps 20]

A batch-1 step is bound by whichever of the host and the GPU is slower; a profiler slows the host
several fold, so this times it without one: per step the wall time (forward and sync), the host
time to enqueue the forward (until it returns, before the sync) and its share of the step (near
100%: the host binds; well below: the GPU does), and the host time inside the
functions a step calls between and around its graph replays (wrapped with a timer; nested
entries are included in their callers). Then, per recorded graph of four, one replay's host
cost and its wall time (replays back to back, then a sync). Last, the step's timeline: CUDA
events around every piece's replay give, per piece, how long the GPU sat idle before it (waiting
for the host), its GPU time, and when the host had queued it. States are synthetic
(load_tests/bench_kernels.py synthetic_states), as in the step section there.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import re
import statistics
import time

import torch

from load_tests import bench_kernels as bk


def _timed(owner, name: str, label: str, acc: collections.Counter) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def timeline(model, states, steps: int) -> str:
    """Per piece of a graphed step, medians over `steps` steps (the first two dropped): GPU idle
    before it, its GPU time, and when the host had queued it, in ms from the step's start."""
    from workers.decode_graphs import DecodeGraphs

    log = []
    run = DecodeGraphs.run

    def timed_run(self, name, fn, *args, **kwargs):
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        out = run(self, name, fn, *args, **kwargs)
        after.record()
        log.append((re.sub(r"\.(rounding|pools)\d+", "", name), before, after, time.perf_counter()))
        return out

    begun: list[tuple[torch.cuda.Event, float]] = []

    @contextlib.contextmanager
    def started():  # the step's start, on the GPU and on the host, as decode_once enters it
        log.clear()
        start = torch.cuda.Event(enable_timing=True)
        begun.append((start, time.perf_counter()))
        start.record()
        yield

    DecodeGraphs.run = timed_run
    rows: dict[int, list[tuple[str, float, float, float]]] = collections.defaultdict(list)
    try:
        for _ in range(steps + 2):
            bk.decode_once(model, states, started)  # synchronises before it returns
            start, t0 = begun[-1]
            busy_until = 0.0
            for i, (name, before, after, queued) in enumerate(log):
                begin, end = start.elapsed_time(before), start.elapsed_time(after)
                rows[i].append((name, begin - busy_until, end - begin, (queued - t0) * 1e3))
                busy_until = end
    finally:
        DecodeGraphs.run = run
    lines = [f"  {'piece':36s} {'GPU idle before':>15s} {'GPU ms':>8s} {'queued at ms':>12s}"]
    idle = 0.0
    for samples in rows.values():
        med = [statistics.median(s[k] for s in samples[2:]) for k in (1, 2, 3)]
        idle += med[0]
        lines.append(f"  {samples[0][0]:36s} {med[0]:15.3f} {med[1]:8.3f} {med[2]:12.3f}")
    lines.append(f"  GPU idle before the pieces: {idle:.3f} ms")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="8192,131072")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    import workers.attention as attention
    from workers.decode_graphs import DecodeGraphs

    acc: collections.Counter = collections.Counter()
    _timed(DecodeGraphs, "run", "DecodeGraphs.run (replay and input copies)", acc)
    _timed(torch.cuda.CUDAGraph, "replay", "CUDAGraph.replay", acc)
    _timed(attention.Attention, "attend_states", "Attention.attend_states", acc)
    _timed(attention.Attention, "_decode_piece", "Attention._decode_piece", acc)
    _timed(attention, "decode_tables", "page_tables.decode_tables", acc)
    _timed(attention, "compress_plan", "paged_state.compress_plan", acc)
    cfg, _, model = bk.flash_model()
    rows = bk.encoded_rows(cfg)
    for P in bk.ints(args.contexts):
        for B in bk.ints(args.batches):
            states = bk.synthetic_states(cfg, model, min(P, cfg.max_position_embeddings - 2 * args.steps - 8), B, rows)
            for _ in range(4):
                bk.decode_once(model, states)
            acc.clear()
            wall, enqueue = [], []
            for _ in range(args.steps):
                for st in states:
                    st.reserve(1)
                bk.sync()
                t = time.perf_counter()
                model([(st, [5]) for st in states])
                enqueue.append(time.perf_counter() - t)
                bk.sync()
                wall.append(time.perf_counter() - t)
                for st in states:
                    st.release_old_window()
            step_s, host_s = statistics.median(wall), statistics.median(enqueue)
            print(f"context {P}, batch {B}: step {step_s * 1e3:.2f} ms, host enqueue {host_s * 1e3:.2f} ms = "
                  f"{host_s / step_s:.0%} of the step (medians of {args.steps})")
            for label, seconds in acc.most_common():
                print(f"  {label:45s} {seconds / args.steps * 1e3:.3f} ms per step")
            recorded = [(key[0], rec) for key, rec in model.graphs._recorded.items() if rec is not None]
            for name, rec in recorded[:: max(1, len(recorded) // 4)][:4]:
                n = 200
                bk.sync()
                t = time.perf_counter()
                for _ in range(n):
                    rec.graph.replay()
                host = time.perf_counter() - t
                bk.sync()
                print(f"  replay {name}: host {host / n * 1e6:.1f} us, wall {(time.perf_counter() - t) / n * 1e6:.1f} us")
            print(timeline(model, states, args.steps))
            # the graphs of these states go with them: replayed alone above, a graph recorded for
            # another context's states would read pages freed since (an H100 run hit an index
            # assert at 128K replaying the 8K run's decode pieces)
            states = model.graphs = None
            bk.empty_cache()


if __name__ == "__main__":
    main()
