"""A layer's MoE for the few rows of a decode step, reading only the picked experts' weights.

Running every expert on every row (a decode step cannot ask the host what was picked) reads 8
experts' weights for a flash-attn batch-1 step's 2 picks, and a model of 256 experts cannot do it
at all. Here the picks stay on the device, and the layer is four launches:
  * `_group_kernel` (one program) sorts the P = rows x k (row, slot) pairs by (expert, pair) and
    cuts them into one group per picked expert (picked_experts_ref.group_picks);
  * `_up_kernel` runs group g's expert's SwiGLU up-projection on its rows, one program per
    (group, column tile), over G = min(E, P) groups (those past the picked count are empty) and
    one more: the shared expert on every row, which so runs beside the routed ones instead of
    in two launches of its own with a handful of programs each;
  * `_down_kernel` the same for the down-projection, one output row per pair and per row;
  * `_combine_kernel` adds a row's pair outputs in position order, which is expert order, then
    slot order (workers/moe.py), then the shared expert's output.
Each product is expert_mlp.dot_rows over the same reduction tiles as Expert.forward's kernels,
and the sums are moe_elementwise's (add_slot; the last add rounds like torch's), so a row gets
the bits of MoE._routed (the tests compare them bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .expert_mlp import dot_rows, runs, tiles
from .moe_elementwise import add_slot, swiglu_f32
from .quantize import as_operand, load_f32, round_f32, store_f32

# (rows, reduction, columns) of the up and down kernels' tiles on a GPU, and their launch; the
# interpreter takes expert_mlp's (expert_mlp.tiles), whose reduction tiles it must match
GPU_TILES = ((16, 256, 32), (16, 128, 32))
GPU_LAUNCH = {"num_warps": 4, "num_stages": 3}
COMBINE_BLOCK = 1024  # columns of a row a program of the sum takes (8 a thread of its 4 warps)
# (row, slot) pairs the one grouping program sorts in registers: a decode step's (128 rows of up
# to 8 picks); a prefill chunk's thousands of rows go expert by expert (workers/moe.py)
MAX_PAIRS = 1024


@triton.jit
def _group_kernel(experts_ptr, weights_ptr, P, E, order_ptr, pos_ptr, start_ptr, expert_ptr, by_row_ptr,
                  w_by_row_ptr, G, SLOTS: tl.constexpr, SLOTS_PAD: tl.constexpr, P_PAD: tl.constexpr,
                  E_PAD: tl.constexpr, G_PAD: tl.constexpr):
    p = tl.arange(0, P_PAD)
    live = p < P
    e = tl.load(experts_ptr + p, mask=live, other=-1).to(tl.int32)
    valid = live & (e >= 0) & (e < E)
    e = tl.where(valid, e, E)  # no expert: after every group
    key = e * P_PAD + p  # distinct, and in (expert, pair) order
    order = tl.sort(key) % P_PAD  # order[q]: the pair at position q
    tl.store(order_ptr + p, order, mask=live)
    tl.store(pos_ptr + order, p, mask=live)  # pos[pair] = q, read back below
    # groups: each picked expert's first position and its index among the picked ones
    counts = tl.histogram(e, E_PAD, mask=valid)
    present = (counts > 0).to(tl.int32)
    group = tl.cumsum(present, 0) - present
    first = tl.cumsum(counts, 0) - counts
    n_valid = tl.sum(counts, 0)
    ids = tl.arange(0, E_PAD)
    tl.store(start_ptr + group, first, mask=present > 0)
    tl.store(expert_ptr + group, ids, mask=present > 0)
    g = tl.arange(0, G_PAD)
    empty = g >= tl.sum(present, 0)
    tl.store(start_ptr + g, n_valid + 0 * g, mask=empty & (g <= G))
    tl.store(expert_ptr + g, 0 * g, mask=empty & (g < G))
    tl.debug_barrier()  # pos, stored by other threads, is read next
    # a pair's rank among its row's picks (by key), which is where its row lists it
    s = tl.arange(0, SLOTS_PAD)
    row = p // SLOTS
    mate = row[:, None] * SLOTS + s[None, :]
    mate_ok = live[:, None] & (s[None, :] < SLOTS)
    mate_e = tl.load(experts_ptr + mate, mask=mate_ok, other=-1).to(tl.int32)
    mate_e = tl.where((mate_e >= 0) & (mate_e < E), mate_e, E)
    j = tl.sum((mate_ok & (mate_e * P_PAD + mate < key[:, None])).to(tl.int32), 1)
    q = tl.load(pos_ptr + p, mask=live, other=0)
    w = tl.load(weights_ptr + p, mask=live, other=0.0)
    tl.store(by_row_ptr + row * SLOTS + j, tl.where(valid, q, -1), mask=live)
    tl.store(w_by_row_ptr + row * SLOTS + j, tl.where(valid, w, 0.0), mask=live)


@triton.jit
def _group_rows(q, end, order_ptr, SHARED: tl.constexpr, SLOTS: tl.constexpr):
    """Rows of positions q (a group's pairs, or the shared group's rows themselves)."""
    if SHARED:
        rows = q
    else:
        rows = tl.load(order_ptr + q, mask=q < end, other=0) // SLOTS
    return rows


@triton.jit(do_not_specialize=["M", "P", "G"])
def _up_kernel(x_ptr, w1_ptr, w3_ptr, sw1_ptr, sw3_ptr, h_ptr, order_ptr, start_ptr, expert_ptr, M, P, I, D, limit,
               x_row_stride, G, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, BF16: tl.constexpr, MMA_BF16: tl.constexpr, CUDA_EXP: tl.constexpr):
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < I
    if g < G:  # a picked expert's rows, at their pairs' positions
        first, end = tl.load(start_ptr + g), tl.load(start_ptr + g + 1)
        e = tl.load(expert_ptr + g).to(tl.int64)
        for q0 in range(first, end, BLOCK_M):
            q = q0 + tl.arange(0, BLOCK_M)
            _up_tile(x_ptr, w1_ptr + e * I * D, w3_ptr + e * I * D, h_ptr, order_ptr, q, end, cols, n_ok, I, D, limit,
                     x_row_stride, False, SLOTS, BLOCK_M, BLOCK_N, BLOCK_K, BF16, MMA_BF16, CUDA_EXP)
    else:  # the shared expert: every row, at positions P + row
        for r0 in range(0, M, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M)
            _up_tile(x_ptr, sw1_ptr, sw3_ptr, h_ptr + P * I, order_ptr, r, M, cols, n_ok, I, D, limit, x_row_stride,
                     True, SLOTS, BLOCK_M, BLOCK_N, BLOCK_K, BF16, MMA_BF16, CUDA_EXP)


@triton.jit
def _up_tile(x_ptr, w1_ptr, w3_ptr, h_ptr, order_ptr, q, end, cols, n_ok, I, D, limit, x_row_stride,
             SHARED: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, BF16: tl.constexpr, MMA_BF16: tl.constexpr, CUDA_EXP: tl.constexpr):
    m_ok = q < end
    rows = _group_rows(q, end, order_ptr, SHARED, SLOTS)
    g, u = dot_rows(x_ptr, x_row_stride, w1_ptr, w3_ptr, D, rows, m_ok, cols, n_ok, D,
                    BLOCK_M, BLOCK_N, BLOCK_K, BF16, MMA_BF16, True)
    s = swiglu_f32(round_f32(g, BF16), round_f32(u, BF16), limit, BF16, CUDA_EXP)
    store_f32(h_ptr + q[:, None].to(tl.int64) * I + cols[None, :], s, m_ok[:, None] & n_ok[None, :], BF16)


@triton.jit(do_not_specialize=["M", "P", "G"])
def _down_kernel(h_ptr, w2_ptr, sw2_ptr, y_ptr, start_ptr, expert_ptr, M, P, I, D, G,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BF16: tl.constexpr,
                 MMA_BF16: tl.constexpr):
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < D
    if g < G:
        first, end = tl.load(start_ptr + g), tl.load(start_ptr + g + 1)
        w2 = w2_ptr + tl.load(expert_ptr + g).to(tl.int64) * D * I
    else:  # the shared expert's rows sit at positions P .. P + M - 1
        first, end = P, P + M
        w2 = sw2_ptr
    for q0 in range(first, end, BLOCK_M):
        q = q0 + tl.arange(0, BLOCK_M)
        m_ok = q < end
        y = dot_rows(h_ptr, I, w2, w2, I, q, m_ok, cols, n_ok, I, BLOCK_M, BLOCK_N, BLOCK_K, BF16, MMA_BF16, False)[0]
        store_f32(y_ptr + q[:, None].to(tl.int64) * D + cols[None, :], round_f32(y, BF16),
                  m_ok[:, None] & n_ok[None, :], BF16)


@triton.jit(do_not_specialize=["P"])
def _combine_kernel(y_ptr, by_row_ptr, w_by_row_ptr, out_ptr, P, D, SLOTS: tl.constexpr, BLOCK: tl.constexpr,
                    BF16: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # MoE._routed's zeros, then its index_add_ of each pick
    for j in tl.static_range(SLOTS):
        q = tl.load(by_row_ptr + r * SLOTS + j).to(tl.int64)
        y = load_f32(y_ptr + q * D + cols, ok & (cols * 0 + q >= 0), BF16)  # no pick: y = 0, w = 0 add nothing
        acc = add_slot(acc, y, tl.load(w_by_row_ptr + r * SLOTS + j), BF16)
    shared = load_f32(y_ptr + (P + r) * D + cols, ok, BF16)
    store_f32(out_ptr + r * D + cols, round_f32(acc + shared, BF16), ok, BF16)  # routed + shared, one rounding


def group_picks(experts: torch.Tensor, weights: torch.Tensor, n_experts: int) -> dict[str, torch.Tensor]:
    """picked_experts_ref.group_picks in one launch (its outputs, plus the scratch `pos`)."""
    M, k = experts.shape
    P, G = M * k, min(n_experts, M * k)
    if not 0 < P <= MAX_PAIRS:
        raise ValueError(f"picked experts: {M} rows x {k} picks is not 1 to {MAX_PAIRS} pairs")
    ints = torch.empty(3 * P + 2 * G + 1, dtype=torch.int32, device=experts.device)
    out = dict(zip(("order", "pos", "by_row", "start", "expert"), ints.split([P, P, P, G + 1, G])))
    out["by_row"] = out["by_row"].view(M, k)
    out["w_by_row"] = torch.empty(M, k, dtype=torch.float32, device=experts.device)
    pad = triton.next_power_of_2
    _group_kernel[(1,)](experts.contiguous(), weights.float().contiguous(), P, n_experts, out["order"], out["pos"],
                        out["start"], out["expert"], out["by_row"], out["w_by_row"], G, SLOTS=k,
                        SLOTS_PAD=pad(k), P_PAD=pad(P), E_PAD=pad(n_experts), G_PAD=pad(G + 1))
    return out


def takes(x: torch.Tensor, routed: tuple[torch.Tensor, ...], shared: tuple[torch.Tensor, ...],
          experts: torch.Tensor) -> bool:
    """Whether `moe` runs these operands rather than refusing them: the kernel path with one float
    dtype, a shared expert as wide as the routed ones (it runs as one more group) and at most
    MAX_PAIRS picks (one program groups them)."""
    return (runs(x, *routed, *shared) and shared[0].shape == routed[0].shape[1:]
            and 0 < experts.numel() <= MAX_PAIRS)


def moe(x: torch.Tensor, routed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor], experts: torch.Tensor, weights: torch.Tensor,
        limit: float) -> torch.Tensor:
    """x [M, d]; `routed` (w1, w3 [E, I, d], w2 [E, d, I]); the shared expert's (w1, w3 [I, d],
    w2 [d, I]); picks `experts` [M, k] with float32 `weights` -> [M, d], the MoE layer's output:
    the picked experts' outputs weighted and added in expert order, then the shared expert's."""
    w1, w3, w2 = routed
    sw1, sw3, sw2 = shared
    E, I, D = w1.shape
    M = x.shape[0]
    if (x.dim() != 2 or x.shape[1] != D or w3.shape != w1.shape or w2.shape != (E, D, I)
            or sw1.shape != (I, D) or sw3.shape != (I, D) or sw2.shape != (D, I)):
        raise ValueError(f"picked experts: x {list(x.shape)}, w1 {list(w1.shape)}, w3 {list(w3.shape)}, "
                         f"w2 {list(w2.shape)}, shared {[list(w.shape) for w in shared]} do not match")
    if experts.shape != weights.shape or experts.dim() != 2 or experts.shape[0] != M:
        raise ValueError(f"picked experts: experts {list(experts.shape)} and weights {list(weights.shape)} "
                         f"are not both [{M}, k]")
    if not runs(x, *routed, *shared):
        raise ValueError("picked experts: needs the kernel path and float32 or BF16 operands of one dtype")
    k = experts.shape[1]
    P = M * k
    groups = group_picks(experts, weights, E)
    G = groups["expert"].numel()
    # a group's few rows take the small-row tiles, which sum every product over the same
    # reduction tiles as expert_mlp's other tiles
    (um, uk, un), (dm, dk, dn) = GPU_TILES if x.is_cuda and x.dtype == torch.bfloat16 else tiles(x, 1)
    launch = GPU_LAUNCH if x.is_cuda else {}
    bf16, mma = x.dtype == torch.bfloat16, x.dtype == torch.bfloat16 and x.is_cuda
    x = x.contiguous()
    lim = float(torch.tensor(limit, dtype=x.dtype))  # the reference clamps in the tensor's dtype
    h = torch.empty(P + M, I, dtype=x.dtype, device=x.device)  # pairs, then the shared expert's rows
    _up_kernel[(G + 1, triton.cdiv(I, un))](
        as_operand(x), as_operand(w1), as_operand(w3), as_operand(sw1), as_operand(sw3), as_operand(h),
        groups["order"], groups["start"], groups["expert"], M, P, I, D, lim, x.stride(0), G, SLOTS=k,
        BLOCK_M=um, BLOCK_N=un, BLOCK_K=uk, BF16=bf16, MMA_BF16=mma, CUDA_EXP=x.is_cuda, enable_fp_fusion=False,
        **launch)
    y = torch.empty(P + M, D, dtype=x.dtype, device=x.device)
    _down_kernel[(G + 1, triton.cdiv(D, dn))](
        as_operand(h), as_operand(w2), as_operand(sw2), as_operand(y), groups["start"], groups["expert"], M, P, I, D,
        G, BLOCK_M=dm, BLOCK_N=dn, BLOCK_K=dk, BF16=bf16, MMA_BF16=mma, enable_fp_fusion=False, **launch)
    out = torch.empty(M, D, dtype=x.dtype, device=x.device)
    block = min(COMBINE_BLOCK, triton.next_power_of_2(D))
    _combine_kernel[(M, triton.cdiv(D, block))](
        as_operand(y), groups["by_row"], groups["w_by_row"], as_operand(out), P, D, SLOTS=k, BLOCK=block, BF16=bf16,
        enable_fp_fusion=False)
    return out
