"""Cache-side kernels against their references: quantization into the compact layouts
(kernels/quantize.py), compressor pooling (kernels/compressor_pool.py) and page pack / unpack
(kernels/page_pack.py).

Tolerances: quantization and page copies are exact (bytes and float32 bit patterns equal).
Pooling differs from compressor_pool_ref.softmax_pool by exp and division only, so
|out - ref| <= rtol * softmax_pool(|kv|, score) (the pooled magnitude bounds every partial sum)
with rtol 1e-6 in the interpreter (numpy vs SLEEF exp, ~1 ulp) and 1e-5 on the GPU (ex2.approx
on a rounded x * log2(e)).
"""

import pytest
import torch

from kernels import compressor_pool as P
from kernels import dispatch
from kernels import page_pack as PP
from kernels import quantize as Q
from kernels.compressor_pool_ref import softmax_pool
from test_kv_layout import bf16_grid, hard_blocks, on_grid_index, on_grid_main, spread
from workers.config import preset

CFGS = [preset("flash-attn"), preset("tiny")]  # D 512 / nope 448 / Di 128, and D 128 / nope 64 / Di 64
IDS = [c.name for c in CFGS]


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")


def bits(t):
    return t.view(torch.int32)


def assert_same_bits(got, want, rows):
    """got == want bit for bit; otherwise the message lists the first differing elements with the
    row bytes they were decoded from (a row's first 448 bytes are codes, its last 7 block scales)."""
    diff = (bits(got) != bits(want)).nonzero().tolist()
    shown = [f"[{r}, {c}]: got {float(got[r, c])!r} ({int(bits(got)[r, c]):#x}), want {float(want[r, c])!r} "
             f"({int(bits(want)[r, c]):#x}), code byte {int(rows[r, c]) if c < 448 else None}, "
             f"scale byte {int(rows[r, 448 + 128 + c // 64]) if c < 448 else None}" for r, c in diff[:6]]
    assert not diff, f"{len(diff)} elements differ: " + "; ".join(shown)


# ---- quantization -----------------------------------------------------------------------------

