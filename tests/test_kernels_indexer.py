"""The lightning indexer kernel (kernels/indexer_topk.py) against kernels/indexer_topk_ref.py.

Tolerance: the kernel's products are exact (FP4 keys against FP8 query codes or BF16 query
parts), so its scores differ from index_scores only by float32 summation order:
|score - ref| <= 1e-5 * M, where M = sum_h |w_h| * sum_d |q_hd * k_d| * Di**-0.5 bounds every
partial sum. Selections must equal select_topk's except for entries whose reference score is
within that tolerance of the k-th score (there the order of two scores can flip); exact ties
follow the reference exactly.
"""

import itertools

import pytest
import torch

from kernels import indexer_topk as K
from kernels import scan_plan
from kernels.block_quant import fp4_e2m1_block_qdq, hadamard
from kernels.key_select_ref import scores_from_keys
from kernels.quantize import reference_decode_index, reference_encode_index

RTOL = 1e-5


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")


def make_cache(n_pages, Di, seed, device="cpu"):
    """Index rows of n_pages pages holding model-like keys (Hadamard + FP4-rounded), each block of
    32 scaled by its own power of two so that the blocks' scale bytes differ."""
    g = torch.Generator().manual_seed(seed)
    block_scale = torch.exp2(torch.randint(-3, 4, (n_pages * 64, Di // 32, 1), generator=g).float())
    keys = (hadamard(torch.randn(n_pages * 64, Di, generator=g)).view(-1, Di // 32, 32) * block_scale).view(-1, Di)
    keys = fp4_e2m1_block_qdq(keys, 32)
    return reference_encode_index(keys).view(n_pages, 64, -1).to(device)


def make_queries(S, Hi, Di, seed, kind, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, Hi, Di, generator=g)
    if kind == "fp4":  # what the model feeds the indexer with compact caches: one BF16 part
        q = fp4_e2m1_block_qdq(hadamard(q), 32)
    w = torch.randn(S, Hi, generator=g) * Hi**-0.5
    return q.to(device), w.to(device)


def magnitude(q, w, rows, table, n_cols):
    """M per query and entry (see the module docstring)."""
    Di = q.shape[-1]
    out = []
    for i in range(q.shape[0]):
        t = table[0 if table.shape[0] == 1 else i]
        raw = rows[t[: -(-n_cols // 64)].long()].reshape(-1, rows.shape[-1])[:n_cols]
        keys = reference_decode_index(raw, Di).abs()
        out.append(torch.einsum("h,hd,nd->n", w[i].abs(), q[i].abs(), keys) * Di**-0.5)
    return torch.stack(out)


def assert_scores_close(q, w, rows, table, pos):
    n_cols = 64 * table.shape[1]
    got = scores_from_keys(K.index_score_keys(q, w, rows, table, pos, n_cols))
    want = K.reference_scores(q, w, rows, table, pos, n_cols)
    visible = torch.arange(n_cols, device=q.device)[None] < ((pos + 1) // 4)[:, None]
    tol = RTOL * magnitude(q, w, rows, table, n_cols)
    assert got[~visible].isnan().all(), "invisible entries must carry the sentinel"
    err = (got - want).abs()[visible]
    assert (err <= tol[visible]).all(), f"max error {err.max()} (tolerance {tol[visible][err.argmax()]})"


def assert_same_selection(got, q, w, rows, table, pos, topk):
    want = K.reference(q, w, rows, table, pos, topk)
    n_cols = 64 * table.shape[1]
    scores = K.reference_scores(q, w, rows, table, pos, n_cols)
    tol = RTOL * magnitude(q, w, rows, table, n_cols)
    for i in range(q.shape[0]):
        g, r = set(got[i].tolist()), set(want[i].tolist())
        assert (got[i] == -1).sum() == (want[i] == -1).sum(), f"query {i}: padding differs"
        differ = (g ^ r) - {-1}
        if differ:
            kth = scores[i, want[i][want[i] >= 0][-1]]
            for e in differ:
                assert (scores[i, e] - kth).abs() <= tol[i, e] + tol[i].max(), \
                    f"query {i}: entry {e} (score {scores[i, e]}) swapped though the k-th score is {kth}"


@pytest.mark.parametrize("kind", ["fp4", "float"])  # one BF16 query part / three
# Di=64: 34-byte rows, scale bytes loaded one by one; 128 and 256: 4-byte aligned rows, scales read as
# one and two 32-bit words (a wrong byte of a word would scale a block by another block's scale)
@pytest.mark.parametrize("Hi,Di", [(16, 64), (20, 128), (16, 256)])
def test_scores_match_index_scores_through_a_shuffled_table(triton_mode, kind, Hi, Di):
    rows = make_cache(10, Di, seed=1)
    table = torch.randperm(10, generator=torch.Generator().manual_seed(2))[:6].int().repeat(3, 1)
    pos = torch.tensor([6 * 256 - 1, 4 * 100 + 2, 2])  # full table, mid-page, nothing visible
    q, w = make_queries(3, Hi, Di, seed=3, kind=kind)
    assert_scores_close(q, w, rows, table, pos)


@pytest.mark.parametrize("kind", ["fp4", "float"])
def test_topk_selects_what_indexer_select_selects(triton_mode, kind):
    Hi, Di, topk = 16, 64, 48
    rows = make_cache(12, Di, seed=4)
    g = torch.Generator().manual_seed(5)
    table = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(4)]).int()  # a request per query
    pos = torch.tensor([5 * 256 - 1, 700, 4 * 30 + 3, 4 * 47 + 3])  # 320, 175, 31 (< topk), 48 (= topk) visible
    q, w = make_queries(4, Hi, Di, seed=6, kind=kind)
    got = K.indexer_topk(q, w, rows, table, pos, topk)
    assert got.dtype == torch.int32 and got.shape == (4, topk)
    assert (got[2, 31:] == -1).all() and (got[2, :31] >= 0).all()
    assert_same_selection(got, q, w, rows, table, pos, topk)


def test_prefill_chunk_shares_one_table_row_with_causal_visibility(triton_mode):
    Hi, Di, topk = 16, 64, 8
    rows = make_cache(4, Di, seed=7)
    table = torch.tensor([[3, 0, 2]], dtype=torch.int32)
    pos = torch.arange(60, 700, 40)  # visible counts grow along the chunk, crossing pages
    q, w = make_queries(pos.numel(), Hi, Di, seed=8, kind="fp4")
    got = K.indexer_topk(q, w, rows, table, pos, topk)
    assert (got < ((pos + 1) // 4)[:, None]).all(), "an entry from the query's future was selected"
    assert_same_selection(got, q, w, rows, table, pos, topk)


def test_exact_ties_go_to_the_lower_index_in_reference_order(triton_mode):
    Hi, Di, topk = 16, 64, 24
    rows = make_cache(2, Di, seed=9)
    rows[:, 32:] = rows[:, :32]  # every key appears twice in each page
    rows[1] = rows[0]  # and page 1 repeats page 0
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    pos = torch.tensor([511, 300])
    q, w = make_queries(2, Hi, Di, seed=10, kind="fp4")
    got = K.indexer_topk(q, w, rows, table, pos, topk)
    assert torch.equal(got, K.reference(q, w, rows, table, pos, topk))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the dots, masked later
def test_unwritten_rows_past_the_visible_entries_are_never_used(triton_mode):
    Hi, Di, topk = 16, 64, 40
    rows = make_cache(3, Di, seed=11)
    rows[2, 10:] = 0xFF  # page 2 has 10 written entries; bytes past them decode to inf (scale 255)
    table = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    pos = torch.tensor([4 * 138 - 1])  # 138 visible = 2 full pages + 10
    q, w = make_queries(1, Hi, Di, seed=12, kind="fp4")
    keys = K.index_score_keys(q, w, rows, table, pos, 192)
    assert scores_from_keys(keys)[0, :138].isfinite().all() and scores_from_keys(keys)[0, 138:].isnan().all()
    assert_same_selection(K.indexer_topk(q, w, rows, table, pos, topk), q, w, rows, table, pos, topk)


def test_a_query_scores_the_same_alone_in_a_batch_and_split_over_programs(triton_mode, monkeypatch):
    Hi, Di = 16, 64
    rows = make_cache(8, Di, seed=13)
    g = torch.Generator().manual_seed(14)
    table = torch.stack([torch.randperm(8, generator=g)[:7] for _ in range(3)]).int()
    pos = torch.tensor([7 * 256 - 1, 900, 1500])
    q, w = make_queries(3, Hi, Di, seed=15, kind="float")
    batch = K.index_score_keys(q, w, rows, table, pos, 448)  # the plan (kernels/scan_plan.py)
    alone = K.index_score_keys(q[1:2], w[1:2], rows, table[1:2], pos[1:2], 448)
    monkeypatch.setattr(scan_plan, "CPU_SMS", 1)  # the plan over fewer programs
    fewer = K.index_score_keys(q, w, rows, table, pos, 448)
    monkeypatch.setattr(scan_plan, "PLANNED", False)
    monkeypatch.setattr(K, "_pages_per_program", lambda *args: 3)  # per query, 7 pages: 3 + 3 + 1
    split = K.index_score_keys(q, w, rows, table, pos, 448)
    assert torch.equal(batch[1], alone[0])
    assert torch.equal(batch, fewer) and torch.equal(batch, split)


@pytest.mark.parametrize("planned", [True, False])
def test_keys_with_lengths_are_the_keys_up_to_each_rows_length(triton_mode, monkeypatch, planned):
    """index_score_keys_and_lengths (the decode top-k's scan): each row's length is its visible
    entries within its table, its keys up to there index_score_keys' bits, for queries of both
    scans, one seeing nothing and one past its table, under the plan and the per-query split; and
    the top-k from them is the one from the full keys."""
    monkeypatch.setattr(scan_plan, "PLANNED", planned)
    Hi, Di, n_blk = 16, 64, 6
    rows = make_cache(30, Di, seed=40)
    g = torch.Generator().manual_seed(41)
    table = torch.stack([torch.randperm(30, generator=g)[:n_blk] for _ in range(5)]).int()
    pos = torch.tensor([0, 5 * 256 - 1, 3 * 256 + 9, 100, n_blk * 256 + 500])
    q, w = make_queries(5, Hi, Di, seed=42, kind="fp4")
    q[2] = make_queries(1, Hi, Di, seed=43, kind="float")[0][0]  # the general scan's
    n_cols = (n_blk + 3) * 64
    full = K.index_score_keys(q, w, rows, table, pos, n_cols)
    keys, lengths = K.index_score_keys_and_lengths(q, w, rows, table, pos, n_cols)
    assert lengths.tolist() == [min((int(p) + 1) // 4, n_blk * 64) for p in pos]
    for r, n in enumerate(lengths.tolist()):
        assert torch.equal(keys[r, :n], full[r, :n])
        assert (full[r, n:] == K.SENTINEL).all()  # what the selection takes the unwritten columns for
    picks = {}
    for row_lengths in (True, False):
        monkeypatch.setattr(K, "ROW_LENGTHS", row_lengths)
        picks[row_lengths] = K.indexer_topk(q, w, rows, table, pos, 40)
    assert torch.equal(picks[True], picks[False])
    assert_same_selection(picks[True], q, w, rows, table, pos, 40)


def test_operands_computed_ahead_give_the_same_keys_and_picks(triton_mode):
    """query_operands (as a decode step computes them inside its graph), sliced to the queries a
    call sees, give what the scan computes from q and w itself; a wrong slice or padding would
    score other queries' heads."""
    Hi, Di = 16, 64
    rows = make_cache(8, Di, seed=16)
    table = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i))[:7] for i in range(3)]).int()
    pos = torch.tensor([7 * 256 - 1, 900, 1500])
    q, w = make_queries(3, Hi, Di, seed=17, kind="float")
    ops = K.query_operands(q, w)
    assert torch.equal(K.index_score_keys(q, w, rows, table, pos, 448, ops), K.index_score_keys(q, w, rows, table, pos, 448))
    sub = tuple(t[1:] for t in ops)
    assert torch.equal(K.indexer_topk(q[1:], w[1:], rows, table[1:], pos[1:], 40, sub),
                       K.indexer_topk(q[1:], w[1:], rows, table[1:], pos[1:], 40))


def test_model_queries_take_the_fp8_scan_and_others_the_general_one(triton_mode):
    """FP4-rounded queries (the model's) are exact as E4M3 codes times a power of two per head;
    float32 queries, a head whose values span more than E4M3's range, or one exact in E4M3 but
    off the FP4 grid (its block sums would need more bits than the FP8 dot keeps exactly) are not
    and must take the general scan. A batch mixing them gives each query the keys it gets alone."""
    Hi, Di = 16, 64
    fp4, _ = make_queries(2, Hi, Di, seed=20, kind="fp4")
    flt, _ = make_queries(1, Hi, Di, seed=21, kind="float")
    wide = fp4[:1].clone()
    wide[0, 3, 0], wide[0, 3, 1] = 1.0, 2.0**-20  # 2**20 apart in one head: no E4M3 code holds both
    e4m3 = fp4[:1].clone()
    # 1.25 = 1.01b times a power of two below the head's largest value: an E4M3 code at the
    # head's scale, but no E2M1 value (mantissas 1.0 and 1.5) at any block scale
    e4m3[0, 5, 7] = 1.25 * torch.exp2(e4m3[0, 5].abs().max().log2().floor() - 1)
    q = torch.cat([fp4, flt, wide, e4m3])
    w = torch.randn(5, Hi, generator=torch.Generator().manual_seed(22))
    q8, w8, _, mode, _ = K.query_operands(q, w)
    assert mode.tolist() == [K.MODE_FP8, K.MODE_FP8, K.MODE_GENERAL, K.MODE_GENERAL, K.MODE_GENERAL]
    # the scan's K order: in every group of 8 elements, the 4 even ones, then the 4 odd ones
    i, odd, j = torch.meshgrid(torch.arange(4), torch.arange(2), torch.arange(4), indexing="ij")
    k_order = (8 * i + 2 * j + odd).flatten()
    codes = torch.empty(2, q8.shape[2], Di // 32, 32)  # back to [S, Hi, Di] from that order
    codes[..., k_order] = q8[:2].float().transpose(1, 2)
    head_scale = w8[:2, :Hi] / (w[:2] * K.E2M1_TO_E4M3_SCALE * Di**-0.5)
    assert torch.equal(head_scale, torch.exp2(head_scale.log2().round()))  # powers of two
    assert torch.equal(codes.flatten(2)[:, :Hi] * head_scale[..., None], fp4)
    rows = make_cache(6, Di, seed=23)
    table = torch.randperm(6, generator=torch.Generator().manual_seed(24))[:5].int().repeat(5, 1)
    pos = torch.tensor([5 * 256 - 1, 900, 1100, 1279, 1000])
    assert_scores_close(q, w, rows, table, pos)
    batch = K.index_score_keys(q, w, rows, table, pos, 320)
    for i in range(5):
        assert torch.equal(batch[i], K.index_score_keys(q[i:i + 1], w[i:i + 1], rows, table[i:i + 1], pos[i:i + 1], 320)[0])


@pytest.mark.parametrize("copies", [1, 8])
@pytest.mark.parametrize("Hi,Di", [(16, 64), (64, 128), (12, 32)])
def test_operands_kernel_gives_the_reference_bits(triton_mode, Hi, Di, copies):
    """scan_operands (one launch) against operands_reference (torch): every output bit for bit,
    for the mix of queries the test above uses (FP4-rounded, float, a too-wide head, a value off
    the FP4 grid), with -0.0, a zero head, heads padded to a power of two and strided q rows; 5
    queries, or 40 (the interpreter's programs take 16 each: the last one part empty)."""
    from kernels.scan_operands import scan_operands

    fp4, _ = make_queries(3, Hi, Di, seed=40, kind="fp4")
    flt, _ = make_queries(2, Hi, Di, seed=41, kind="float")
    q = torch.cat([fp4, flt])
    q[0, 1, 0], q[0, 1, 1] = 1.0, 2.0**-20
    q[1, 2, 3] = 1.25 * torch.exp2(q[1, 2].abs().max().log2().floor() - 1)
    q[2, 0] = 0.0
    q[2, 1, :4] = -0.0
    q = q.repeat(copies, 1, 1)
    q = torch.cat([q, q], dim=2)[:, :, :Di]  # rows of stride 2 * Di: not contiguous
    w = torch.randn(5 * copies, Hi, generator=torch.Generator().manual_seed(42))
    hp = max(16, 1 << (Hi - 1).bit_length())
    got = scan_operands(q, w, hp)
    want = K.operands_reference(q, w, hp)
    assert got[3].tolist()[:2] == [K.MODE_GENERAL, K.MODE_GENERAL] and K.MODE_FP8 in got[3].tolist()
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                           r.view(torch.uint8) if r.dtype == torch.float8_e4m3fn else r)
    with pytest.raises(ValueError, match="scan_operands"):
        scan_operands(q, w, Hi - 1)


@pytest.mark.gpu
def test_gpu_operands_kernel_gives_the_reference_bits_at_flash_attn_shapes(triton_mode):
    from kernels.scan_operands import scan_operands

    fp4, w = make_queries(200, 64, 128, seed=43, kind="fp4", device="cuda")
    flt, _ = make_queries(100, 64, 128, seed=44, kind="float", device="cuda")
    q = torch.cat([fp4, flt])
    w = torch.cat([w, w[:100]])
    got, want = scan_operands(q, w, 64), K.operands_reference(q, w, 64)
    assert got[3].sum() == 100 * K.MODE_GENERAL  # the float queries, and only they
    for g, r in zip(got, want):
        assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                           r.view(torch.uint8) if r.dtype == torch.float8_e4m3fn else r)


def test_fp4_grid_is_read_off_the_e4m3_bits_as_fp4_rounding_defines_it():
    """_on_fp4_grid(codes) holds exactly where re-rounding to FP4 changes nothing (and no E4M3
    subnormal but 2**-7 is involved), for FP4-rounded blocks and for blocks with one value moved
    off the grid in every way: a third mantissa bit, 1.5 at or below the block's bottom binade, a
    value too small for the block's scale."""
    g = torch.Generator().manual_seed(31)
    on = fp4_e2m1_block_qdq(torch.randn(64, 8, 128, generator=g) * 4, 32)
    off = on.clone()
    top = off.abs().unflatten(-1, (-1, 32)).amax(-1)  # [64, 8, 4]
    binade = torch.exp2(top.log2().floor())
    for i, factor in enumerate((1.25, 0.75 / 8, 0.5 / 16, 1.5 / 8, 1.0 / 8)):  # only the last stays on the grid
        off[:, i, 0] = top[:, i, 0]  # the block's largest value stays where it was: so does its scale
        off[:, i, 7] = factor * binade[:, i, 0]
    q = torch.cat([on, off])
    scale = torch.exp2((q.abs().amax(-1, keepdim=True) / 448).log2().ceil())
    codes = (q / scale).to(torch.float8_e4m3fn)
    assert torch.equal(codes.float() * scale, q)  # all exact E4M3: only the grid differs
    grid = K._on_fp4_grid(codes).unflatten(-1, (-1, 32)).all(-1)
    want = (fp4_e2m1_block_qdq(q, 32) == q).unflatten(-1, (-1, 32)).all(-1)
    assert torch.equal(grid, want)
    assert want[:64].all() and not want[64:, :4, 0].any() and want[64:, 4, 0].all()


def test_fp8_scan_keys_do_not_depend_on_pages_per_step_or_program(triton_mode, monkeypatch):
    """The FP8 scan scores 2 pages per step; a key must not depend on which step or program
    scores it (a query's picks would then depend on its context length's parity or its batch)."""
    Hi, Di = 16, 128
    rows = make_cache(8, Di, seed=25)
    table = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(26 + i))[:7] for i in range(2)]).int()
    pos = torch.tensor([7 * 256 - 1, 5 * 256 + 10])  # 7 pages (an odd count), 5 pages and a part of one
    q, w = make_queries(2, Hi, Di, seed=27, kind="fp4")
    base = K.index_score_keys(q, w, rows, table, pos, 448)
    monkeypatch.setattr(K, "FP8_PAGES", 1)
    assert torch.equal(K.index_score_keys(q, w, rows, table, pos, 448), base)
    monkeypatch.setattr(K, "FP8_PAGES", 2)
    monkeypatch.setattr(K, "_pages_per_program", lambda *args: 3)  # 3 + 3 + 1 pages
    assert torch.equal(K.index_score_keys(q, w, rows, table, pos, 448), base)
    assert_scores_close(q, w, rows, table, pos)


def test_a_gluon_scan_that_does_not_compile_leaves_the_triton_scan_in_its_place(triton_mode, monkeypatch, caplog):
    """Gluon's API moves between Triton releases: if the Hopper kernel fails to compile, the call
    still returns the Triton scan's keys, says so once, and later calls go straight to Triton."""
    from triton.compiler.errors import CompilationError

    from kernels import indexer_scan_hopper as H

    Hi, Di = 16, 128
    rows = make_cache(6, Di, seed=33)
    table = torch.randperm(6, generator=torch.Generator().manual_seed(34))[:5].int().repeat(2, 1)
    pos = torch.tensor([5 * 256 - 1, 3 * 256 + 9])
    q, w = make_queries(2, Hi, Di, seed=35, kind="fp4")
    want = K.index_score_keys(q, w, rows, table, pos, 320)
    calls = []

    def broken(*args):
        calls.append(args)
        raise CompilationError("kernel.py", None, "no such Gluon builtin")

    monkeypatch.setattr(K, "HOPPER_SCAN", True)
    monkeypatch.setattr(H, "usable", lambda q8, index_rows: True)
    monkeypatch.setattr(H, "scan_fp8", broken)
    with caplog.at_level("WARNING", logger=K.__name__):
        assert torch.equal(K.index_score_keys(q, w, rows, table, pos, 320), want)
        assert torch.equal(K.index_score_keys(q, w, rows, table, pos, 320), want)
    assert len(calls) == 1 and K.HOPPER_SCAN is False
    assert sum("Gluon FP8 scan failed" in r.getMessage() for r in caplog.records) == 1


def test_scale_words_are_read_only_from_4_byte_aligned_rows_pages_and_base():
    from kernels.kv_layout import index_scales_as_words

    pool = torch.zeros(3, 2, 64, 68, dtype=torch.uint8)  # pages of two slots, as the pools interleave them
    assert index_scales_as_words(pool[:, 1], 128)
    assert not index_scales_as_words(pool[:, 1], 64)  # 2 scales a row: no whole word
    assert not index_scales_as_words(pool.view(-1)[1:1 + 3 * 64 * 68].view(3, 64, 68), 128)  # base off by a byte
    assert not index_scales_as_words(torch.zeros(3, 64, 70, dtype=torch.uint8)[..., :68], 128)  # 70-byte rows
    odd_pages = torch.zeros(3 * 64 * 68 + 6, dtype=torch.uint8).as_strided((3, 64, 68), (64 * 68 + 2, 68, 1))
    assert not index_scales_as_words(odd_pages, 128)  # pages 2 bytes apart from 4-byte alignment


def test_bulk_copies_read_only_pages_of_back_to_back_rows_on_16_byte_boundaries():
    from kernels.indexer_scan_hopper import bulk_copy_usable

    pool = torch.zeros(3, 2, 64, 68, dtype=torch.uint8)  # pages of two slots, as the pools interleave them
    assert bulk_copy_usable(pool[:, 1])
    assert bulk_copy_usable(torch.zeros(5, 64, 68, dtype=torch.uint8))
    assert not bulk_copy_usable(pool.view(-1)[4:4 + 3 * 64 * 68].view(3, 64, 68))  # base 4 bytes off
    assert not bulk_copy_usable(torch.zeros(3, 64, 72, dtype=torch.uint8)[..., :68])  # rows not back to back
    odd_pages = torch.zeros(3 * 64 * 68 + 16, dtype=torch.uint8).as_strided((3, 64, 68), (64 * 68 + 4, 68, 1))
    assert not bulk_copy_usable(odd_pages)  # pages 4 bytes apart from 16-byte alignment


@pytest.mark.parametrize("setting,value", [("LOADER", "bulkws"), ("SCORED_PAGES", 4), ("FACTORED_STEPS", 0)])
def test_an_unknown_gluon_scan_setting_is_an_error_not_a_silent_choice(monkeypatch, setting, value):
    from kernels import indexer_scan_hopper as H

    monkeypatch.setattr(H, setting, value)
    rows = torch.zeros(2, 64, 68, dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"{setting} must .*{value}"):
        H.scan_fp8(torch.zeros(1, 4, 64, 32), torch.zeros(1, 64), torch.zeros(1, dtype=torch.int32),
                   torch.zeros(1, dtype=torch.int64), rows, torch.zeros(1, 2, dtype=torch.int32),
                   torch.zeros(1, 128, dtype=torch.int64), 128, 2, -1, 0)


def test_the_gluon_scans_general_operands_are_taken_only_as_its_scorer_reads_them():
    """The bulk_ws kernel reads a general query's three BF16 parts as [3, hp, Di] back to back from
    the query's base, and its head weights contiguous: operands laid out otherwise must be refused
    before a launch, not read wrong (a query's own stride is free: a prefill block's slice)."""
    from kernels import indexer_scan_hopper as H

    q, w = make_queries(4, 64, 128, seed=38, kind="float")
    q8, w8, parts, _, w_pad = K.operands_reference(q, w, 64)
    H._check_general(parts, w_pad, w8)
    H._check_general(parts[::2], w_pad[::2].contiguous(), w8[::2])
    bad = [(parts.float(), w_pad), (parts.transpose(2, 3).contiguous().transpose(2, 3), w_pad),
           (parts[:, :2], w_pad), (parts, w_pad.double()), (parts, w_pad.t().contiguous().t()), (parts[:3], w_pad)]
    for p, wp in bad:
        with pytest.raises(ValueError, match="general operands"):
            H._check_general(p, wp, w8)


def test_scan_traffic_counts_key_rows_and_dot_flops():
    nbytes, flops = K.scan_traffic(2, 1 << 20, 64, 128)
    n = (1 << 20) // 4
    assert nbytes == 2 * (n * (68 + 8) + 64 * 128 * 2 + 64 * 4)
    assert flops == 2 * n * 64 * (2 * 128 + 3)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["fp4", "float"])
def test_gpu_flash_attn_shapes_at_128k(triton_mode, kind):
    Hi, Di, topk, n_blk = 64, 128, 512, 512  # 512 blocks = 131072 positions
    rows = make_cache(4 * n_blk, Di, seed=16, device="cuda")
    g = torch.Generator().manual_seed(17)
    table = torch.stack([torch.randperm(4 * n_blk, generator=g)[:n_blk] for _ in range(4)]).int().cuda()
    pos = torch.tensor([131071, 100_000, 4 * 513 - 1, 1000], device="cuda")
    q, w = make_queries(4, Hi, Di, seed=18, kind=kind, device="cuda")
    assert_scores_close(q, w, rows, table, pos)
    assert_same_selection(K.indexer_topk(q, w, rows, table, pos, topk), q, w, rows, table, pos, topk)


@pytest.mark.gpu
def test_gpu_prefill_chunk_at_flash_attn_shapes(triton_mode):
    Hi, Di, topk = 64, 128, 512
    rows = make_cache(40, Di, seed=19, device="cuda")
    table = torch.randperm(40, generator=torch.Generator().manual_seed(20))[:32].int()[None].cuda()
    pos = torch.arange(8192 - 256, 8192, device="cuda")
    q, w = make_queries(256, Hi, Di, seed=21, kind="fp4", device="cuda")
    got = K.indexer_topk(q, w, rows, table, pos, topk)
    assert_same_selection(got, q, w, rows, table, pos, topk)


N_BLK = 96  # the GPU scan tests' table width in pages


def scan_pool(device="cuda"):
    """The GPU scan tests' pool of 5 x N_BLK pages of model-like keys (Di = 128), and five tables
    of N_BLK of its pages each."""
    rows = make_cache(5 * N_BLK, 128, seed=28, device=device)
    g = torch.Generator().manual_seed(29)
    tables = torch.stack([torch.randperm(5 * N_BLK, generator=g)[:N_BLK] for _ in range(5)]).int().to(device)
    return rows, tables


def forty_decode_rows(tables, device="cuda"):
    """40 decode rows of scan_pool's tables: every length from nothing to a whole table (odd and
    even page counts, partial pages), every fifth one off the FP4 grid (the general scan's), as
    (q, w, table, positions, n_cols)."""
    pos = torch.tensor([(i * 2459) % (N_BLK * 256) for i in range(40)], device=device)
    q, w = make_queries(40, 64, 128, seed=36, kind="fp4", device=device)
    q[::5] = make_queries(8, 64, 128, seed=37, kind="float", device=device)[0]
    return q, w, tables[torch.arange(40) % 5], pos, N_BLK * 64 + 64 * 40


@pytest.mark.gpu
# factored: the fewest steps a bulk_ws program takes the factored sums for; 1 makes every program
# here take them (these queries give a program a step or two), 8 (shipped) none. general_here: the
# bulk_ws launch scores the general scan's queries too (the registers loader never does): the
# per-query split runs with it on and off
@pytest.mark.parametrize("loader,scored_pages,per_sm,planned,factored,general_here", [
    ("registers", 2, 2, True, 1, True), ("bulk_ws", 2, 2, True, 1, True), ("bulk_ws", 1, 3, True, 1, False),
    ("bulk_ws", 2, 2, False, 8, True), ("bulk_ws", 2, 2, False, 8, False)])
def test_gpu_hopper_scan_gives_the_triton_scans_keys(triton_mode, monkeypatch, loader, scored_pages, per_sm, planned,
                                                     factored, general_here):
    """On Hopper the FP8 scan runs in Gluon (indexer_scan_hopper.py): with each way of loading its
    pages and of scoring them (two pages at once, or page by page at three programs an SM), and of
    splitting them over programs (the plan, or equal shares per query), its keys must be the
    Triton kernel's bit for bit, for decode rows of their own requests (a partial page, a query
    seeing nothing, a table wider than the context, queries of both modes in one launch), for 40
    such rows of very different lengths and for a prefill chunk sharing one table row; for key
    scale codes and head weights at and past the ends of the range the bulk_ws scorer's factored
    sums cover. Where the bulk_ws launch scores the general scan's queries itself (GENERAL_HERE),
    their keys must be the Triton general scan's too, the smallest scale codes (0: a zero scale
    there, and 1) included."""
    from kernels import indexer_scan_hopper as H

    if not H.usable(torch.zeros(1, 4, 64, 32, device="cuda"), torch.zeros(1, 64, 68, dtype=torch.uint8, device="cuda")):
        pytest.skip("needs a Hopper GPU with Gluon")
    assert loader in H.LOADERS
    monkeypatch.setattr(H, "LOADER", loader)
    monkeypatch.setattr(H, "SCORED_PAGES", scored_pages)
    monkeypatch.setattr(H, "PROGRAMS_PER_SM", per_sm)
    monkeypatch.setattr(H, "FACTORED_STEPS", factored)
    monkeypatch.setattr(H, "GENERAL_HERE", general_here)
    monkeypatch.setattr(scan_plan, "PLANNED", planned)
    Hi, Di, n_blk = 64, 128, N_BLK
    rows, table = scan_pool()
    assert H.bulk_copy_usable(rows)  # so the bulk loader is the one compared
    # a copy with the smallest scale codes in every query's first page: byte 0 is 2**-127, a
    # subnormal (kv_layout), byte 1 the smallest normal; rows whose blocks all have them score tiny
    # but not 0. Compared bit for bit only: the reference's tolerance scales with magnitudes that
    # underflow there
    small = rows.clone()
    first = table[:, 0].long()
    small[first, :16, 64:] = 0
    small[first, 16:32, 64:] = 1
    small[first, 32:40, 64:66] = 0
    # a copy whose first pages hold the widest codes the bulk_ws scorer's guard takes ([112, 143]: that
    # scorer takes each row's first block scale out of its sum, exact only inside the guard) and one
    # with a code past each end of it in a few rows, which sends their programs to the second pass
    edge, past = rows.clone(), rows.clone()
    for i, codes in enumerate(([112, 143, 112, 143], [143, 112, 143, 112], [143] * 4, [112] * 4)):
        edge[first, 16 * i : 16 * i + 16, 64:] = torch.tensor(codes, dtype=torch.uint8, device="cuda")
    past[first, 3, 64:] = torch.tensor([127, 127, 144, 127], dtype=torch.uint8, device="cuda")
    past[first, 9, 64:] = torch.tensor([111, 127, 127, 127], dtype=torch.uint8, device="cuda")
    pos = torch.tensor([n_blk * 256 - 1, 50 * 256 + 77, 2, 3 * 256 + 5, 40 * 256], device="cuda")
    q, w = make_queries(5, Hi, Di, seed=30, kind="fp4", device="cuda")
    q[3] = make_queries(1, Hi, Di, seed=31, kind="float", device="cuda")[0][0]  # the general scan's
    # head weights whose scan weights w8 (the weight times its head's scales: query_operands) lie just
    # inside both ends of the guard's [2**-40, 2**59), with a zero (query 0), and just under it (query 1)
    per_unit = K.operands_reference(q, w, Hi)[1] / w
    ends = {(0, 0): 2.0**-40 * (1 + 2**-20), (0, 1): -(2.0**-40) * (1 + 2**-20), (0, 2): 2.0**59 * (1 - 2**-20),
            (0, 3): 0.0, (1, 5): 2.0**-40 * (1 - 2**-20)}
    for (s, h), v in ends.items():
        w[s, h] = v / per_unit[s, h]
    w8 = K.operands_reference(q, w, Hi)[1].abs()
    assert w8[0, :2].min() >= 2**-40 and w8[0, 2] < 2**59 and w8[0, 3] == 0 and w8[1, 5] < 2**-40
    chunk_q, chunk_w = make_queries(200, Hi, Di, seed=32, kind="fp4", device="cuda")
    chunk_pos = torch.arange(20000, 20200, device="cuda")
    cases = {"five decode rows": (q, w, table, pos, n_blk * 64 + 128),
             "a prefill chunk": (chunk_q, chunk_w, table[:1], chunk_pos, n_blk * 64),
             "40 decode rows": forty_decode_rows(table)}
    caches = {"random": rows, "smallest scales": small, "guard's ends": edge, "past the guard": past}
    for (case, (qq, ww, tt, pp, n_cols)), (kind, cache) in itertools.product(cases.items(), caches.items()):
        ops = K.query_operands(qq, ww)
        gluon_keys = K.index_score_keys(qq, ww, cache, tt, pp, n_cols, ops)
        short_keys, lengths = K.index_score_keys_and_lengths(qq, ww, cache, tt, pp, n_cols, ops)
        assert K.HOPPER_SCAN, "the Gluon scan fell back to the Triton one (see the log): nothing was compared"
        monkeypatch.setattr(K, "HOPPER_SCAN", False)
        triton_keys = K.index_score_keys(qq, ww, cache, tt, pp, n_cols, ops)
        monkeypatch.setattr(K, "HOPPER_SCAN", True)
        general = (ops[3] == K.MODE_GENERAL).nonzero().flatten().tolist()
        where = f"{case}, {kind} cache (rows of the general scan: {general}); (row, first column, count)"
        assert not wrong_rows(gluon_keys, triton_keys), f"{where}: {wrong_rows(gluon_keys, triton_keys)}"
        # without the sentinels: each row's length, and its keys up to there
        assert lengths.tolist() == [min((p + 1) // 4, tt.shape[1] * 64, n_cols) for p in pp.tolist()]
        wrong = wrong_rows(short_keys, triton_keys, lengths)
        if wrong:  # the same call again says whether the wrong keys come back (a race would move them)
            again = wrong_rows(K.index_score_keys_and_lengths(qq, ww, cache, tt, pp, n_cols, ops)[0], triton_keys,
                               lengths)
            pytest.fail(f"with row lengths, {where}: {wrong}; the same call again: {again}")
    assert_scores_close(q, w, rows, table, pos)


def wrong_rows(got: torch.Tensor, want: torch.Tensor, lengths: torch.Tensor | None = None) -> list:
    """(row, first wrong column, wrong columns) of each row of keys that differs from want's (up to
    its length where lengths are given): what a failing scan test reports."""
    bad = got != want
    if lengths is not None:
        bad &= torch.arange(got.shape[1], device=got.device)[None, :] < lengths.to(got.device)[:, None]
    return [(r, int(bad[r].nonzero()[0]), int(bad[r].sum())) for r in bad.any(1).nonzero().flatten().tolist()]


@pytest.mark.gpu
def test_gpu_scans_launched_right_after_their_operands_give_the_keys_of_plain_launches(triton_mode, monkeypatch):
    """With dependent launches (grid_dependency) the Gluon scan may start in the tail of the kernel
    writing its operands, and the general scan in the Gluon scan's. Calls made back to back, each
    right after its operands, must give the keys plain launches give. On an H100 they did not while
    the general scan read its operands before its wait: in batches of 129-256 queries a few rows
    differed (kernels/RESULTS.md, seventeenth session). This test turns dependent launches on
    whatever the default. Both modes, planned and split per query, the plain call first as in the
    failing runs."""
    from kernels import grid_dependency
    from kernels import indexer_scan_hopper as H

    if not (H.usable(torch.zeros(1, 4, 64, 32, device="cuda"), torch.zeros(1, 64, 68, dtype=torch.uint8, device="cuda"))
            and grid_dependency._supported(torch.device("cuda"))):
        pytest.skip("needs a Hopper GPU with Gluon and dependent launches")
    monkeypatch.setattr(scan_plan, "PLAN_QUERIES", 256)
    Hi, Di, n_blk = 64, 128, N_BLK
    rows, tables = scan_pool()
    n_cols = n_blk * 64 + 192
    for S, planned, rep in itertools.product((64, 129, 160, 192, 256), (False, True), range(2)):
        pos = torch.tensor([(i * 2459 + 13 * S + rep) % (n_blk * 256) for i in range(S)], device="cuda")
        q, w = make_queries(S, Hi, Di, seed=36 + S, kind="fp4", device="cuda")
        q[::7] = make_queries(-(-S // 7), Hi, Di, seed=37, kind="float", device="cuda")[0]
        table = tables[torch.arange(S) % 5].contiguous()
        monkeypatch.setattr(scan_plan, "PLANNED", planned)
        keys = {}
        for dependent in (False, True):
            monkeypatch.setattr(grid_dependency, "DEPENDENT_LAUNCHES", dependent)
            keys[dependent] = K.index_score_keys(q, w, rows, table, pos, n_cols, K.query_operands(q, w))
        assert K.HOPPER_SCAN, "the Gluon scan fell back to the Triton one (see the log): nothing was compared"
        assert torch.equal(keys[True], keys[False]), (S, planned, rep)


@pytest.mark.gpu
def test_gpu_hopper_scan_keys_hold_while_its_general_programs_load_shared_memory(triton_mode, monkeypatch):
    """Forty rows of every length, every fifth off the FP4 grid, scored in one bulk-copy launch
    (GENERAL_HERE): the general rows' programs convert their keys through shared memory while the
    FP8 rows' programs on the same SMs read ring slots the copy engine refills. Without a proxy
    fence between a slot's hand-back and its next copy, this test failed on an H100 (a few rows of
    a page scored from the next copy's words: kernels/RESULTS.md, twenty-third and twenty-fourth
    sessions); each of these calls must give the Triton scan's keys, planned or split per query,
    with sentinels or row lengths."""
    from kernels import indexer_scan_hopper as H

    if not H.usable(torch.zeros(1, 4, 64, 32, device="cuda"), torch.zeros(1, 64, 68, dtype=torch.uint8, device="cuda")):
        pytest.skip("needs a Hopper GPU with Gluon")
    monkeypatch.setattr(H, "LOADER", "bulk_ws")
    monkeypatch.setattr(H, "GENERAL_HERE", True)
    rows, tables = scan_pool()
    q, w, table, pos, n_cols = forty_decode_rows(tables)
    ops = K.query_operands(q, w)
    monkeypatch.setattr(K, "HOPPER_SCAN", False)
    want = K.index_score_keys(q, w, rows, table, pos, n_cols, ops)
    monkeypatch.setattr(K, "HOPPER_SCAN", True)
    for planned, rep in itertools.product((False, True), range(8)):
        monkeypatch.setattr(scan_plan, "PLANNED", planned)
        keys = K.index_score_keys(q, w, rows, table, pos, n_cols, ops)
        short, lengths = K.index_score_keys_and_lengths(q, w, rows, table, pos, n_cols, ops)
        assert K.HOPPER_SCAN, "the Gluon scan fell back to the Triton one (see the log): nothing was compared"
        where = f"planned {planned}, call {rep}; (row, first column, count)"
        assert not wrong_rows(keys, want), f"{where}: {wrong_rows(keys, want)}"
        assert not wrong_rows(short, want, lengths), f"with row lengths, {where}: {wrong_rows(short, want, lengths)}"


@pytest.mark.parametrize("S,n", [(1, 32768), (1, 262144), (2, 65536), (3, 24576), (1, 20480)])
def test_topk_of_keys_in_two_rounds_equals_one_topk(S, n, monkeypatch):
    """Where torch.topk would take its multi-block select, topk_of_keys splits the rows into pieces:
    the values, the indices and their order must be torch.topk's (distinct keys, as the scan's)."""
    from kernels.indexer_topk import _multiblock_topk, topk_of_keys

    g = torch.Generator().manual_seed(S * n)
    keys = torch.randperm(n * S, generator=g).view(S, n) * 3 - n  # distinct, signed
    assert _multiblock_topk(S, n)
    want_best, want_idx = torch.topk(keys, 512, dim=1, sorted=True)
    calls, topk = [], torch.topk
    monkeypatch.setattr(torch, "topk", lambda t, *a, **kw: calls.append(tuple(t.shape)) or topk(t, *a, **kw))
    best, idx = topk_of_keys(keys, 512)
    assert len(calls) == 2 and not any(_multiblock_topk(c[0] * (c[1] if len(c) == 3 else 1), c[-1]) for c in calls)
    assert torch.equal(best, want_best) and torch.equal(idx, want_idx)
