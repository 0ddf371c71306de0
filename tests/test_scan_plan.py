"""The plan that splits the indexer scans' pages over programs (kernels/scan_plan.py), run as the
scans run it (scan_plan.planned_span inside a Triton kernel; the interpreter on CPU): every page a
query's launch owns is covered exactly once, and programs go to queries in proportion to their
work. The scans' keys under the plan are compared with the reference in test_kernels_indexer.py."""

import pytest
import torch
import triton
import triton.language as tl

from kernels import scan_plan
from kernels.scan_plan import planned_span

MODE = 0


@triton.jit
def _spans_kernel(pos_ptr, mode_ptr, out_ptr, S, n_cols, n_blk, BLOCK_S: tl.constexpr, STEP: tl.constexpr,
                  SENTINELS: tl.constexpr):
    s, page_lo, page_hi, n_vis, vis_hi, first = planned_span(pos_ptr, mode_ptr, S, n_cols, n_blk, 0, BLOCK_S, STEP,
                                                             SENTINELS)
    row = out_ptr + tl.program_id(0) * 6
    tl.store(row, s)
    tl.store(row + 1, page_lo)
    tl.store(row + 2, page_hi)
    tl.store(row + 3, n_vis)
    tl.store(row + 4, vis_hi)
    tl.store(row + 5, first.to(tl.int32))


def spans(positions, modes, n_cols, n_blk, step, sentinels, slots):
    """Each program's (s, page_lo, page_hi, n_vis, vis_hi, first) of a launch of plan_grid's size."""
    S = len(positions)
    G = scan_plan.plan_grid(S, n_cols, n_blk, step, sentinels, slots)
    out = torch.full((G, 6), -7, dtype=torch.int32)
    _spans_kernel[(G,)](torch.tensor(positions), torch.tensor(modes, dtype=torch.int32), out, S, n_cols, n_blk,
                        BLOCK_S=triton.next_power_of_2(S), STEP=step, SENTINELS=sentinels)
    return out.tolist()


def covered(rows, S, mode_of, step, sentinels):
    """Per query: the pages its programs score and those they write the sentinel into, in order."""
    scored, sent = [[] for _ in range(S)], [[] for _ in range(S)]
    for s, lo, hi, _, vis_hi, _ in rows:
        if mode_of[s] == MODE and vis_hi > lo:
            assert lo % step == 0, "a program's steps must start on a step boundary"
            scored[s] += range(lo, vis_hi)
        if sentinels:
            sent[s] += range(max(vis_hi, lo), hi)
    return scored, sent


@pytest.mark.parametrize("step,sentinels,slots", [(2, True, 264), (2, True, 8), (2, False, 16), (1, False, 40)])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_page_is_covered_once(step, sentinels, slots, seed):
    """Random batches of up to PLAN_QUERIES queries, both modes, lengths from nothing to past the
    table, a table of odd width and n_cols past it: every visible page of a query of the launch's
    mode scored once (and none of the other mode's), every other column's page given the sentinel
    once (where the launch writes them), each program's n_vis its query's, and one program of
    each query its first (which writes the row's length where the sentinels are not written)."""
    g = torch.Generator().manual_seed(seed)
    n_blk, n_cols = 37, 45 * 64
    for S in (1, 5, 32, scan_plan.PLAN_QUERIES):
        positions = torch.randint(0, 256 * 50, (S,), generator=g).tolist()
        positions[0] = 0  # sees nothing
        modes = torch.randint(0, 4, (S,), generator=g).clamp(max=1).tolist()  # a quarter of the other mode
        rows = spans(positions, modes, n_cols, n_blk, step, sentinels, slots)
        assert len(rows) <= max(S, slots)
        scored, sent = covered(rows, S, modes, step, sentinels)
        for s in range(S):
            vis = min(-(-((positions[s] + 1) // 4) // 64), n_blk)
            assert scored[s] == (list(range(vis)) if modes[s] == MODE else []), (S, s)
            assert sent[s] == (list(range(vis, 45)) if sentinels else []), (S, s)
        for s, lo, hi, n_vis, _, _ in rows:
            if hi > lo:
                assert n_vis == (positions[s] + 1) // 4
        assert sorted(r[0] for r in rows if r[5]) == list(range(S))


def most_steps(rows, step):
    return max(-(-(max(vis_hi - lo, 0)) // step) for _, lo, _, _, vis_hi, _ in rows)


def test_programs_go_to_queries_in_proportion_to_their_work():
    """The module docstring's cases, on an H100's 264 slots: 32 queries of 128K (513 pages of
    columns) take 32 steps a program, not the per-query split's 33; one query of 1M beside 31 of 8K
    (the launch writing no sentinels) at most 11 steps a program, where the per-query split gives
    the long one 256; with the sentinels, the short queries' pages past their own get programs too."""
    uniform = spans([131071] * 32, [MODE] * 32, 513 * 64, 513, 2, True, 264)
    assert most_steps(uniform, 2) == 32
    positions = [(1 << 20) - 1] + [8191] * 31
    mixed = spans(positions, [MODE] * 32, 4097 * 64, 4097, 2, False, 264)
    assert most_steps(mixed, 2) <= 11
    with_sentinels = spans(positions, [MODE] * 32, 4097 * 64, 4097, 2, True, 264)
    assert most_steps(with_sentinels, 2) <= 45
    # the long query's steps spread over most of the grid, each short query's over two programs
    programs = [sum(1 for r in mixed if r[0] == s and r[4] > r[1]) for s in range(32)]
    assert programs[0] >= 180 and all(p == 2 for p in programs[1:])


def test_a_query_with_sentinels_only_still_gets_a_program():
    """Position 0 (nothing visible) and a table wider than any query: its columns still get the
    sentinel, from a program of its own."""
    rows = spans([0, 4 * 64 * 3 - 1], [MODE, MODE], 40 * 64, 40, 2, True, 264)
    scored, sent = covered(rows, 2, [MODE, MODE], 2, True)
    assert scored == [[], [0, 1, 2]]
    assert sent == [list(range(40)), list(range(3, 40))]


def test_a_launch_is_planned_up_to_plan_queries_and_split_per_query_past_them(monkeypatch):
    """scan_plan.launch_split, which both FP8 scans launch through: the plan's one-dimensional grid
    and BLOCK_S for up to PLAN_QUERIES queries; past them, or with the plan off, programs (s, j) of
    the caller's pages each (45 pages in shares of 10: 5 a query)."""
    cpu, n_cols, n_blk = torch.device("cpu"), 45 * 64, 37
    grid, ppp, block_s = scan_plan.launch_split(5, n_cols, n_blk, 2, True, cpu, 2, 10)
    assert grid == (scan_plan.plan_grid(5, n_cols, n_blk, 2, True, 2 * scan_plan.CPU_SMS),) and ppp == 0
    assert block_s == 8
    S = scan_plan.PLAN_QUERIES + 1
    assert scan_plan.launch_split(S, n_cols, n_blk, 2, True, cpu, 2, 10) == ((S, 5), 10, 0)
    monkeypatch.setattr(scan_plan, "PLANNED", False)
    assert scan_plan.launch_split(5, n_cols, n_blk, 2, True, cpu, 2, 10) == ((5, 5), 10, 0)
