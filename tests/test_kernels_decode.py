"""Decode attention kernels (kernels/main_rows.py, sparse_decode.py, hca_decode.py) against their
pure-torch references, on real compact rows in KVPools reached through shuffled page tables.

Tolerances (max abs difference of outputs whose entries are O(1)):
  * float32 keys: 2e-5. Same math; only the summation order and the online softmax differ.
  * bf16 keys: 2e-2 abs + 2e-2 rel. The reference rounds the normalised probabilities to bf16
    before P@V; the kernel rounds the unnormalised ones and divides at the end, and stores
    per-split outputs in bf16. Measured: at most 2 bf16 ulps (0.03 on outputs near 4).
Row decoding is exact in both dtypes.
CPU runs use small head counts and shrink the split sizes so every path (window before position
0, page boundaries, several splits, -1 top-k slots, masked head blocks) runs in the interpreter.
"""

from dataclasses import dataclass

import pytest
import torch

from kernels import hca_decode as hca_mod
from kernels import main_rows
from kernels import sparse_decode as sparse_mod
from kernels.hca_decode import hca_decode
from kernels.sparse_decode import sparse_mqa_decode
from workers.config import preset
from workers.kv_layout import encode_main
from workers.pools import BLOCK, SWA_PAGE, KVPools, PoolSizes