def e4m3_ties_and_neighbours():
    """Float32 values on, halfway between, and one ulp around the midpoints of E4M3 codes (scale 1:
    each row also holds 448, which fixes the block scale at 2**0)."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mids, torch.nextafter(mids, torch.zeros(())), torch.nextafter(mids, torch.full((), 500.0))])
    vals = torch.cat([vals, -vals])
    vals = torch.cat([vals, vals.new_zeros(-len(vals) % 63)]).view(-1, 63)
    return torch.cat([vals, torch.full((len(vals), 1), 448.0)], 1)


def amax_boundaries(qmax, block):
    """Blocks whose amax is qmax * 2**k exactly, one float32 ulp above and below: the scale
    exponent steps between the first two."""
    k = torch.arange(-20, 20).float()
    at = qmax * torch.exp2(k)
    amax = torch.cat([at, torch.nextafter(at, at * 2), torch.nextafter(at, at / 2), torch.full((3,), 1e-4),
                      torch.nextafter(torch.full((3,), 1e-4), torch.zeros(3))])
    g = torch.Generator().manual_seed(0)
    rest = (torch.rand(len(amax), block - 1, generator=g) * 2 - 1) * amax[:, None]
    return torch.cat([amax[:, None], rest], 1)


def as_rows(blocks, width):
    """Whole blocks [B, block] laid out as rows of `width` (repeating blocks to fill the last row)."""
    flat = blocks.reshape(-1)
    n = -(-flat.numel() // width) * width
    return flat.repeat(-(-n // flat.numel()))[:n].view(-1, width)


def main_inputs(cfg, seed):
    D, nope = cfg.head_dim, cfg.head_dim - cfg.qk_rope_head_dim
    nope_part = torch.cat([spread(16, nope, 64, seed), hard_blocks(16, nope, 64, 448.0, seed),
                           as_rows(e4m3_ties_and_neighbours(), nope), as_rows(amax_boundaries(448.0, 64), nope)])
    rows = nope_part.shape[0]
    rope = torch.cat([spread(rows - 16, D - nope, D - nope, seed + 1), bf16_grid(16, D - nope, seed)])
    return torch.cat([nope_part, rope], 1)


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_main_writes_the_reference_bytes(triton_mode, cfg, dtype):
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    x = main_inputs(cfg, seed=1).to(dtype)
    assert torch.equal(Q.encode_main(x, nope), Q.reference_encode_main(x, nope))


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_decode_main_reads_back_the_reference_values(triton_mode, cfg):
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    x = torch.cat([main_inputs(cfg, seed=2), on_grid_main(cfg, 8, seed=3)])
    b = Q.reference_encode_main(x, nope)
    assert torch.equal(bits(Q.decode_main(b, cfg.head_dim, nope)), bits(Q.reference_decode_main(b, cfg.head_dim, nope)))


def index_inputs(Di, seed):
    ties = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, -0.0])
    ties = torch.cat([ties, torch.nextafter(ties, torch.zeros(())), torch.nextafter(ties, torch.full((), 7.0))])
    ties = torch.cat([ties, -ties]).view(-1, 32)  # E2M1 midpoints and their neighbours
    ties[:, 0] = 6.0  # fixes each block's scale at 2**0
    return torch.cat([spread(16, Di, 32, seed), hard_blocks(16, Di, 32, 6.0, seed),
                      as_rows(ties, Di), as_rows(amax_boundaries(6.0, 32), Di)])


@pytest.mark.parametrize("Di", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_index_writes_the_reference_bytes(triton_mode, Di, dtype):
    x = index_inputs(Di, seed=4).to(dtype)
    assert torch.equal(Q.encode_index(x), Q.reference_encode_index(x))


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_decode_index_reads_back_the_reference_values(triton_mode, cfg):
    Di = cfg.index_head_dim
    b = Q.reference_encode_index(torch.cat([index_inputs(Di, seed=5), on_grid_index(cfg, 8, seed=6)]))
    assert torch.equal(bits(Q.decode_index(b, Di)), bits(Q.reference_decode_index(b, Di)))


@pytest.mark.parametrize("n", [1, 17, 37, 70])
def test_row_counts_that_leave_the_last_program_part_empty(triton_mode, n):
    """The row kernels code rows_per_program rows a program (dispatch.INTERPRETER_ROWS in the
    interpreter): a count that is not a multiple leaves the last program's extra rows masked,
    neither read nor written, in the only program or after a full one (70)."""
    assert dispatch.rows_per_program(torch.zeros(1)) < 70
    cfg = CFGS[0]
    x = torch.cat([main_inputs(cfg, seed=8), main_inputs(cfg, seed=18)])[:n]
    b = Q.encode_main(x, 448)
    assert torch.equal(b, Q.reference_encode_main(x, 448))
    assert torch.equal(bits(Q.decode_main(b, 512, 448)), bits(Q.reference_decode_main(b, 512, 448)))
    xi = torch.cat([index_inputs(128, seed=9), index_inputs(128, seed=19)])[:n]
    bi = Q.encode_index(xi)
    assert torch.equal(bi, Q.reference_encode_index(xi))
    assert torch.equal(bits(Q.decode_index(bi, 128)), bits(Q.reference_decode_index(bi, 128)))


def test_the_row_kernels_write_only_the_rows_they_are_given(triton_mode):
    """Launched (as encode_main and encode_index launch them) over a buffer with more rows than the
    count, they leave the rows past it as they were (the last program's spare rows are masked,
    not clipped by the buffer's end)."""
    n, rows = 5, dispatch.rows_per_program(torch.zeros(1))
    x = main_inputs(CFGS[0], seed=10)[:rows]
    out = torch.full((rows, 584), 0xA5, dtype=torch.uint8)
    Q._launch_rows(Q._encode_main_kernel, x, out, n, **Q.encode_main_consts(512, 448, False))
    assert torch.equal(out[:n], Q.reference_encode_main(x[:n], 448))
    assert bool((out[n:] == 0xA5).all())
    xi = index_inputs(128, seed=11)[:rows]
    outi = torch.full((rows, 68), 0xA5, dtype=torch.uint8)
    Q._launch_rows(Q._encode_index_kernel, xi, outi, n, **Q.encode_index_consts(128, False))
    assert torch.equal(outi[:n], Q.reference_encode_index(xi[:n]))
    assert bool((outi[n:] == 0xA5).all())


def test_encoders_read_strided_rows(triton_mode):
    x = spread(8, 1024, 64, seed=7)[:, ::2]  # [8, 512] with a row stride of 1024 and a column stride of 2
    assert torch.equal(Q.encode_main(x, 448), Q.reference_encode_main(x, 448))
    assert torch.equal(Q.encode_index(x[:, :128]), Q.reference_encode_index(x[:, :128]))


# ---- compressor pooling -----------------------------------------------------------------------

def pool_inputs(n, slots, C, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(n, slots, C, generator=g)
    score = torch.randn(n, slots, C, generator=g) * 4
    return kv.to(device), score.to(device)


def assert_pool_close(got, kv_slots, score_slots, rtol=1e-6):
    want = softmax_pool(kv_slots, score_slots)
    bound = rtol * softmax_pool(kv_slots.abs(), score_slots)
    assert got.shape == want.shape and ((got - want).abs() <= bound).all(), f"max error {(got - want).abs().max()}"


def csa_slots(kv, score, prev_kv, prev_score):
    """The 8 slots of each window, built independently of the model: previous A-halves, own B-halves."""
    C = kv.shape[-1] // 2
    if prev_kv is None:
        prev_kv, prev_score = torch.zeros_like(kv[0, :, :C]), torch.full_like(score[0, :, :C], float("-inf"))
    a_kv = torch.cat([prev_kv[None], kv[:-1, :, :C]])
    a_sc = torch.cat([prev_score[None], score[:-1, :, :C]])
    return torch.cat([a_kv, kv[:, :, C:]], 1), torch.cat([a_sc, score[:, :, C:]], 1)


@pytest.mark.parametrize("n,C", [(1, 64), (5, 200)])  # 200: a partial channel block
@pytest.mark.parametrize("with_prev", [False, True])
def test_csa_windows_pool_eight_overlapping_slots(triton_mode, n, C, with_prev):
    kv, score = pool_inputs(n, 4, 2 * C, seed=8)
    prev = pool_inputs(1, 4, C, seed=9) if with_prev else (None, None)
    prev = (prev[0][0], prev[1][0]) if with_prev else prev
    got = P.csa_pool_windows(kv, score, *prev)
    assert_pool_close(got, *csa_slots(kv, score, *prev))
    assert_pool_close(P.reference_csa_pool_windows(kv, score, *prev), *csa_slots(kv, score, *prev), rtol=0)


def test_csa_windows_pooled_in_chunks_equal_one_call(triton_mode):
    kv, score = pool_inputs(6, 4, 128, seed=10)
    whole = P.csa_pool_windows(kv, score, None, None)
    head = P.csa_pool_windows(kv[:2], score[:2], None, None)
    tail = P.csa_pool_windows(kv[2:], score[2:], kv[1, :, :64], score[1, :, :64])  # the overlap carried over
    assert torch.equal(whole, torch.cat([head, tail]))


def test_csa_step_pools_each_request_with_its_own_overlap(triton_mode):
    kv, score = pool_inputs(3, 4, 2 * 96, seed=11)
    prev_kv, prev_score = pool_inputs(3, 4, 96, seed=12)
    prev_kv[1], prev_score[1] = 0.0, float("-inf")  # request 1 closes window 0
    got = P.csa_pool_step(kv, score, prev_kv, prev_score)
    for i in range(3):
        own = (None, None) if i == 1 else (prev_kv[i], prev_score[i])
        assert_pool_close(got[i : i + 1], *csa_slots(kv[i : i + 1], score[i : i + 1], *own))
        assert torch.equal(got[i : i + 1], P.csa_pool_windows(kv[i : i + 1], score[i : i + 1], *own))


@pytest.mark.parametrize("n,C", [(1, 128), (3, 200)])
def test_hca_pools_128_slots(triton_mode, n, C):
    kv, score = pool_inputs(n, 128, C, seed=13)
    got = P.hca_pool(kv, score)
    assert_pool_close(got, kv, score)
    assert torch.equal(got[1:], P.hca_pool(kv[1:], score[1:]))  # a window's result does not depend on the others


# ---- page pack / unpack -----------------------------------------------------------------------

def pool_views():
    """Per-layer views as workers/pools.py makes them, plus awkward ones."""
    g = torch.Generator().manual_seed(14)
    csa_main = torch.randint(0, 256, (9, 3, 64, 584), dtype=torch.uint8, generator=g)
    comp = torch.randn(9, 50, generator=g)
    odd = torch.randint(0, 256, (9, 2, 3, 5), dtype=torch.uint8, generator=g)
    gapped = torch.randn(9, 8, 40, generator=g)
    return {
        "csa_main[:, 1]": (csa_main, lambda t: t[:, 1]),  # 8-byte words, page stride 3 pages
        "comp (float32, 2-D)": (comp, lambda t: t),
        "odd widths": (odd, lambda t: t[:, 1]),  # 15-byte pages: byte words
        "every other row": (gapped, lambda t: t[:, ::2]),  # rows not back to back
    }


@pytest.mark.parametrize("name", list(pool_views()))
def test_pack_equals_index_select_and_unpack_restores_only_those_pages(triton_mode, name):
    base, view = pool_views()[name]
    ids = torch.tensor([7, 2, 8, 0])
    buf = PP.pack_pages(view(base), ids)
    assert torch.equal(buf, PP.reference_pack(view(base), ids))
    target = torch.zeros_like(base)
    PP.unpack_pages(buf, view(target), ids)
    expect = torch.zeros_like(base)
    PP.reference_unpack(buf, view(expect), ids)
    assert torch.equal(target.view(torch.uint8), expect.view(torch.uint8))
    assert torch.equal(view(target)[ids], view(base)[ids])


def test_pack_writes_into_a_given_buffer_and_checks_its_size(triton_mode):
    pool = torch.randint(0, 256, (4, 64, 68), dtype=torch.uint8)
    out = torch.empty(2 * 64 * 68, dtype=torch.uint8)
    assert PP.pack_pages(pool, torch.tensor([3, 1]), out) is out
    assert torch.equal(out, torch.cat([pool[3].reshape(-1), pool[1].reshape(-1)]))
    with pytest.raises(ValueError, match="expected contiguous uint8"):
        PP.pack_pages(pool, torch.tensor([3]), out)


# ---- GPU at full shapes -----------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_quantize_flash_attn_rows_bit_exact(triton_mode):
    cfg = preset("flash-attn")
    x = torch.cat([main_inputs(cfg, seed=s) for s in range(8)]).cuda()
    b = Q.encode_main(x, 448)
    assert torch.equal(b, Q.reference_encode_main(x, 448))
    assert_same_bits(Q.decode_main(b, 512, 448), Q.reference_decode_main(b, 512, 448), b)
    xi = torch.cat([index_inputs(128, seed=s) for s in range(8)]).cuda()
    bi = Q.encode_index(xi)
    assert torch.equal(bi, Q.reference_encode_index(xi))
    assert torch.equal(bits(Q.decode_index(bi, 128)), bits(Q.reference_decode_index(bi, 128)))


@pytest.mark.gpu
def test_gpu_pooling_flash_attn_widths(triton_mode):
    kv, score = pool_inputs(64, 4, 1024, seed=15, device="cuda")
    prev_kv, prev_score = pool_inputs(1, 4, 512, seed=16, device="cuda")
    got = P.csa_pool_windows(kv, score, prev_kv[0], prev_score[0])
    assert_pool_close(got, *csa_slots(kv, score, prev_kv[0], prev_score[0]), rtol=1e-5)
    kv, score = pool_inputs(64, 128, 512, seed=17, device="cuda")
    assert_pool_close(P.hca_pool(kv, score), kv, score, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_pack_flash_attn_pages(triton_mode):
    base = torch.randint(0, 256, (512, 2, 64, 584), dtype=torch.uint8, device="cuda")
    ids = torch.randperm(512, device="cuda")[:300]
    buf = PP.pack_pages(base[:, 1], ids)
    assert torch.equal(buf, PP.reference_pack(base[:, 1], ids))
    target = torch.zeros_like(base)
    PP.unpack_pages(buf, target[:, 1], ids)
    assert torch.equal(target[ids, 1], base[ids, 1]) and not target[:, 0].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_main_key_on_the_kernel_path_gives_the_reference_bits(monkeypatch, dtype):
    """workers.compressor.round_main_key runs encode + decode kernels on the kernel path; the
    model relies on that being the reference rounding exactly (hard blocks and ties included)."""
    from workers.compressor import round_main_key

    cfg = CFGS[0]
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    x = main_inputs(cfg, seed=4).to(dtype)
    x = x[: x.shape[0] // 2 * 2].view(-1, 2, cfg.head_dim)  # leading dims fold into rows
    monkeypatch.setenv("V4SERVE_KERNELS", "torch")
    want = round_main_key(x, nope)
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")
    got = round_main_key(x, nope)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
