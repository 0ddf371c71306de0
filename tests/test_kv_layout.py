"""Byte layouts of cached state (kernels/kv_layout.py, through workers/kv_layout.py's ModelConfig
API): on-grid rows round-trip bit for bit, off-grid rows are rounded once, within one FP8 / FP4 step."""

import pytest
import torch

from kernels.block_quant import (
    FP4_VALUES,
    fp4_e2m1_block_qdq,
    fp4_e2m1_block_quant,
    fp8_e4m3_block_qdq,
    fp8_e4m3_block_quant,
    unpack_fp4,
)
from workers.capacity import indexer_entry_bytes, main_entry_bytes
from workers.config import preset
from workers.kv_layout import decode_index, decode_main, encode_index, encode_main

CFGS = [preset("flash-attn"), preset("tiny")]  # D=512/r=64/Di=128 (584 B), D=128/r=64/Di=64 (200 B, padded)
IDS = [c.name for c in CFGS]


def bits(t):
    """float tensor -> integer bit patterns, so that -0.0 != +0.0 and comparisons are exact."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (bits(a) != bits(b)).nonzero()
    assert len(diff) == 0, f"{len(diff)} values differ, first at {diff[0].tolist()}: {a[tuple(diff[0])]} vs {b[tuple(diff[0])]}"


def spread(rows, width, block, seed, lo=-40, hi=40):
    """Normal values scaled per block by 2**k, k uniform in [lo, hi): many scales per row."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(lo, hi, (rows, width // block, 1), generator=g).float())
    return (torch.randn(rows, width // block, block, generator=g) * mag).flatten(-2)


def hard_blocks(rows, width, block, qmax, seed):
    """Rows whose blocks are each one of the awkward cases, chosen at random per block."""
    g = torch.Generator().manual_seed(seed)
    n = rows * (width // block)
    r = lambda *s: torch.randn(*s, block, generator=g)
    cases = torch.stack([
        torch.zeros(n, block),                                               # all zeros
        -torch.zeros(n, block),                                              # all negative zeros
        r(n) * 1e-12,                                                        # below the amax floor
        r(n) * 1e-41,                                                        # float32 subnormals
        torch.cat([r(n)[:, :1] * 1e3, r(n)[:, 1:] * 1e3 * 2.0**-13], -1),    # one big value, rest in the subnormal codes
        qmax * torch.exp2(torch.randint(-20, 20, (n, 1), generator=g).float()) * torch.randn(n, block, generator=g).sign(),  # every value at +-max
        r(n) * 1e30,                                                         # large magnitudes
        (r(n) * 4).round() * (r(n) * 2).exp(),                               # exact zeros mixed with values
    ])
    pick = torch.randint(0, len(cases), (n,), generator=g)
    return cases[pick, torch.arange(n)].reshape(rows, width)


def bf16_grid(rows, width, seed):
    """BF16-representable float32 values over the whole BF16 range, with signed zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * torch.exp2(torch.randint(-130, 126, (rows, width), generator=g).float())
    x[:, :2] = torch.tensor([0.0, -0.0])
    return x.to(torch.bfloat16).float()


def on_grid_main(cfg, rows, seed):
    n = cfg.head_dim - cfg.qk_rope_head_dim
    nope = torch.cat([fp8_e4m3_block_qdq(spread(rows, n, 64, seed), 64),
                      fp8_e4m3_block_qdq(hard_blocks(rows, n, 64, 448.0, seed + 1), 64)])
    rope = bf16_grid(2 * rows, cfg.qk_rope_head_dim, seed + 2)
    return torch.cat([nope, rope], -1)


def on_grid_index(cfg, rows, seed):
    Di = cfg.index_head_dim
    return torch.cat([fp4_e2m1_block_qdq(spread(rows, Di, 32, seed), 32),
                      fp4_e2m1_block_qdq(hard_blocks(rows, Di, 32, 6.0, seed + 1), 32)])


# ---- sizes and byte order ---------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_main_byte_order_codes_then_bf16_rope_then_scales_then_zero_pad(cfg):
    D, r = cfg.head_dim, cfg.qk_rope_head_dim
    n = D - r
    x = spread(5, D, 64, seed=0)
    b = encode_main(x, cfg)
    assert b.dtype == torch.uint8 and b.shape == (5, main_entry_bytes(cfg))
    codes, scale = fp8_e4m3_block_quant(x[:, :n], 64)
    assert torch.equal(b[:, :n], codes.view(torch.uint8))
    rope = x[:, n:].to(torch.bfloat16).view(torch.int16).int() & 0xFFFF
    assert torch.equal(b[:, n : n + 2 * r : 2].int(), rope & 0xFF)  # little-endian: low byte first
    assert torch.equal(b[:, n + 1 : n + 2 * r : 2].int(), rope >> 8)
    s = b[:, n + 2 * r : n + 2 * r + n // 64]
    assert torch.equal(s, scale.to(torch.float8_e8m0fnu).view(torch.uint8))  # biased exponent
    assert torch.equal(torch.exp2(s.float() - 127), scale)
    assert not b[:, n + 2 * r + n // 64 :].any()


def test_flash_entry_sizes_are_584_and_68():
    cfg = preset("flash-attn")
    assert encode_main(torch.zeros(1, 512), cfg).shape[-1] == 584
    assert encode_index(torch.zeros(1, 128), cfg).shape[-1] == 68


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_index_byte_order_packed_codes_low_nibble_first_then_scales(cfg):
    Di = cfg.index_head_dim
    x = spread(5, Di, 32, seed=1)
    b = encode_index(x, cfg)
    assert b.dtype == torch.uint8 and b.shape == (5, indexer_entry_bytes(cfg))
    codes, scale = fp4_e2m1_block_quant(x, 32)
    assert torch.equal(b[:, : Di // 2] & 0xF, codes[:, 0::2]) and torch.equal(b[:, : Di // 2] >> 4, codes[:, 1::2])
    assert torch.equal(unpack_fp4(b[:, : Di // 2]), codes)
    assert torch.equal(torch.exp2(b[:, Di // 2 :].float() - 127), scale)


# ---- exact round trip of on-grid rows ---------------------------------------------------------

@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
@pytest.mark.parametrize("seed", range(4))
def test_on_grid_main_rows_round_trip_bit_for_bit(cfg, seed):
    x = on_grid_main(cfg, 300, seed)
    assert_bits_equal(decode_main(encode_main(x, cfg), cfg), x)
    # bf16 holds every FP8-times-power-of-two value, so a bf16 decode is exact too
    assert_bits_equal(decode_main(encode_main(x, cfg), cfg, torch.bfloat16), x.to(torch.bfloat16))


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
@pytest.mark.parametrize("seed", range(4))
def test_on_grid_index_rows_round_trip_bit_for_bit(cfg, seed):
    y = on_grid_index(cfg, 300, seed)
    assert (bits(y) == bits(-torch.zeros(()))).any()  # the FP4 qdq does emit -0.0 (small negatives)
    assert_bits_equal(decode_index(encode_index(y, cfg), cfg), y)


def test_main_round_trip_when_the_recomputed_scale_shrinks():
    cfg = preset("flash-attn")
    # amax 449 * 2**k takes scale 2**(k+1); 449/2 rounds to 224 on the FP8 grid, so the stored block
    # has amax 448 * 2**k and re-quantizes with scale 2**k: the codes double, the values stay.
    k = torch.arange(-10, 10).float()
    z = torch.randn(len(k), 512, generator=torch.Generator().manual_seed(3)).clamp(-400, 400)
    z[:, :448] *= torch.exp2(k)[:, None]
    z[:, 0::64] = 449 * torch.exp2(k)[:, None]
    x = torch.cat([fp8_e4m3_block_qdq(z[:, :448], 64), z[:, 448:].to(torch.bfloat16).float()], -1)
    _, s_first = fp8_e4m3_block_quant(z[:, :448], 64)
    b = encode_main(x, cfg)
    s_stored = torch.exp2(b[:, 576:583].float() - 127)
    assert torch.equal(s_stored, s_first / 2)
    assert_bits_equal(decode_main(b, cfg), x)


def test_index_round_trip_of_every_code_at_every_scale():
    cfg = preset("flash-attn")
    codes = torch.arange(16).repeat(8)  # each block of 32 holds every code twice
    vals = torch.where(codes >= 8, -FP4_VALUES[codes % 8], FP4_VALUES[codes % 8])
    k = torch.arange(-15, 100).float()  # 2**-15 is the smallest scale the amax floor allows
    y = vals[None] * torch.exp2(k)[:, None]
    assert torch.equal(fp4_e2m1_block_qdq(y, 32), y)  # on the grid (values; the qdq turns -0.0 into +0.0)
    assert_bits_equal(decode_index(encode_index(y, cfg), cfg), y)


def test_main_round_trip_of_every_fp8_code_at_every_scale():
    cfg = preset("flash-attn")
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]  # 0x7F / 0xFF are NaN in E4M3FN
    v = finite.view(torch.float8_e4m3fn).float()
    v = torch.cat([v, v[:448 - len(v)]])[:448]
    k = torch.arange(-22, 100).float()  # 2**-22 is the smallest scale the amax floor allows
    x = torch.cat([v[None] * torch.exp2(k)[:, None], torch.ones(len(k), 64)], -1)
    assert_bits_equal(decode_main(encode_main(x, cfg), cfg), x)


# ---- off-grid rows: rounded once, within a step -----------------------------------------------

@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_off_grid_main_is_the_reference_rounding_within_one_fp8_step(cfg):
    n = cfg.head_dim - cfg.qk_rope_head_dim
    x = torch.cat([spread(200, cfg.head_dim, 64, seed=5), hard_blocks(200, cfg.head_dim, 64, 448.0, seed=6)])
    out = decode_main(encode_main(x, cfg), cfg)
    assert torch.equal(out[:, :n], fp8_e4m3_block_qdq(x[:, :n], 64))
    assert_bits_equal(out[:, n:], x[:, n:].to(torch.bfloat16).float())
    # E4M3 has 3 mantissa bits: relative error <= 2**-4 on normals, <= half the subnormal step
    # (2**-10 * scale) below them. BF16 has 8 significant bits: relative error <= 2**-8, or
    # half its smallest subnormal (2**-134) for the float32 subnormals in hard_blocks.
    _, scale = fp8_e4m3_block_quant(x[:, :n], 64)
    bound = torch.maximum(x[:, :n].abs() * 2.0**-4, scale.repeat_interleave(64, -1) * 2.0**-10)
    assert ((out[:, :n] - x[:, :n]).abs() <= bound).all()
    assert ((out[:, n:] - x[:, n:]).abs() <= (x[:, n:].abs() * 2.0**-8).clamp_min(2.0**-134)).all()
    # ... and rounding happens once: the output is on the grid
    assert_bits_equal(decode_main(encode_main(out, cfg), cfg), out)


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
def test_off_grid_index_is_the_reference_rounding_within_one_fp4_step(cfg):
    Di = cfg.index_head_dim
    x = torch.cat([spread(200, Di, 32, seed=7), hard_blocks(200, Di, 32, 6.0, seed=8)])
    out = decode_index(encode_index(x, cfg), cfg)
    assert torch.equal(out, fp4_e2m1_block_qdq(x, 32))  # equal values (the qdq may drop a -0 sign)
    # E2M1 steps are 0.5 below 2, then 1, then 2 (times the scale): the error is at most
    # scale/4, or a quarter of |x| above 2 * scale.
    _, scale = fp4_e2m1_block_quant(x, 32)
    bound = torch.maximum(x.abs() / 4, scale.repeat_interleave(32, -1) / 4)
    assert ((out - x).abs() <= bound).all()
    assert_bits_equal(decode_index(encode_index(out, cfg), cfg), out)


# ---- shapes -----------------------------------------------------------------------------------

def test_leading_dims_are_rows_and_bad_widths_are_rejected():
    cfg = preset("flash-attn")
    x = on_grid_main(cfg, 6, seed=9).reshape(2, 6, 512)
    assert torch.equal(encode_main(x, cfg), encode_main(x.reshape(12, 512), cfg).reshape(2, 6, 584))
    assert_bits_equal(decode_main(encode_main(x, cfg), cfg), x)
    y = on_grid_index(cfg, 3, seed=9).reshape(3, 2, 128)
    assert_bits_equal(decode_index(encode_index(y, cfg), cfg), y)
    with pytest.raises(ValueError, match="512"):
        encode_main(torch.zeros(2, 448), cfg)
    with pytest.raises(ValueError, match="584"):
        decode_main(torch.zeros(2, 576, dtype=torch.uint8), cfg)
    with pytest.raises(ValueError, match="128"):
        encode_index(torch.zeros(2, 64), cfg)
    with pytest.raises(ValueError, match="68"):
        decode_index(torch.zeros(2, 64, dtype=torch.uint8), cfg)