WINDOW = 128
TOL = {torch.float32: dict(atol=2e-5, rtol=0.0), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
SMALL = preset("tiny")  # head_dim 128 = 64 FP8 dims + 64 RoPE dims, 200-byte rows
FULL = preset("flash-attn")  # head_dim 512 = 448 + 64, 584-byte rows


@pytest.fixture
def triton_kernels(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")


@pytest.fixture
def small_splits(monkeypatch):
    """Splits of 64 keys: a window of 128 alone takes two, so merging always runs."""
    monkeypatch.setattr(sparse_mod, "SPARSE_KEYS_PER_SPLIT", 64)
    monkeypatch.setattr(hca_mod, "HCA_KEYS_PER_SPLIT", 64)


@dataclass
class Case:
    q: torch.Tensor
    sink: torch.Tensor
    swa: torch.Tensor
    swa_table: torch.Tensor
    positions: torch.Tensor
    csa_rows: torch.Tensor
    hca_rows: torch.Tensor
    block_table: torch.Tensor
    topk: torch.Tensor
    nope: int

    def sparse(self, rows=slice(None)):
        return sparse_mqa_decode(self.q[rows], self.sink, self.swa, self.swa_table[rows], self.positions[rows],
                                 self.csa_rows, self.block_table[rows], self.topk[rows], WINDOW, self.nope)

    def sparse_ref(self):
        return sparse_mod.reference(self.q, self.sink, self.swa, self.swa_table, self.positions, self.csa_rows,
                                    self.block_table, self.topk, WINDOW, self.nope)

    def hca(self, rows=slice(None)):
        return hca_decode(self.q[rows], self.sink, self.swa, self.swa_table[rows], self.positions[rows],
                          self.hca_rows, self.block_table[rows], WINDOW, self.nope)

    def hca_ref(self):
        return hca_mod.reference(self.q, self.sink, self.swa, self.swa_table, self.positions, self.hca_rows,
                                 self.block_table, WINDOW, self.nope)


def _fill(rows: torch.Tensor, cfg) -> None:
    """Every row of a uint8 pool view gets a random key in the compact layout, page by page."""
    for p in range(0, rows.shape[0], 256):
        x = torch.randn(*rows[p : p + 256].shape[:-1], cfg.head_dim, device=rows.device)
        rows[p : p + 256] = encode_main(x, cfg)


def build_case(cfg, positions: list[int], heads: int, topk: int, dtype, device="cpu", seed=0) -> Case:
    """Pools holding random keys; each request's pages are a shuffled draw, so a wrong page lookup
    reads some other request's (or an unused) row. Table columns past a request's context and swa
    columns outside its window point at random pages too: reading them changes the result."""
    torch.manual_seed(seed)
    B = len(positions)
    n_blk = max(t // BLOCK for t in positions) + 2  # one padding column past the longest request
    window_pages = 3  # 127 earlier keys and t span at most 3 pages of 64
    pools = KVPools(cfg, PoolSizes(blocks=B * n_blk, swa=B * window_pages + 2, comp=1, overlap=1), device=device)
    swa, csa, hca = pools.swa[:, pools.csa_layers[0]], pools.csa_main[:, 0], pools.hca_main[:, 0]
    for rows in (swa, csa, hca):
        _fill(rows, cfg)
    block_table = torch.randperm(B * n_blk, device=device).view(B, n_blk).to(torch.int32)
    # window-relative: column j is the window's (j+1)-th page; columns past its last page are random
    swa_table = torch.randint(0, pools.sizes.swa, (B, window_pages), device=device, dtype=torch.int32)
    own = torch.randperm(pools.sizes.swa, device=device)[: B * window_pages].view(B, window_pages).to(torch.int32)
    for b, t in enumerate(positions):
        first = max(0, t - WINDOW + 1) // SWA_PAGE
        span = t // SWA_PAGE - first + 1
        swa_table[b, :span] = own[b, :span]
    picks = torch.full((B, topk), -1, dtype=torch.int32, device=device)
    for b, t in enumerate(positions):
        visible = (t + 1) // 4
        n = min(topk, visible)
        chosen = torch.randperm(visible, device=device)[:n].to(torch.int32)
        slots = torch.randperm(topk, device=device)[:n]  # -1 left in scattered slots, not just at the end
        picks[b, slots] = chosen
    q = (2 * torch.randn(B, heads, cfg.head_dim, device=device)).to(dtype)
    sink = torch.randn(heads, device=device)
    pos = torch.tensor(positions, device=device)
    return Case(q, sink, swa, swa_table, pos, csa, hca, block_table, picks, cfg.nope_head_dim)


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])


# ---- row decoding -----------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [SMALL, FULL], ids=["d128", "d512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoded_rows_equal_decode_main_exactly(triton_kernels, cfg, dtype):
    x = 5 * torch.randn(45, cfg.head_dim)  # 45: a partial last tile of rows
    x[3, :64] = 0.0  # an all-zero block takes the floor scale
    rows = encode_main(x, cfg)
    got = main_rows.decode_rows(rows, cfg.head_dim, cfg.nope_head_dim, dtype)
    assert torch.equal(got, main_rows.reference(rows, cfg.head_dim, cfg.nope_head_dim, dtype))


# ---- sparse (CSA) decode ------------------------------------------------------------------------

# 5: window starts before position 0 and no entry is visible yet (all top-k slots -1);
# 70 / 300: the window crosses page boundaries; 1100: more visible entries than top-k slots.
POSITIONS = [5, 70, 300, 1100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_matches_reference_across_splits(triton_kernels, small_splits, dtype):
    case = build_case(SMALL, POSITIONS, heads=20, topk=24, dtype=dtype)  # 20 heads: a masked head block
    assert_close(case.sparse(), case.sparse_ref(), dtype)


def test_sparse_decode_matches_reference_in_one_split_at_full_head_dim(triton_kernels):
    case = build_case(FULL, [90, 700], heads=16, topk=32, dtype=torch.float32)
    assert_close(case.sparse(), case.sparse_ref(), torch.float32)


def test_sparse_decode_skips_every_negative_slot(triton_kernels, small_splits):
    case = build_case(SMALL, [1100], heads=16, topk=24, dtype=torch.float32)
    case.topk[0, ::3] = -1  # the reference drops these entries; so must the kernel
    before = case.sparse()
    assert_close(before, case.sparse_ref(), torch.float32)
    case.topk[case.topk < 0] = -7  # any negative index means "no entry"
    assert torch.equal(case.sparse(), before)


def test_sparse_decode_of_a_query_does_not_depend_on_its_batch(triton_kernels, small_splits):
    case = build_case(SMALL, POSITIONS, heads=16, topk=24, dtype=torch.bfloat16)
    together = case.sparse()
    for b in range(len(POSITIONS)):
        assert torch.equal(case.sparse(slice(b, b + 1)), together[b : b + 1])


# ---- HCA decode ---------------------------------------------------------------------------------

# 100: no entry visible yet; 254 / 255: entry 1 closes at 255, so one entry then two;
# 5118: 39 entries (the 40th closes one position later) over many pages and several splits.
HCA_POSITIONS = [100, 254, 255, 5118]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hca_decode_matches_reference_across_splits(triton_kernels, small_splits, dtype):
    case = build_case(SMALL, HCA_POSITIONS, heads=20, topk=1, dtype=dtype)
    assert_close(case.hca(), case.hca_ref(), dtype)


def test_hca_decode_matches_reference_in_one_split_at_full_head_dim(triton_kernels):
    case = build_case(FULL, [127, 1300], heads=16, topk=1, dtype=torch.float32)
    assert_close(case.hca(), case.hca_ref(), torch.float32)


def test_hca_decode_reads_no_entry_past_the_visible_count(triton_kernels, small_splits):
    case = build_case(SMALL, [5118], heads=16, topk=1, dtype=torch.float32)
    before = case.hca()
    visible = 5119 // 128
    page, row = case.block_table[0, visible // 2].item(), visible % 2
    case.hca_rows[page, row] = case.hca_rows[case.block_table[0, 0].item(), 0]  # entry 39 closes at t=5119
    assert torch.equal(case.hca(), before)
    case.hca_rows[case.block_table[0, 0].item(), 1] = case.hca_rows[page, row ^ 1]  # entry 1 is visible
    assert not torch.allclose(case.hca(), before)


def test_hca_decode_of_a_query_does_not_depend_on_its_batch(triton_kernels, small_splits):
    case = build_case(SMALL, HCA_POSITIONS, heads=16, topk=1, dtype=torch.bfloat16)
    together = case.hca()
    for b in range(len(HCA_POSITIONS)):
        assert torch.equal(case.hca(slice(b, b + 1)), together[b : b + 1])


def test_short_queries_take_their_own_split_size(triton_kernels):
    """launch_split_attention's short_query rule (hca_decode's Gluon path uses it): queries of at
    most 160 keys in splits of 32, the one of 167 keys in splits of 64. The split programs and the
    merge must apply the same rule per query, or the merge reads partials nobody wrote."""
    case = build_case(SMALL, HCA_POSITIONS, heads=16, topk=1, dtype=torch.float32)
    got = sparse_mod.launch_split_attention(case.q, case.sink, case.swa, case.swa_table, case.positions,
                                            case.hca_rows, case.block_table, None, WINDOW, case.nope, ratio=128,
                                            keys_per_split=64, short_query=(160, 32))
    assert_close(got, case.hca_ref(), torch.float32)
    plain = sparse_mod.launch_split_attention(case.q, case.sink, case.swa, case.swa_table, case.positions,
                                              case.hca_rows, case.block_table, None, WINDOW, case.nope, ratio=128,
                                              keys_per_split=64)
    assert torch.equal(got[3], plain[3])  # 167 keys: the long rule, the same splits
    assert not torch.equal(got[:3], plain[:3])  # 128-129 keys: 32-key splits round otherwise


@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_a_gluon_split_kernel_that_does_not_compile_leaves_the_triton_kernel_in_its_place(
        kind, triton_kernels, small_splits, monkeypatch, caplog):
    """Gluon's API moves between Triton releases: if the Hopper kernel (split_attention_hopper.py,
    HCA's and CSA's split programs) fails to compile, the call still returns the Triton kernel's
    output, says so once, and later calls go straight to Triton."""
    from triton.compiler.errors import CompilationError

    if kind == "hca":
        mod, flag, what = hca_mod, "HOPPER_HCA", "Gluon HCA kernel failed"
        case = build_case(SMALL, HCA_POSITIONS, heads=16, topk=1, dtype=torch.float32)
        call = case.hca
    else:
        mod, flag, what = sparse_mod, "HOPPER_SPARSE", "Gluon CSA decode kernel failed"
        case = build_case(SMALL, POSITIONS, heads=16, topk=8, dtype=torch.float32)
        call = case.sparse
    want = call()
    calls = []

    def broken(*args):
        calls.append(args)
        raise CompilationError("kernel.py", None, "no such Gluon builtin")

    monkeypatch.setattr(mod, flag, True)
    monkeypatch.setattr(mod.hopper, "usable", lambda *args: True)
    monkeypatch.setattr(mod.hopper, "launch", broken)
    with caplog.at_level("WARNING", logger=mod.__name__):
        assert torch.equal(call(), want)
        assert torch.equal(call(), want)
    assert len(calls) == 1 and getattr(mod, flag) is False
    assert sum(what in r.getMessage() for r in caplog.records) == 1


def test_a_backend_lowering_failure_falls_back_but_other_runtime_errors_propagate(caplog):
    """Triton's MLIR backend reports a pass it cannot run as a RuntimeError ("PassManager::run
    failed"), not a TritonError: that is a kernel this Triton cannot build, so the Triton kernel
    takes over; any other RuntimeError (a CUDA fault, say) must reach the caller."""
    import logging

    from kernels.dispatch import gluon_ran

    log = logging.getLogger("test_gluon_ran")

    def lowering():
        raise RuntimeError("PassManager::run failed")

    def fault():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with caplog.at_level("WARNING", logger="test_gluon_ran"):
        assert gluon_ran(lowering, "test kernel", "kernel", log) is False
    assert any("Gluon test kernel failed" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        gluon_ran(fault, "test kernel", "kernel", log)
    assert gluon_ran(lambda: None, "test kernel", "kernel", log) is True


def test_the_gluon_hca_kernel_takes_only_8_byte_aligned_rows():
    """split_attention_hopper reads 8-byte words of every row: a pool whose base, page stride or row
    stride is not a multiple of 8 must go to the Triton kernel instead of faulting."""
    from kernels import split_attention_hopper as HH

    pool = torch.zeros(8192, dtype=torch.uint8)
    assert HH.rows_aligned(pool[: 4 * 2 * 584].view(4, 2, 584), pool[8 : 8 + 8 * 584].view(8, 1, 584))
    assert not HH.rows_aligned(pool[4 : 4 + 4 * 2 * 584].view(4, 2, 584))  # the base
    assert not HH.rows_aligned(pool.as_strided((4, 2, 584), (1170, 584, 1)))  # the page stride
    assert not HH.rows_aligned(pool.as_strided((4, 2, 584), (1176, 588, 1)))  # the row stride


def test_an_unknown_gluon_hca_schedule_is_an_error_not_a_silent_choice(monkeypatch):
    from kernels import split_attention_hopper as HH

    monkeypatch.setattr(HH, "SCHEDULE", "warp-specialized")
    with pytest.raises(ValueError, match="warp-specialized"):
        HH.launch((None,) * 21, dict(SPLIT=512, SHORT_SPLIT=320), 1, 1)


def test_cpu_tensors_use_the_reference_by_default(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "auto")
    case = build_case(SMALL, [300], heads=4, topk=8, dtype=torch.float32)
    assert torch.equal(case.sparse(), case.sparse_ref())
    assert torch.equal(case.hca(), case.hca_ref())


# ---- GPU: full flash-attn shapes (H 64, D 512, 584-byte rows, top-k 512) ---------------------------

def _gpu_positions(context: int, batch: int) -> list[int]:
    return [context - 1 - 37 * b for b in range(batch)]  # neighbouring but different lengths


@pytest.mark.gpu
@pytest.mark.parametrize("context", [8192, 131072])
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_sparse_decode_at_flash_shapes(context, batch):
    case = build_case(FULL, _gpu_positions(context, batch), heads=FULL.num_attention_heads,
                      topk=FULL.index_topk, dtype=torch.bfloat16, device="cuda")
    assert_close(case.sparse(), case.sparse_ref(), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("context", [8192, 131072])
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_hca_decode_at_flash_shapes(context, batch):
    case = build_case(FULL, _gpu_positions(context, batch), heads=FULL.num_attention_heads,
                      topk=1, dtype=torch.bfloat16, device="cuda")
    assert_close(case.hca(), case.hca_ref(), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_decode_is_batch_invariant_at_flash_shapes():
    case = build_case(FULL, _gpu_positions(131072, 4), heads=FULL.num_attention_heads,
                      topk=FULL.index_topk, dtype=torch.bfloat16, device="cuda")
    sparse, hca = case.sparse(), case.hca()
    for b in range(4):
        assert torch.equal(case.sparse(slice(b, b + 1)), sparse[b : b + 1])
        assert torch.equal(case.hca(slice(b, b + 1)), hca[b : b + 1])


def _skip_without_hopper_gluon():
    """The Gluon split programs run only on a Hopper GPU whose Triton has Gluon (split_attention_hopper.usable)."""
    from kernels import split_attention_hopper as HH

    q = torch.zeros(1, FULL.num_attention_heads, FULL.head_dim, dtype=torch.bfloat16, device="cuda")
    rows = torch.zeros(1, 2, 584, dtype=torch.uint8, device="cuda")
    if not HH.usable(q, rows, rows, WINDOW, FULL.nope_head_dim):
        pytest.skip("needs a Hopper GPU with Gluon")


@pytest.mark.gpu
def test_gpu_hopper_hca_decodes_every_code_under_every_scale_exactly():
    """The Gluon HCA kernel decodes FP8 codes by bit moves and BF16 products, not conversions
    (split_attention_hopper._FP8_WORD_TO_BF16_PTX): each of the 254 non-NaN E4M3 codes under each of
    the 255 finite block scales, subnormal codes, the scale 2**-127 and scales whose factor passes
    BF16's range included, must give kv_layout.decode_main's BF16 bits."""
    from kernels import split_attention_hopper as HH
    from kernels import kv_layout

    _skip_without_hopper_gluon()
    blocks = FULL.nope_head_dim // 64
    # block i of the flattened rows: scale byte (i // 4) % 255, codes 64 (i % 4) ... 64 (i % 4) + 63
    n_rows = -(-255 * 4 // blocks)
    i = torch.arange(n_rows * blocks).view(n_rows, blocks)
    codes = (64 * (i % 4))[..., None] + torch.arange(64)
    codes = torch.where((codes & 0x7F) == 0x7F, codes & 0x80, codes)  # the NaN codes -> +-0
    rope = torch.randn(n_rows, FULL.head_dim - FULL.nope_head_dim, generator=torch.Generator().manual_seed(5))
    rows = torch.cat([codes.flatten(1).to(torch.uint8), kv_layout._bf16_bytes(rope),
                      ((i // 4) % 255).to(torch.uint8), torch.zeros(n_rows, 1, dtype=torch.uint8)], dim=1).cuda()
    assert rows.shape[1] == 584 and set(rows[:, 576:583].flatten().tolist()) == set(range(255))
    want = kv_layout.decode_main(rows, FULL.head_dim, FULL.nope_head_dim, dtype=torch.bfloat16)
    got = HH.decode_rows(rows)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", hca_mod.hopper.SCHEDULES)
def test_gpu_hopper_csa_kernel_matches_the_reference_and_the_triton_kernel(triton_kernels, monkeypatch, schedule):
    """On Hopper CSA decode runs HCA's Gluon split programs with each slot past the window read
    through the query's top-k pick (split_attention_hopper._entries). Picks of -1 in scattered
    slots, a query with one visible entry, windows that start before position 0: within the bf16
    tolerance of the reference and of the Triton kernel, the lockstep kernel's bits under every
    schedule; an entry no query picked, and a pick past the pool's entries (no key, as the Triton
    kernel reads it), change nothing; the window-only call of SWA layers matches too."""
    from kernels import split_attention_hopper as HH

    _skip_without_hopper_gluon()
    positions = [5, 129, 300, 8191, 70000, 131071]
    case = build_case(FULL, positions, heads=FULL.num_attention_heads, topk=FULL.index_topk, dtype=torch.bfloat16,
                      device="cuda")
    monkeypatch.setattr(HH, "SCHEDULE", "lockstep")
    lockstep = case.sparse()
    monkeypatch.setattr(HH, "SCHEDULE", schedule)
    got = case.sparse()
    assert sparse_mod.HOPPER_SPARSE, "the Gluon kernel fell back to the Triton one (see the log): nothing was compared"
    assert torch.equal(got, lockstep)
    assert_close(got, case.sparse_ref(), torch.bfloat16)
    monkeypatch.setattr(sparse_mod, "HOPPER_SPARSE", False)
    assert_close(got, case.sparse(), torch.bfloat16)
    monkeypatch.setattr(sparse_mod, "HOPPER_SPARSE", True)
    # query 3 (t = 8191) sees entries 0..2047 and picked 512 of them: an unpicked one may hold anything
    picked = set(case.topk[3].tolist())
    e = next(i for i in range(2048) if i not in picked)
    page = case.block_table[3, e // 64].item()
    case.csa_rows[page, e % 64] = case.csa_rows[case.block_table[3, 0].item(), 1]
    # query 1 (t = 129) picked 32 entries: a slot of its -1s now names an entry past the pool's
    slot = (case.topk[1] < 0).nonzero()[0].item()
    case.topk[1, slot] = case.block_table.shape[1] * 64 + 5
    assert torch.equal(case.sparse(), got)
    # SWA layers: the window alone (attention.py passes one -1 pick and the window pages as entries;
    # a zero block table here, so the reference's gather of the unpicked slot stays in the pool)
    none = torch.full((len(positions), 1), -1, dtype=torch.int32, device="cuda")
    args = (case.q, case.sink, case.swa, case.swa_table, case.positions, case.swa, torch.zeros_like(case.block_table),
            none, WINDOW, case.nope)
    window = sparse_mqa_decode(*args)
    assert sparse_mod.HOPPER_SPARSE
    assert_close(window, sparse_mod.reference(*args), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", hca_mod.hopper.SCHEDULES)
def test_gpu_hopper_hca_kernel_matches_the_reference_and_the_triton_kernel(triton_kernels, monkeypatch, schedule):
    """On Hopper the HCA split programs run in Gluon (split_attention_hopper.py). Queries whose window
    starts before position 0, one split (the sink applied in the kernel), several splits with a
    partial last tile, of both split sizes: within the bf16 tolerance of the reference and of the
    Triton kernel, the lockstep kernel's bits under every schedule, and no entry past a query's
    visible count is read."""
    from kernels import split_attention_hopper as HH

    _skip_without_hopper_gluon()
    positions = [5, 129, 300, 8191, 70000, 131071, 200000]  # 128 ... 1,690 keys: short and long splits
    case = build_case(FULL, positions, heads=FULL.num_attention_heads, topk=1, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setattr(HH, "SCHEDULE", "lockstep")
    lockstep = case.hca()
    monkeypatch.setattr(HH, "SCHEDULE", schedule)
    got = case.hca()
    assert hca_mod.HOPPER_HCA, "the Gluon kernel fell back to the Triton one (see the log): nothing was compared"
    assert torch.equal(got, lockstep)  # the same tiles, products and sums, whoever decodes the keys
    assert_close(got, case.hca_ref(), torch.bfloat16)
    monkeypatch.setattr(hca_mod, "HOPPER_HCA", False)
    assert_close(got, case.hca(), torch.bfloat16)
    monkeypatch.setattr(hca_mod, "HOPPER_HCA", True)
    # query 4 (t = 70000) sees entries 0..545: entry 546 may hold anything
    visible = (positions[4] + 1) // 128
    page, row = case.block_table[4, visible // 2].item(), visible % 2
    case.hca_rows[page, row] = case.hca_rows[case.block_table[4, 0].item(), 0]
    assert torch.equal(case.hca(), got)
