"""A module-level switch of the kernels, A/B in the decode step, in one process (GPU; flash-attn
preset, bf16, random weights).

    python -m load_tests.bench_step_ab --set kernels.indexer_topk.ROW_LENGTHS=False,True
        [--cases 8192x1,131072x1,131072x32] [--rounds 3] [--steps 12]

The step is bench_kernels' (synthetic states, decode graphs). A case CxB is B requests at context
C; parts joined by `+` make a batch of mixed lengths, e.g. `1048576x1+8192x31` (one request of 1M
beside 31 of 8K, in one block table as wide as the longest). For each case the switch takes each
value in turn, --rounds times: the decode graphs are recaptured with it (they hold the launches'
constants) and the step's median ms over --steps is taken. First, on fresh states of the first
case, one step's logits with each value must be the first value's bits: a switch of launch
scheduling or tiles must not move a result. Prints a line per case and value (each round's ms and
the median's ratio to the first value's), then one JSON line. Machines differ by up to 30%, so
only ratios within one run mean anything (kernels/RESULTS.md).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import statistics
from contextlib import contextmanager

import torch

from load_tests import bench_kernels as bk


def parse_switch(spec: str):
    """'package.module.NAME=v1,v2' -> (module, NAME, [v1, v2]); the values are Python literals and
    the attribute must exist (a misspelt switch would otherwise time the same code twice)."""
    target, _, values = spec.partition("=")
    module_name, _, attr = target.rpartition(".")
    if not module_name or not attr or not values:
        raise SystemExit(f"--set {spec!r}: expected package.module.NAME=value,value")
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise SystemExit(f"--set: {module_name} has no {attr}")
    vals = [ast.literal_eval(v.strip()) for v in values.split(",")]
    if len(vals) < 2:
        raise SystemExit("--set: give at least two values to compare")
    return module, attr, vals


def one_step_logits(model, states) -> torch.Tensor:
    """The logits of one decode step of every state (token 5), as decode_once runs it."""
    for st in states:
        st.reserve(1)
    with bk.kernels_mode("auto"):
        out = model([(st, [5]) for st in states])
    for st in states:
        st.release_old_window()
    return torch.stack([o.reshape(-1) for o in out])


@contextmanager
def switched(model, module, attr: str, value):
    """module.attr = value, with the decode graphs dropped before and after (they hold the launches'
    constants and functions, so each value is recaptured); the attribute is put back after."""
    saved = getattr(module, attr)
    setattr(module, attr, value)
    model.graphs = None
    try:
        yield
    finally:
        setattr(module, attr, saved)
        model.graphs = None


def parse_case(case: str) -> list[int]:
    """'CxB' -> [C] * B; 'C1xB1+C2xB2' -> a mixed batch, [C1] * B1 + [C2] * B2."""
    contexts = []
    for part in case.split("+"):
        C, _, B = part.partition("x")
        if not (C.isdigit() and B.isdigit() and int(B) > 0):
            raise SystemExit(f"case {case!r}: expected CxB or CxB+CxB...")
        contexts += [int(C)] * int(B)
    return contexts


def fresh_states(cfg, model, rows, P: int | list[int], B: int, n_steps: int, **kw) -> list:
    """Synthetic states at P (or at each P[b]; lower where n_steps more would pass the model's last
    position), with room in the pools for those steps."""
    limit = cfg.max_position_embeddings - n_steps - 8
    pos = min(P, limit) if isinstance(P, int) else [min(p, limit) for p in P]
    return bk.synthetic_states(cfg, model, pos, B, rows, room=n_steps + 8, **kw)


def same_results(model, cfg, rows, P: int, B: int, module, attr: str, values: list) -> bool:
    """Whether one step from the same fresh states gives the same logits under every value."""
    first = None
    for v in values:
        with switched(model, module, attr, v):
            torch.manual_seed(0)
            logits = one_step_logits(model, fresh_states(cfg, model, rows, P, B, 1))
        if first is None:
            first = logits
        elif not torch.equal(first, logits):
            return False
    return True


def time_steps(model, states, module, attr: str, values: dict, rounds: int, steps: int) -> dict:
    """{name: ms per round}: the step's median over `steps` with module.attr = values[name], the
    values alternated over `rounds`. Each round of each value decodes steps + 2 tokens."""
    ms = {name: [] for name in values}
    for _ in range(rounds):
        for name, v in values.items():
            with switched(model, module, attr, v), bk.kernels_mode("auto"):
                ms[name].append(bk.step_time(model, states, steps=steps) * 1e3)
    return ms


def report(label: str, ms: dict, extra: dict | None = None, what: str = "step ms", digits: int = 3) -> None:
    """A line per value: each round's ms (`what`) and the median's ratio to the first value's."""
    first = next(iter(ms))
    base = statistics.median(ms[first])
    for name, times in ms.items():
        print(f"{label} {name:>12}: {what} {' '.join(f'{t:.{digits}f}' for t in times)} (median / {first}'s "
              f"{statistics.median(times) / base:.3f}){(extra or {}).get(name, '')}", flush=True)


def time_case(model, cfg, rows, P: int | list[int], B: int, module, attr: str, values: list, rounds: int,
              steps: int, label: str | None = None) -> dict:
    named = {repr(v): v for v in values}
    states = fresh_states(cfg, model, rows, P, B, rounds * len(values) * (steps + 2))
    ms = time_steps(model, states, module, attr, named, rounds, steps)
    report(f"{label or f'{P}x{B}'} {attr}=", ms)
    return dict(context=P, batch=B, step_ms=ms)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", required=True, help="package.module.NAME=value,value (Python literals)")
    ap.add_argument("--cases", default="8192x1,131072x1,131072x32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args(argv)
    module, attr, values = parse_switch(a.set)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (the step's graphs)")
    cfg, _, model = bk.flash_model()
    rows = bk.encoded_rows(cfg)
    cases = {c: parse_case(c) for c in a.cases.split(",")}
    first = next(iter(cases.values()))
    same = same_results(model, cfg, rows, first, len(first), module, attr, values)
    print(f"one step's logits under every value equal the first's: {same}", flush=True)
    if not same:
        raise SystemExit(f"{attr} changes the step's logits")
    out = []
    for label, contexts in cases.items():
        out.append(time_case(model, cfg, rows, contexts, len(contexts), module, attr, values, a.rounds, a.steps,
                             label))
        torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(), "switch": a.set, "same_logits": same, "cases": out}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
