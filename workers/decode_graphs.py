"""CUDA graphs for the pieces of a decode step.

A decode step of the flash-attn preset is bound by the host unless it is replayed: about 2,000
small operations dispatched from Python for 3 ms of GPU work (kernels/RESULTS.md). Per layer a
step is three pieces, each recorded once as a CUDA graph and replayed (model.Block.forward):
  * attention_in: the mHC weights, norms, projections, rotary embedding and key rounding before
    attention (Attention.prepare);
  * the decode piece (Attention._decode_piece): the state updates (every compressor's open row,
    and where a window closes its pooling, finishing and new entry; the window keys) and the
    decode kernels, over tables of fixed shapes; the host only builds the step's small index
    lists (page_tables.decode_tables, paged_state.compress_plan) and copies each in once;
  * attention_out_and_ffn: the output projection, mHC and MoE after it;
then the head (and, before layer 0, the embedding). A piece's inputs that are another graph's
outputs, `fixed` buffers or `stage` buffers (the host's values of the step, copied from pinned
memory straight into them) are read where they are, not copied. A step with a row the decode piece cannot plan (a prefix-cache
replay's token, or one closing CSA window 0) runs that layer's state updates and kernels op by
op (Attention.attend_states), with the finishing of closing windows as a piece of its own.

A graph has fixed shapes, so a step's rows are padded to a bucket size (BUCKETS); padded rows sit
at position 0 with token 0, and since every piece works row by row they change nothing in the
real rows. A graph also cannot ask the host anything, so the MoE keeps its picks on the device: on
the kernel path it runs only the picked experts, grouped by a kernel (kernels/picked_experts.py),
for any expert count; without the kernels every expert on every row (moe.MoE._routed_dense, same
bits), so only presets of at most moe.DENSE_MAX_EXPERTS experts are graphed there.

`capture=False` runs the same padded pieces without graphs: the comparison the GPU tests make
(replayed and eager bits equal), and the only mode a CPU has.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves

from .host_index import staging_ring, to_device

# Rows per step are padded up to one of these: numerics.linear pads matmuls to 16 rows anyway,
# so a smaller bucket would save nothing, and each bucket holds its own set of graphs.
BUCKETS = (16, 32, 48, 64, 96, 128)

log = logging.getLogger(__name__)
_MISSING = object()


def graphs_enabled() -> bool:
    """`V4SERVE_CUDA_GRAPHS=0` turns decode graphs off everywhere (to compare, or to debug)."""
    v = os.environ.get("V4SERVE_CUDA_GRAPHS", "1")
    if v not in ("0", "1"):
        raise ValueError(f"V4SERVE_CUDA_GRAPHS must be 0 or 1, got {v!r}")
    return v == "1"


def run_eagerly(name: str, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
    """DecodeGraphs.run's signature without graphs: what a step without them calls instead."""
    return fn(*args)


def bucket(rows: int) -> int | None:
    """The padded row count for a step of `rows` decode rows; None above the largest bucket."""
    return next((b for b in BUCKETS if b >= rows), None)


def attention_rows(rows: int) -> int:
    """The rows a graphed step's decode piece (attention.Attention._decode_piece) runs its kernels
    on: 1, 2, 4, 8, then the buckets. Unlike the projections, the indexer's scores and top-k cost
    per row, padding rows included (at 128K a batch-1 step on 16 rows took 3.53 ms of GPU time,
    on 1 row 3.37 ms)."""
    return 1 << (rows - 1).bit_length() if rows <= 8 else bucket(rows)


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: Any


