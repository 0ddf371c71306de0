"""Top-k of the indexer's int64 score keys by radix select over register-resident chunks.

The scan (indexer_topk.py) stores each visible entry's score as an int64 key: the
order-preserving bits of the float32 score in the top half, INT32_MAX - entry in the bottom
half, INT64_MIN for an invisible column. Visible keys are distinct, so the top k keys of a row
are one set and their descending order is unique: any exact selection gives torch.topk's
picks in torch.topk's order, and this kernel is tested against it (key_select_ref).

Why a kernel: at batch 1 torch.topk takes one block per row slice and 2-bit radix passes over
the 64-bit keys; at 128K (32K keys) a CSA layer's selection took 150 us of the step's GPU time
in three launches (gatherTopK over four 8K pieces, then over their picks, then the picks' sort).

How: a program loads a chunk of 2,048 keys of one row into registers, once, and finds the
k-th largest score half T among them by radix select over the score half as a uint32, 4 bits a
round (tl.histogram of the digit among the keys still tied with T's known digits: 16 bins cost a
warp a few ballots, not a bin table; 8-bit digits took twice the barriers and were slower on an
H100): up to 8 rounds, ending early once the digits found hold exactly the keys still needed, or
before the first when the k-th key is a sentinel. It keeps the keys whose score half is above T
and, of those equal to T, the first ones in the chunk's order. A row's keys lie in column order,
the scan's entry half falls as the column rises, and each level keeps its picks in that order,
so the first of the keys tied on T are those with the largest entry halves: torch.topk's picks
with no rounds over the entry half (which ties on the score, common in the indexer's ReLU'd
sums, used to cost eight more). A row longer than a chunk goes in levels: every chunk keeps its
top k (the row's top k are among them), a quarter of its keys at k = 512, so 32K keys take three
launches and 256K five. The last level's one program per row sorts its k keys (tl.sort) and
writes their entries (-1 for a sentinel or a non-finite score), what indexer_topk returns, so no
further kernel runs. From FLOOR_FROM keys a call, one program a row first takes a floor from a
sample of the row, below which no key can be a pick, and the first level counts those keys as
sentinels: most chunks then need no rounds (row_floors; 1M x 32 on an H100 0.220 -> 0.160 ms).

On an H100, at 128K and batch 1, a CSA layer's selection takes 35 us on a decode step's keys
(60 us with the entry-half rounds; torch.topk 150 us); on random keys without ties the kernel is
1.6-5.8x torch.topk's speed at 1-32 rows of 2K-256K keys (load_tests/bench_key_select.py,
kernels/RESULTS.md, fifteenth session).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import key_select_ref

SENTINEL = tl.constexpr(key_select_ref.SENTINEL)
# keys a program holds in registers (8 per thread). Swept on an H100 (k = 512, chunk x warps, us):
# 1 row of 32K keys 8192 x 16 59, 4096 x 8 38, 4096 x 16 35, 2048 x 4 41, 2048 x 8 33; 32 rows of
# 256K 312 / 306 / 317 / 301 / 283; a program's rounds, not its keys, set its time. With 32-bit
# halves and no entry rounds (fifteenth session) 4096 x 8 made the decode step 0.5-2% slower
SELECT_CHUNK = 2048
SELECT_WARPS = 8
# digit bits a round: 8 rounds of 16 bins over the score half. 8 bits (4 rounds of 256 bins) took
# 8-17% longer on an H100 (load_tests/bench_key_select.py --bits 4,8): their histograms and scans
# cost 14 barriers a round to 16 bins' 3
RADIX_BITS = 4
INTERPRET_CHUNK = 1024  # the interpreter: small chunks, so the CPU tests take several levels
# rows up to which the kernel beats torch.topk (kernel_wins). H100, k = 512,
# `python -m load_tests.bench_key_select`: 1.04-3.7x faster at 1-128 rows of 8K-384K keys (the
# gain shrinks with the rows); a prefill chunk's thousands of rows stay with torch.topk.
SELECT_MAX_ROWS = 128
INTERPRET_MAX_ROWS = 8  # the interpreter's cost is per program: a prefill chunk's rows take minutes
# A row floor before the first level (row_floors), from FLOOR_FROM keys in a call (S x n; 0: never).
# A level's time is its programs' rounds, and the first level's programs are most of them (4,096 at
# 1M x 32, each holding 2,048 keys and running up to 8 rounds). One program a row first finds the
# k-th largest score half among FLOOR_SAMPLE of the row's keys spread over it: at least k keys of
# the row are at or above it, so no key below it is a pick, and the first level counts those keys
# as sentinels. On random scores about k x n / FLOOR_SAMPLE keys of a row stay (16K of 1M's 256K),
# so most first-level chunks hold fewer than k live keys and take them with no rounds, and so do
# the next level's. The same picks (the keys above the floor and their order are unchanged).
# H100, the selection alone on the scan's keys (`python -m load_tests.bench_kernel_ab --kernel select
# --set kernels.key_select.FLOOR_FROM=0,1`), floor / none: 1M x 32 (8M keys) 0.73, 512K x 32 and
# 1M x 16 (4M) 0.84, 256K x 32 and 1M x 8 (2M) 0.96-0.98, 128K x 32 (1M) 1.10, at batch 1 1.0-1.3:
# it pays from about 2M keys a call (1,024 first-level programs). In the decode step 256K x 32 and
# 1M x 32 were 2-3% shorter, within the spread between rounds (kernels/RESULTS.md, twenty-second
# and twenty-third sessions).
FLOOR_FROM = 1 << 21
FLOOR_SAMPLE = 8192  # keys of a row the floor is taken from
FLOOR_WARPS = 16  # 16 score halves a thread (sm_90a: 101 registers a thread; at 8 warps 127)
INTERPRET_FLOOR_SAMPLE = 1024


@triton.jit
def _radix_round(v, match, prefix, need, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """One radix round over a chunk's score halves v (uint32): among those agreeing with `prefix`
    above bit SHIFT + BITS (and `match`), histogram the BITS-bit digit at SHIFT and pick the digit d
    holding the need-th largest. Returns (prefix with d, keys still needed within d, keys of d).
    `match` is all true now that no round runs over the entry half; the kernel measured keeps it
    (an unmasked first histogram compiled the last level to 90 registers, not 80)."""
    BINS: tl.constexpr = 1 << BITS
    j = tl.arange(0, BINS)
    if SHIFT + BITS < 32:  # a uint32 shifted by 32 is undefined; the first round has no prefix yet
        agree = match & ((v >> (SHIFT + BITS)) == (prefix >> (SHIFT + BITS)))
    else:
        agree = match
    counts = tl.histogram(((v >> SHIFT) & (BINS - 1)).to(tl.int32), BINS, mask=agree)
    at_least = tl.cumsum(counts, 0, reverse=True)  # keys of digit >= j
    d = tl.sum((at_least >= need).to(tl.int32), 0) - 1
    above = tl.sum(tl.where(j == d + 1, at_least, 0), 0)
    tied = tl.sum(tl.where(j == d, counts, 0), 0)
    return prefix | (d.to(tl.uint32) << SHIFT), need - above, tied


@triton.jit
def _unsigned_half(top):
    """A key's score half (its high int32 word) as a uint32 in unsigned order (its sign bit
    flipped): the rounds shift and compare 32-bit words, half the registers and instructions of
    an int64 half. A sentinel's is 0, the least."""
    return (top ^ -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def _kth_score_half(hi, everyone, K: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """The K-th largest of N score halves hi (uint32; a sentinel's is 0), or less, and how many of
    the keys equal to it are still needed. The rounds stop once the digits found so far hold
    exactly the keys still needed: T's lower digits stay 0, the least the digits found allow, so
    the keys above or equal to it are those found and all of them are taken. They never start when
    the K-th key is a sentinel (score half 0, the least): the chunks of a padded decode row or a
    short row are all sentinels, which the rounds would not split. Either way at least K of the
    keys are at or above T. `everyone` is all true (a tensor: see _radix_round)."""
    ROUNDS: tl.constexpr = 32 // BITS
    hi_t = tl.full([], 0, tl.uint32)
    live = tl.sum((hi > 0).to(tl.int32), 0)
    done = (live < K).to(tl.int32)
    need = tl.where(live < K, K - live, K)
    tied = tl.where(live < K, N - live, 0)
    for rnd in tl.static_range(ROUNDS):
        if done == 0:
            hi_t, need, tied = _radix_round(hi, everyone, hi_t, need, 32 - BITS * (rnd + 1), BITS)
            done = (need == tied).to(tl.int32)
    return hi_t, need


@triton.jit
def _floor_kernel(src32_ptr, n, src_stride, len_ptr, floor_ptr, S, from_keys, K: tl.constexpr,
                  SAMPLE: tl.constexpr, BITS: tl.constexpr, LENGTHS: tl.constexpr, ROWS: tl.constexpr):
    """Row r's floor: the K-th largest score half (or less: _kth_score_half) among SAMPLE of its
    keys, spread over its length (every key where it has fewer), 0 where fewer than K of them are
    live. At least K of the row's keys are at or above it, so no key below it is among the row's
    top K. src32_ptr: the keys as int32 pairs (the score half is the high word). LENGTHS: 0 for
    every row where the S rows' lengths (ROWS >= S) hold fewer than from_keys keys in all."""
    r = tl.program_id(0).to(tl.int64)
    n_row = n
    if LENGTHS:
        # the width S x n let the host launch this, but the rows' lengths may hold far fewer keys
        # (one long request among short ones): then the first level has few programs to spare
        # rounds in and the floor would only cost its own (a fixed graph cannot ask the host)
        rows = tl.arange(0, ROWS)
        total = tl.sum(tl.minimum(tl.load(len_ptr + rows, mask=rows < S, other=0), n).to(tl.int64), 0)
        if total < from_keys:
            tl.store(floor_ptr + r, 0)
            return
        n_row = tl.minimum(tl.load(len_ptr + r), n)
    # one key from each of SAMPLE equal strata of the row, at an offset hashed from the stratum's
    # number (Fibonacci hashing) rather than its start: a row whose scores repeat with some period
    # (every 7th a ReLU'd 0, say) would otherwise be sampled in one phase of it
    j = tl.arange(0, SAMPLE)
    step = tl.maximum(n_row // SAMPLE, 1)
    col = j * step + ((j.to(tl.uint32) * 2654435761) % step.to(tl.uint32)).to(tl.int32)
    top = tl.load(src32_ptr + (r * src_stride + col) * 2 + 1, mask=col < n_row, other=-2147483648)
    hi = _unsigned_half(top)
    hi_t, _ = _kth_score_half(hi, j >= 0, K, SAMPLE, BITS)
    tl.store(floor_ptr + r, hi_t.to(tl.int32, bitcast=True))


@triton.jit
def _select_kernel(src_ptr, n, src_stride, dst_ptr, dst_stride, out_ptr, out_stride, len_ptr, floor_ptr,
                   K: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr, BITS: tl.constexpr,
                   FINAL: tl.constexpr, LENGTHS: tl.constexpr, LEVEL: tl.constexpr,
                   LEVEL_CHUNK: tl.constexpr, FLOOR: tl.constexpr):
    """Top K of chunk g of row r. Not FINAL: its K keys, in the chunk's order (the next level's
    tie-break needs it), to dst[r, g K : (g + 1) K]. FINAL (one chunk per row): the K keys in
    descending order through dst[r, :K_PAD] (scratch), then their entries to out[r, :K].
    LENGTHS: row r's keys end at len[r] (select_entries), LEVEL levels of LEVEL_CHUNK-key chunks
    before this one: a chunk past them reads and writes nothing. FLOOR (the first level only):
    row r's keys below floor[r] (_floor_kernel) count as sentinels, so a chunk holding fewer
    than K others takes them without rounds, and so do the levels after it."""
    g, r = tl.program_id(0), tl.program_id(1).to(tl.int64)
    n_row = n
    if LENGTHS:
        n_row = tl.load(len_ptr + r)
        for _ in tl.static_range(LEVEL):  # each level kept K keys of every chunk holding some
            n_row = tl.cdiv(n_row, LEVEL_CHUNK) * K
        n_row = tl.minimum(n_row, n)
        if not FINAL:
            if g * CHUNK >= n_row:  # the next level reads no further than this row's last chunk
                return
    i = g * CHUNK + tl.arange(0, CHUNK)
    key = tl.load(src_ptr + r * src_stride + i, mask=i < n_row, other=SENTINEL)  # padding ranks last
    if FLOOR:  # the first level under a row floor: the keys below it are not among the row's top K
        # (the least key of the floor's score half: the half back in signed order, its low half 0)
        least = (tl.load(floor_ptr + r) ^ -2147483648).to(tl.int64) << 32
        key = tl.where(key < least, SENTINEL, key)
    hi = _unsigned_half((key >> 32).to(tl.int32))
    everyone = i >= 0
    hi_t, need = _kth_score_half(hi, everyone, K, CHUNK, BITS)
    # The keys above hi_t are all taken, then the first `need` of those equal to it in the chunk's
    # order: a row's keys lie in column order (the scan's entry half is INT32_MAX - column) and
    # every level keeps its picks in that order, so those are the keys with the largest entry
    # halves, torch.topk's picks; no rounds over the entry half. (After an early exit `need` is the
    # whole bucket, whose keys above hi_t are among those above.) Sentinels tie too: any will do.
    above = hi > hi_t
    equal = hi == hi_t
    e_rank = tl.cumsum(equal.to(tl.int32), 0) - 1
    take = above | (equal & (e_rank < need))
    rank = tl.cumsum(take.to(tl.int32), 0) - 1
    dst = dst_ptr + r * dst_stride + (0 if FINAL else g * K)
    tl.store(dst + rank, key, mask=take)  # in the chunk's order, which the next level relies on
    if FINAL:
        tl.debug_barrier()  # the scratch row's stores, by every thread, before any thread reads it
        c = tl.arange(0, K_PAD)
        best = tl.sort(tl.load(dst + c, mask=c < K, other=SENTINEL), descending=True)
        top = (best >> 32).to(tl.int32)
        bits = tl.where(top < 0, top ^ 0x7FFFFFFF, top)  # the float32 score's bits
        finite = (bits & 0x7F800000) != 0x7F800000
        entry = (2147483647 - (best & 4294967295)).to(tl.int32)
        tl.store(out_ptr + r * out_stride + c, tl.where(finite, entry, -1), mask=c < K)


def _chunk(device: torch.device) -> int:
    return SELECT_CHUNK if device.type == "cuda" else INTERPRET_CHUNK


def kernel_wins(rows: int, k: int, device: torch.device) -> bool:
    """Whether select_entries takes `rows` rows' top k and beats torch.topk there (the same picks
    either way; SELECT_MAX_ROWS). The interpreter takes it for decode-sized row counts, so the CPU
    tests run it where a decode step does, and leaves a prefill chunk's rows to torch.topk.
    `V4SERVE_SELECT=torch` keeps torch.topk everywhere (to compare a step with and without)."""
    choice = os.environ.get("V4SERVE_SELECT", "auto")
    if choice not in ("auto", "torch"):
        raise ValueError(f"V4SERVE_SELECT must be auto or torch, got {choice!r}")
    if choice == "torch" or k > _chunk(device) // 2:
        return False
    return rows <= (SELECT_MAX_ROWS if device.type == "cuda" else INTERPRET_MAX_ROWS)


def select_entries(keys: torch.Tensor, k: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The entries of each row's k largest score keys, in descending key order, -1 where the key
    is a sentinel or its score is not finite: [S, k] int32 (key_select_ref.select_entries). The
    keys are the scan's: key c of a row holds entry c (its entry half INT32_MAX - c), which the
    kernel's tie-break relies on (module docstring). `lengths` [S] int32: row r's keys at columns
    from lengths[r] on count as sentinels and are never read (the scan need not write them: a
    short request's row in a batch with a long one is then selected at its own length)."""
    S, n = keys.shape
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in 1..{n} (the row's keys)")
    if keys.dtype != torch.int64 or keys.stride(1) != 1:
        raise ValueError(f"keys must be int64 with contiguous rows, got {keys.dtype} strides {keys.stride()}")
    if lengths is not None and (lengths.shape != (S,) or lengths.dtype != torch.int32 or lengths.device != keys.device):
        raise ValueError(f"lengths must be int32 [{S}] on {keys.device}, got {lengths.dtype} "
                         f"{list(lengths.shape)} on {lengths.device}")
    out = torch.empty(S, k, dtype=torch.int32, device=keys.device)
    if S == 0:
        return out
    chunk = _chunk(keys.device)
    if k > chunk // 2:
        raise ValueError(f"k={k} is more than half a chunk ({chunk} keys): the levels would not shrink the row")
    k_pad = triton.next_power_of_2(k)
    consts = dict(K=k, K_PAD=k_pad, BITS=RADIX_BITS, LENGTHS=lengths is not None, LEVEL_CHUNK=chunk)
    len_arg = lengths if lengths is not None else out  # not read without LENGTHS
    # (a last level over two chunks at twice the warps, saving a launch for rows that would end in a
    # level of two, moved an H100's decode step by no more than 1.4% either way: sixteenth session)
    floored = takes_floor(S, n, k, keys.device)
    floor = row_floors(keys, k, lengths) if floored else out  # not read without FLOOR
    src, level = keys, 0
    while src.shape[1] > chunk:  # each level keeps the top k of every chunk: the row's top k survive
        n_chunks = triton.cdiv(src.shape[1], chunk)
        dst = torch.empty(S, n_chunks * k, dtype=torch.int64, device=keys.device)
        _select_kernel[(n_chunks, S)](src, src.shape[1], src.stride(0), dst, dst.stride(0), out, out.stride(0),
                                      len_arg, floor, CHUNK=chunk, FINAL=False, LEVEL=level,
                                      FLOOR=floored and level == 0, num_warps=SELECT_WARPS, **consts)
        src, level = dst, level + 1
    scratch = torch.empty(S, k_pad, dtype=torch.int64, device=keys.device)
    _select_kernel[(1, S)](src, src.shape[1], src.stride(0), scratch, scratch.stride(0), out, out.stride(0),
                           len_arg, out, CHUNK=chunk, FINAL=True, LEVEL=level, FLOOR=False, num_warps=SELECT_WARPS,
                           **consts)
    return out


def _floor_sample(device: torch.device) -> int:
    return FLOOR_SAMPLE if device.type == "cuda" else INTERPRET_FLOOR_SAMPLE


def takes_floor(rows: int, n: int, k: int, device: torch.device) -> bool:
    """Whether select_entries first finds each row's floor (row_floors): FLOOR_FROM keys in all
    and more, rows longer than a chunk (levels to spare work in), and a sample with room above k.
    With row lengths the floor kernel checks their sum too, which the host cannot see."""
    return 0 < FLOOR_FROM <= rows * n and n > _chunk(device) and _floor_sample(device) >= 2 * k


def row_floors(keys: torch.Tensor, k: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[S] int32: each row's floor, a uint32 score half (bits) at or below its k-th largest key's,
    from a sample of its keys (_floor_kernel; 0 where the sample holds fewer than k live keys, and
    for every row where the lengths hold fewer than FLOOR_FROM keys in all).
    select_entries' first level takes every key below it for a sentinel. The arguments are
    select_entries' (it checks them: keys int64 with contiguous rows, lengths int32 [S])."""
    S, n = keys.shape
    floor = torch.empty(S, dtype=torch.int32, device=keys.device)
    if S:
        _floor_kernel[(S,)](keys.view(torch.int32), n, keys.stride(0), lengths if lengths is not None else floor,
                            floor, S, FLOOR_FROM, K=k, SAMPLE=_floor_sample(keys.device), BITS=RADIX_BITS,
                            LENGTHS=lengths is not None, ROWS=triton.next_power_of_2(S), num_warps=FLOOR_WARPS)
    return floor
