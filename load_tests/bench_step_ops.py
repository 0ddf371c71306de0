"""Operations launched per decode step with the kernels on: torch operations and Triton launches.

    python -m load_tests.bench_step_ops [--context 1024] [--batches 1,4] [--top 15]

On a GPU the decode step is bound by Python, not by the device (kernels/RESULTS.md: the GPU works
4-10 ms of a 49-178 ms step), and the cost tracks the number of operations dispatched per step.
That number does not depend on the device: without CUDA this runs the kernel path in Triton's
interpreter (TRITON_INTERPRET=1, V4SERVE_KERNELS=triton) and counts what a GPU run would launch,
so it measures the overhead on the 2-core dev box as well. flash-attn preset, states at position
`context` on compact pages (as bench_kernels' step section), 4 steps (one CSA window cycle:
every request closes a CSA entry in one of them). Torch operations are counted at the dispatcher
(views included; those inside the interpreter's emulation of a kernel are not); Triton
launches are counted per kernel call. Prints, per batch, each step's counts, the mean per step,
and the growth per extra request, the `--top` call sites of the last step, and the ratio to
transformers' DeepseekV4ForCausalLM (same preset and weights) counted the same way for one
decode token after a prefill of `context` tokens (its peer in these counts: the eager
implementation a user would otherwise run). `--graphs` counts a step as it runs on a GPU with
the decode CUDA graphs (workers/decode_graphs.py): each recorded piece counts as its replay
(one copy per input not produced by an earlier piece, and the launch), everything between pieces as above.
"""

from __future__ import annotations

import argparse
import collections
import os
import traceback

import torch

if not torch.cuda.is_available():  # the kernel path, emulated: must be set before triton imports
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("BENCH_DEVICE", "cpu")
    os.environ["V4SERVE_KERNELS"] = "triton"

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from workers.decode_graphs import DecodeGraphs  # noqa: E402

from . import bench_kernels as bk  # noqa: E402

OURS = ("workers/", "kernels/")


def call_site(stack) -> str:
    """The innermost frame of ours ("workers/attention.py:123 forward"), or "?" for others' code."""
    for f in reversed(stack):
        for d in OURS:
            at = f.filename.rfind(d)
            if at >= 0:
                return f"{f.filename[at:]}:{f.lineno} {f.name}"
    return "?"


class ReplayedPieces(DecodeGraphs):
    """Runs a step's state-free pieces eagerly but has the counters see what a graph replay would
    dispatch instead: one copy per input that is not an earlier piece's output, and the replay
    (workers/decode_graphs.py)."""

    inside = 0  # > 0 while a piece runs: its operations are not counted

    def __init__(self):
        super().__init__(capture=False)
        self.charged: collections.Counter = collections.Counter()
        self._produced: dict[int, torch.Tensor] = {}  # outputs of earlier pieces, read in place

    def run(self, name, fn, *args, warmup_args=None):
        copied = sum(self._produced.get(id(a)) is not a for a in args)
        self.charged["workers/decode_graphs.py replay (inputs copied + 1 launch)"] += copied + 1
        ReplayedPieces.inside += 1
        try:  # no capture here, so no warm-up either: warmup_args is DecodeGraphs.run's, unused
            out = super().run(name, fn, *args, warmup_args=warmup_args)
        finally:
            ReplayedPieces.inside -= 1
        # eager pieces return fresh tensors each step: the ones of this step stand for the buffers
        self._produced = {**self._produced, **{id(t): t for t in tree_leaves(out) if isinstance(t, torch.Tensor)}}
        return out


class OpCounter(TorchDispatchMode):
    """Counts torch operations by call site, skipping those the Triton interpreter issues."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        stack = traceback.extract_stack(limit=30)
        if not ReplayedPieces.inside and not any("triton/runtime/interpreter" in f.filename for f in stack):
            self.sites[call_site(stack)] += 1
        return func(*args, **(kwargs or {}))


class LaunchCounter:
    """Counts Triton kernel launches (compiled or interpreted) while active."""

    def __init__(self):
        import triton.runtime.interpreter as interp
        import triton.runtime.jit as jit

        self.n = 0
        self._patched = [(cls, cls.run) for cls in (jit.JITFunction, interp.InterpretedFunction)]

    def __enter__(self):
        for cls, run in self._patched:
            def counted(fn_self, *a, _run=run, **k):
                self.n += not ReplayedPieces.inside
                return _run(fn_self, *a, **k)
            cls.run = counted
        return self

    def __exit__(self, *exc):
        for cls, run in self._patched:
            cls.run = run


@torch.no_grad()
def count_steps(model, states, steps: int = 4) -> list[tuple[int, int, collections.Counter]]:
    out = []
    for _ in range(steps):
        for st in states:
            st.reserve(1)
        ops = OpCounter()
        if model.graphs is not None:
            model.graphs.charged.clear()
            model.graphs._produced = {}
        with LaunchCounter() as launches, ops:
            model([(st, [5]) for st in states])
        for st in states:
            st.release_old_window()
        if model.graphs is not None:
            ops.sites.update(model.graphs.charged)
        out.append((sum(ops.sites.values()), launches.n, ops.sites))
    return out


@torch.no_grad()
def transformers_step_ops(cfg, weights, context: int, batch: int) -> int:
    """Operations transformers' DeepseekV4ForCausalLM (same config and weights) dispatches for one
    decode token per sequence after a prefill of `context` tokens, batch sequences of one length."""
    import tempfile

    from .transformers_peer import hf_model_from

    with tempfile.TemporaryDirectory() as d:
        hf = hf_model_from(cfg, weights, d).to(torch.bfloat16)
    ids = torch.randint(2, cfg.vocab_size, (batch, context))
    cache = hf(ids, use_cache=True, logits_to_keep=1).past_key_values
    ops = OpCounter()
    with ops:
        hf(torch.full((batch, 1), 5), past_key_values=cache, use_cache=True)
    return sum(ops.sites.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no-peer", action="store_true", help="skip transformers' count")
    ap.add_argument("--graphs", action="store_true",
                    help="count a graphed step: each state-free piece as its replay (input copies + 1)")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg, weights, model = bk.flash_model()
    if a.graphs:
        model.graphs = ReplayedPieces()
    rows = bk.encoded_rows(cfg, 256)
    means = {}
    for B in bk.ints(a.batches):
        steps = count_steps(model, bk.synthetic_states(cfg, model, a.context, B, rows))
        per = [o + n for o, n, _ in steps]
        means[B] = sum(per) / len(per)
        print(f"batch {B}: per step torch ops + Triton launches = "
              + ", ".join(f"{o} + {n}" for o, n, _ in steps) + f"; mean {means[B]:.0f}", flush=True)
        for site, n in steps[-1][2].most_common(a.top):
            print(f"    {n:5d}  {site}")
        if not a.no_peer:
            peer = transformers_step_ops(cfg, weights, a.context, B)
            print(f"    transformers, same preset and weights: {peer} operations for that step; "
                  f"ours / transformers = {means[B] / peer:.2f}", flush=True)
    bs = sorted(means)
    if len(bs) > 1:
        lo, hi = bs[0], bs[-1]
        print(f"per extra request: {(means[hi] - means[lo]) / (hi - lo):.0f} operations per step")


if __name__ == "__main__":
    main()