class DecodeGraphs:
    """Runs a step's pieces, recording each (name, input shapes) the first time it is seen and
    replaying it afterwards. A piece is a function of tensors only, with no host sync and no side
    effect. Its outputs are the graph's own buffers, overwritten by the next replay: callers use
    them within the step and copy what they keep (model.V4Model clones the logits)."""

    def __init__(self, capture: bool):
        self.capture = capture
        self.runs: Counter[str] = Counter()  # runs per piece name (replayed or eager): what tests check
        self._recorded: dict[tuple, _Recorded] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # id -> every recorded graph's output buffers
        self._fixed: dict[tuple, tuple[tuple, list[torch.Tensor]]] = {}  # key -> (last sources, buffers)
        self._staged: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}  # key -> (buffer, its views)

    def __len__(self) -> int:
        """Graphs recorded (pieces that could not be recorded and run eagerly not counted)."""
        return sum(rec is not None for rec in self._recorded.values())

    def run(self, name: str, fn: Callable[..., Any], *args: torch.Tensor,
            warmup_args: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> Any:
        """fn(*args), replayed from a graph. A piece that updates state in place runs twice
        before its graph is recorded (the warm-up below), then once for real: `warmup_args` maps
        its inputs to ones whose updates the real run overwrites (the decode piece: no window
        closes in its warm-up, so the overlap it would replace is still there for the real run)."""
        self.runs[name] += 1
        if not self.capture:
            return fn(*args)
        key = (name, tuple((tuple(a.shape), a.dtype, a.device) for a in args))
        rec = self._recorded.get(key, _MISSING)
        if rec is _MISSING:
            try:
                rec = self._record(fn, args, self._outputs, warmup_args)
                self._outputs.update((id(t), t) for t in tree_leaves(rec.outputs) if isinstance(t, torch.Tensor))
            except (RuntimeError, torch.OutOfMemoryError) as e:
                # out of memory for the graph's buffers, or an operation a graph cannot hold: this
                # piece runs op by op from now on (same bits), the step and the server go on
                log.warning("decode graph %s not recorded, running it eagerly: %s", name, e)
                rec = None
            self._recorded[key] = rec
        if rec is None:
            return fn(*args)
        for dst, src in zip(rec.inputs, args):
            if dst is not src:  # an earlier graph's output is read in place
                dst.copy_(src)
        rec.graph.replay()
        return rec.outputs

    def stage(self, name: str, values, dtype: torch.dtype, device: torch.device,
              views: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """Host values (a list or nested lists) copied to the GPU in one queued transfer from the
        pinned staging ring, straight into a buffer kept for (name, shape) that graphs read in
        place; `views(buffer)` cuts it into the tensors the caller wants, made once, so the graphs
        see the very same tensors every step. Against to_device + fixed this saves an
        allocation and a device-to-device copy per tensor: on an H100 host the tokens and a
        layer's tables took 0.2 and 0.27 ms before the GPU could start on them (kernels/RESULTS.md)."""
        if not self.capture:
            return views(to_device(values, device, dtype))
        pinned = staging_ring().stage(values, dtype)
        key = (name, tuple(pinned.shape), dtype, device)
        kept = self._staged.get(key)
        if kept is None:
            buf = torch.empty(pinned.shape, dtype=dtype, device=device)
            kept = self._staged[key] = (buf, views(buf))
            self._outputs.update((id(t), t) for t in kept[1])
        kept[0].copy_(pinned, non_blocking=True)
        return kept[1]

    def fixed(self, name: str, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Device `tensors` copied into buffers kept for (name, shapes), which graphs read in
        place: a step's block table (built on the device; host values go through `stage`), copied
        once per step rather than into each layer's graph. A call with the very tensors of the
        last call copies nothing (the next layer of the same step, or an unchanged table)."""
        if not self.capture:
            return tensors
        key = (name, tuple((tuple(t.shape), t.dtype, t.device) for t in tensors))
        last = self._fixed.get(key)
        if last is None:
            bufs = [t.clone() for t in tensors]
            self._outputs.update((id(b), b) for b in bufs)
        else:
            sources, bufs = last
            if len(sources) == len(tensors) and all(a is b for a, b in zip(sources, tensors)):
                return tuple(bufs)
            for b, t in zip(bufs, tensors):
                b.copy_(t)
        self._fixed[key] = (tensors, bufs)
        return tuple(bufs)

    @staticmethod
    def _record(fn: Callable[..., Any], args: tuple[torch.Tensor, ...], produced: dict[int, torch.Tensor],
                warmup_args: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> _Recorded:
        """Inputs that are another graph's outputs (fixed buffers, refilled by each replay before
        this one runs: streams, mHC weights, rotary angles) are read in place; the others are
        copied into buffers of this graph on every replay."""
        inputs = [a if produced.get(id(a)) is a else a.clone() for a in args]
        warm = warmup_args(inputs) if warmup_args is not None else inputs
        # Warm up on a side stream first (as torch.cuda.graphs asks): Triton compiles its kernels
        # and cuBLAS sets up its workspace outside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*warm)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a KV transfer or another thread of the worker may use the GPU meanwhile;
        # only this thread's calls are checked against (and kept out of) the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = fn(*inputs)
        return _Recorded(graph, inputs, outputs)
