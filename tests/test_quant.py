"""FP8 / FP4 numerics: block rounding, FP4 packing and Hadamard (kernels/block_quant.py), and the
checkpoint weight codecs built on them (workers/quant.py)."""

import math

import pytest
import torch

from kernels.block_quant import (
    FP4_VALUES,
    fp4_e2m1_block_qdq,
    fp4_e2m1_block_quant,
    fp8_e4m3_block_qdq,
    fp8_e4m3_block_quant,
    hadamard,
    pack_fp4,
    unpack_fp4,
)
from workers.quant import dequant_fp4_weight, dequant_fp8_weight, quant_fp4_weight, quant_fp8_weight


def spread(*shape, seed=0):
    """Random values whose blocks span many orders of magnitude (exercises many scales)."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-12, 12, (*shape[:-1], shape[-1] // 32, 1), generator=g).float())
    return (torch.randn(*shape, generator=g).unflatten(-1, (-1, 32)) * mag).flatten(-2)


def is_pow2(t):
    m, _ = torch.frexp(t)
    return bool(((m == 0.5) & (t > 0)).all())


# ---- FP8 ----------------------------------------------------------------------------------------

def test_fp8_qdq_matches_the_reference_formula():
    x = spread(8, 256)
    xb = x.view(8, 4, 64)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    scale = torch.pow(2.0, torch.ceil(torch.log2(amax / 448)))
    want = ((xb / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).view(8, 256)
    assert torch.equal(fp8_e4m3_block_qdq(x, 64), want)


def test_fp8_qdq_relative_error_is_at_most_half_an_e4m3_ulp():
    x = spread(16, 512, seed=1)
    _, scale = fp8_e4m3_block_quant(x, 64)
    err = (fp8_e4m3_block_qdq(x, 64) - x).abs()
    # 3 mantissa bits: relative error <= 2**-4 for normals; absolute <= half the subnormal step below.
    bound = torch.maximum(x.abs() * 2**-4, scale.repeat_interleave(64, -1) * 2**-10)
    assert bool((err <= bound).all())
    assert err.max() > 0  # the data really was rounded


def test_fp8_scales_are_powers_of_two_with_amax_in_upper_half_of_range():
    x = spread(4, 256, seed=2)
    q, scale = fp8_e4m3_block_quant(x, 64)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (4, 4)
    assert is_pow2(scale)
    ratio = x.view(4, 4, 64).abs().amax(-1) / scale
    assert bool(((ratio > 224) & (ratio <= 448)).all())


def test_fp8_scale_of_near_zero_block_uses_amax_floor_1e_4():
    _, scale = fp8_e4m3_block_quant(torch.zeros(1, 64), 64)
    assert scale.item() == 2.0 ** math.ceil(math.log2(1e-4 / 448))


def test_fp8_values_on_the_grid_survive_qdq_unchanged():
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(6, 128, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    q[:, ::64] = 448.0  # block amax exactly 448 -> scale is exactly 2**k
    x = q * torch.exp2(torch.randint(-8, 8, (6, 2), generator=g).float()).repeat_interleave(64, -1)
    assert torch.equal(fp8_e4m3_block_qdq(x, 64), x)


def test_fp8_blocks_are_quantized_independently():
    x = spread(2, 256, seed=4)
    y = x.clone()
    y[:, 64:128] *= 1000.0
    a, b = fp8_e4m3_block_qdq(x, 64), fp8_e4m3_block_qdq(y, 64)
    keep = torch.ones(256, dtype=torch.bool)
    keep[64:128] = False
    assert torch.equal(a[:, keep], b[:, keep])


def test_fp8_qdq_keeps_dtype_and_shape_and_saturates_nothing():
    x = spread(3, 5, 128, seed=5).bfloat16()
    y = fp8_e4m3_block_qdq(x, 64)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.isfinite(y.float()).all()


def test_fp8_qdq_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of the block size 64"):
        fp8_e4m3_block_qdq(torch.ones(2, 100), 64)


# ---- FP4 ----------------------------------------------------------------------------------------

def test_fp4_ties_round_to_even_code_and_large_values_saturate():
    block = torch.zeros(32)
    # amax 6 -> scale 1; midpoints between grid values, then saturation of nothing beyond 6
    vals = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.75, -5.0])
    block[: len(vals)] = vals
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -1.0, -4.0])
    assert torch.equal(fp4_e2m1_block_qdq(block)[: len(vals)], want)


def test_fp4_qdq_is_the_nearest_grid_value_times_the_block_scale():
    x = spread(8, 128, seed=6)
    _, scale = fp4_e2m1_block_quant(x, 32)
    s = scale.repeat_interleave(32, -1)
    grid = torch.cat([-FP4_VALUES.flip(0), FP4_VALUES])
    best = (x / s).unsqueeze(-1).sub(grid).abs().min(-1).values
    got = fp4_e2m1_block_qdq(x, 32) / s
    assert bool(torch.isin(got, grid).all())
    assert torch.equal((x / s - got).abs(), best)


def test_fp4_scales_are_powers_of_two_with_amax_in_upper_half_of_range():
    x = spread(4, 128, seed=7)
    codes, scale = fp4_e2m1_block_quant(x, 32)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 16 and scale.shape == (4, 4)
    assert is_pow2(scale)
    ratio = x.view(4, 4, 32).abs().amax(-1) / scale
    assert bool(((ratio > 3) & (ratio <= 6)).all())


def test_fp4_values_on_the_grid_survive_qdq_unchanged():
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 16, (4, 64), generator=g)
    codes[:, ::32] = 7  # block amax 6 -> scale exactly 2**k
    vals = torch.where(codes & 8 != 0, -FP4_VALUES[codes & 7], FP4_VALUES[codes & 7])
    x = vals * torch.exp2(torch.randint(-6, 6, (4, 2), generator=g).float()).repeat_interleave(32, -1)
    assert torch.equal(fp4_e2m1_block_qdq(x, 32), x)


def test_fp4_code_layout_is_sign_bit_3_and_magnitude_index_in_bits_0_to_2():
    x = torch.cat([FP4_VALUES, -FP4_VALUES[1:], torch.zeros(17)])  # amax 6 -> scale 1
    codes, scale = fp4_e2m1_block_quant(x, 32)
    assert scale.item() == 1.0
    assert codes[:8].tolist() == list(range(8))
    assert codes[8:15].tolist() == list(range(9, 16))


def test_fp4_blocks_are_quantized_independently():
    x = spread(2, 128, seed=9)
    y = x.clone()
    y[:, :32] *= 1e4
    assert torch.equal(fp4_e2m1_block_qdq(x)[:, 32:], fp4_e2m1_block_qdq(y)[:, 32:])


def test_pack_fp4_puts_element_2i_in_low_nibble_and_2i_plus_1_in_high_nibble():
    packed = pack_fp4(torch.tensor([1, 2, 15, 8], dtype=torch.uint8))
    assert packed.dtype == torch.int8
    assert packed.view(torch.uint8).tolist() == [0x21, 0x8F]


def test_unpack_fp4_inverts_pack_for_every_byte_value():
    every = torch.arange(256, dtype=torch.uint8).view(torch.int8)
    assert torch.equal(pack_fp4(unpack_fp4(every)), every)
    codes = torch.randint(0, 16, (3, 5, 64), generator=torch.Generator().manual_seed(10), dtype=torch.uint8)
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)


# ---- Hadamard -----------------------------------------------------------------------------------

def sylvester(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    return h / math.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_hadamard_equals_the_orthonormal_sylvester_matrix(n):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(hadamard(x), x @ sylvester(n).T, atol=1e-5)


def test_hadamard_is_orthonormal_and_self_inverse():
    eye = torch.eye(64)
    h = hadamard(eye)
    assert torch.allclose(h @ h.T, eye, atol=1e-6)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-5)
    assert torch.allclose(hadamard(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_hadamard_rejects_sizes_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        hadamard(torch.ones(4, 96))


# ---- weight codecs ------------------------------------------------------------------------------

def fp8_2d_block_qdq(w):
    """FP8 qdq with one scale per 128x128 block, built from the 1-D qdq (zero-padded edges)."""
    out, inn = w.shape
    p = torch.nn.functional.pad(w, (0, -inn % 128, 0, -out % 128))
    blocks = p.unflatten(0, (-1, 128)).unflatten(-1, (-1, 128)).permute(0, 2, 1, 3)  # [ob, ib, 128, 128]
    q = fp8_e4m3_block_qdq(blocks.flatten(-2), 128 * 128).unflatten(-1, (128, 128))
    return q.permute(0, 2, 1, 3).flatten(2).flatten(0, 1)[:out, :inn]


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (64, 32)])
def test_fp8_weight_quant_then_dequant_equals_2d_block_qdq(shape):
    w = spread(*shape, seed=12) if shape[-1] % 32 == 0 else torch.randn(*shape)
    q, scale = quant_fp8_weight(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float8_e8m0fnu
    assert scale.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    assert torch.equal(dequant_fp8_weight(q, scale), fp8_2d_block_qdq(w))


def test_fp8_weight_dequant_accepts_float32_scales_and_indexes_blocks_by_row_then_column():
    q = torch.ones(256, 256).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    w = dequant_fp8_weight(q, scale)
    assert (w[0, 0], w[0, 255], w[255, 0], w[255, 255]) == (1.0, 2.0, 4.0, 8.0)
    assert torch.equal(dequant_fp8_weight(q, scale.to(torch.float8_e8m0fnu)), w)


def test_fp8_weight_dequant_rejects_a_scale_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"expected \[2, 1\]"):
        dequant_fp8_weight(torch.zeros(256, 64).to(torch.float8_e4m3fn), torch.ones(1, 1))


def test_fp4_weight_quant_then_dequant_equals_fp4_qdq_in_blocks_of_32():
    w = spread(48, 256, seed=13)
    packed, scale = quant_fp4_weight(w)
    assert packed.dtype == torch.int8 and packed.shape == (48, 128)
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (48, 8)
    assert torch.equal(dequant_fp4_weight(packed, scale), fp4_e2m1_block_qdq(w, 32))


def test_fp4_weight_dequant_uses_low_nibble_first_and_one_scale_per_32_inputs():
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 0], codes[0, 1], codes[0, 32] = 2, 15, 7  # 1.0, -6.0 | 6.0
    w = dequant_fp4_weight(pack_fp4(codes), torch.tensor([[0.5, 4.0]]))
    assert (w[0, 0], w[0, 1], w[0, 32]) == (0.5, -3.0, 24.0)
