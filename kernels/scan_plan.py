"""How the indexer's FP8 scans split a batch's pages over their programs: the plan.

A decode batch mixes lengths: a coding agent's 1M-token request beside chat turns of 8K. Split
per query (query s gets programs (s, j), each an equal share of the table's columns), every query
takes as many programs and as long as if it were as long as the longest, and the long one's few
programs run alone at the end: one 1M query and 31 of 8K took 0.20-0.25 ms on an H100, where 32
queries of 1M take 0.28 (kernels/RESULTS.md, sixteenth session).

The plan gives programs in proportion to work. A query's work is its units: its steps (STEP
pages each, scored together) and, where the launch writes the sentinels, one unit per
SENTINEL_PAGES sentinel pages past its visible ones (fewer go with its last program, unweighed:
one page of them is about nothing beside a step); at least one unit, so every query has a
program. Of the launch's G programs query s gets

    c_s = max(1, ceil(units_s (G - S) / total))

so that sum c_s <= (G - S) + S = G, and each of its programs ceil(units_s / c_s) of its units
in order. 32 queries of 128K on 264 programs: 8 programs of 32 steps (the per-query split gave
33: 513 pages in 8 shares); one query of 1M and 31 of 8K, without sentinels (the decode top-k):
11 steps at most (the per-query split: 256 for the long one). Short programs cost nothing extra:
a floor of 2, 4 or 8 steps a program made 32 queries of 8K up to 50% slower on an H100 and
nothing faster.

The grid is fixed when the launch is recorded (a CUDA graph) while the positions are not, so
each program computes the plan from the positions and modes on the device: a query a lane, every
sum in registers. G covers the GPU (programs_per_sm x SMs), with at least one program a query.
The Triton FP8 scan takes planned_span; the Gluon one (indexer_scan_hopper._planned_span) the
same arithmetic in Gluon's layouts, counting the general queries' steps as the others' where its
bulk-copy kernel scores those too (GENERAL_HERE; queries off the FP4 grid, none of the model's).
The general scan's own launch keeps the per-query split, so its programs, which find no query of
theirs, end at once; so do prefill chunks of more than PLAN_QUERIES queries (a program or more a
query); a shorter chunk is planned as a decode batch is.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

PLANNED = True  # off: the per-query split everywhere (load_tests/bench_scan_split.py times both)
# the most queries a launch plans (a lane of the Gluon plan holds up to 8). H100, the decode top-k
# planned against split per query (kernels/RESULTS.md, seventeenth session): one 1M query and 127 of 8K
# 0.107 against 0.98 ms (with ROW_LENGTHS), 128 queries of 128K 1.012x, 256 of 8K 1.010x
PLAN_QUERIES = 256
SENTINEL_PAGES = 16
_SENTINEL_PAGES = tl.constexpr(SENTINEL_PAGES)
CPU_SMS = 4  # the interpreter runs a launch's programs one by one: a few exercise the split


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def program_slots(device: torch.device, per_sm: int) -> int:
    """Programs that run at once: per_sm on each SM (CPU_SMS where the interpreter runs them)."""
    return per_sm * (_sm_count(device) if device.type == "cuda" else CPU_SMS)


def planned(S: int) -> bool:
    """Whether a launch of S queries takes the plan (PLANNED, and S within PLAN_QUERIES)."""
    return PLANNED and 0 < S <= PLAN_QUERIES


def plan_grid(S: int, n_cols: int, n_blk: int, step_pages: int, sentinels: bool, slots: int) -> int:
    """The plan's G: the slots, or fewer where the queries' units could use no more; at least S."""
    n_pages = -(-n_cols // 64)
    units = -(-min(n_pages, n_blk) // step_pages) + (-(-n_pages // SENTINEL_PAGES) if sentinels else 0)
    return max(S, min(slots, S * units))


def launch_split(S: int, n_cols: int, n_blk: int, step_pages: int, sentinels: bool, device: torch.device,
                 per_sm: int, pages_per_prog: int) -> tuple[tuple[int, ...], int, int]:
    """(grid, pages a program, BLOCK_S) of an FP8 scan's launch. Planned (`planned(S)`): the plan's
    G programs over per_sm slots an SM, pages 0 (unused) and BLOCK_S the power of two holding S;
    else the per-query split: programs (s, j) of pages_per_prog pages each, BLOCK_S 0."""
    if planned(S):
        slots = program_slots(device, per_sm)
        return (plan_grid(S, n_cols, n_blk, step_pages, sentinels, slots),), 0, triton.next_power_of_2(S)
    n_pages = -(-n_cols // 64)
    return (S, -(-n_pages // pages_per_prog)), pages_per_prog, 0


@triton.jit
def planned_span(pos_ptr, mode_ptr, S, n_cols, n_blk, MODE: tl.constexpr, BLOCK_S: tl.constexpr,
                 STEP: tl.constexpr, SENTINELS: tl.constexpr):
    """This program's (s, page_lo, page_hi, n_vis, vis_hi, first) under the plan (module
    docstring): it scores query s's pages [page_lo, vis_hi) in steps of STEP and (SENTINELS)
    writes the sentinel into [max(vis_hi, page_lo), page_hi); `first`: it is query s's first
    program. A spare program gets query 0, empty ranges and first false."""
    i = tl.arange(0, BLOCK_S)
    ok = i < S
    n_pages = tl.cdiv(n_cols, 64)
    n_vis = (tl.load(pos_ptr + i, mask=ok, other=-1).to(tl.int32) + 1) // 4
    vis = tl.minimum(tl.minimum(tl.cdiv(n_vis, 64), n_blk), n_pages)
    # a query of the other mode is scored by the other launch; its sentinels are the FP8 launch's
    steps = tl.where(tl.load(mode_ptr + i, mask=ok, other=MODE + 1) == MODE, tl.cdiv(vis, STEP), 0)
    if SENTINELS:
        spare = n_pages - vis
    else:
        spare = tl.zeros_like(vis)
    units = tl.where(ok, tl.maximum(steps + spare // _SENTINEL_PAGES, 1), 0)  # a program for every query
    G = tl.num_programs(0)
    total = tl.maximum(tl.sum(units, axis=0), 1)
    per_query = tl.where(units > 0, tl.maximum(tl.cdiv(units * (G - S), total), 1), 0)
    end = tl.cumsum(per_query, 0)
    p = tl.program_id(0)
    hit = (end > p) & (end - per_query <= p)  # this program's query (none: a spare program)
    q_units = tl.sum(tl.where(hit, units, 0), axis=0)
    q_steps = tl.sum(tl.where(hit, steps, 0), axis=0)
    q_vis = tl.sum(tl.where(hit, vis, 0), axis=0)
    quota = tl.cdiv(q_units, tl.maximum(tl.sum(tl.where(hit, per_query, 0), axis=0), 1))
    u0 = (p - tl.sum(tl.where(hit, end - per_query, 0), axis=0)) * quota
    u1 = tl.minimum(u0 + quota, q_units)
    # units below q_steps are steps (pages STEP u ..), the rest sentinel pages from q_vis on
    page_lo = tl.where(u0 < q_steps, STEP * u0, q_vis + (u0 - q_steps) * _SENTINEL_PAGES)
    page_hi = tl.where(u1 <= q_steps, tl.minimum(STEP * u1, q_vis), q_vis + (u1 - q_steps) * _SENTINEL_PAGES)
    if SENTINELS:  # the last program takes the sentinel pages under a unit
        last = n_pages
    else:
        last = q_vis
    found = u0 < q_units
    page_hi = tl.where(found, tl.where(u1 == q_units, last, page_hi), 0)
    page_lo = tl.minimum(page_lo, page_hi)
    s = tl.sum(tl.where(hit, i, 0), axis=0)
    return (s, page_lo, page_hi, tl.sum(tl.where(hit, n_vis, 0), axis=0), tl.minimum(page_hi, q_vis),
            found & (u0 == 0))
