"""load_tests/bench_step_ops.py's stand-in for the decode graphs (no GPU needed)."""

import inspect
import os

import torch

from workers.decode_graphs import DecodeGraphs


def _replayed_pieces():
    # the module points the process at Triton's interpreter when it is imported without CUDA:
    # keep that out of the other tests' environment
    saved = dict(os.environ)
    try:
        from load_tests.bench_step_ops import ReplayedPieces
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return ReplayedPieces


def test_replayed_pieces_take_what_the_decode_graphs_take_and_charge_a_replay():
    """`bench_step_ops --graphs` runs the step through ReplayedPieces in place of DecodeGraphs:
    a keyword the real run() gained (warmup_args, for the decode piece) once made it fail. It
    must accept every parameter of DecodeGraphs.run, run the piece, and charge what a replay
    dispatches: one copy per input that is not an earlier piece's output, and the launch."""
    ReplayedPieces = _replayed_pieces()
    assert set(inspect.signature(DecodeGraphs.run).parameters) <= set(inspect.signature(ReplayedPieces.run).parameters)
    pieces = ReplayedPieces()
    x = torch.ones(3)
    y = pieces.run("a", lambda t: t + 1, x, warmup_args=lambda args: args)
    z = pieces.run("b", lambda t, u: t * u, y, x)
    assert torch.equal(z, torch.full((3,), 2.0))
    # a: x copied in + the launch; b: y read in place (a's output), x copied in + the launch
    assert sum(pieces.charged.values()) == 2 + 2
