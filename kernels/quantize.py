"""FP8 / FP4 quantization into the compact cache layouts, and back (kv_layout.py).

`encode_main` / `encode_index` write exactly the bytes of their reference, `kv_layout.encode_main`
/ `encode_index`; `decode_main` / `decode_index` read them back. Every rounding step is done with
integer arithmetic on float32 bit patterns instead of the hardware casts:

  * the scale: the reference takes 2**ceil(log2(fl(amax / qmax))). With qmax = 1.75 * 2**8
    (E4M3) or 1.5 * 2**2 (E2M1), fl(amax / qmax) <= 2**k holds exactly when amax <= qmax * 2**k
    (the rounding slack of the division, < 1 ulp of amax, cannot cross a float32 grid point), so
    the scale exponent is amax's exponent minus qmax's, plus one when amax's mantissa exceeds
    qmax's. No division, hence no dependence on how a GPU rounds one.
  * E4M3 and E2M1 codes: round-to-nearest-even on the bits (E2M1 as the reference's midpoint
    rule); BF16: round-to-nearest-even on the top 16 bits.
So the interpreter and the GPU run the same integer program, and the CPU test of that program
checks what the GPU computes. The only float operation is x * 2**-k, which is exact except when
the result is below float32's normal range; such values round to a zero code in both formats,
with the sign kept, whether or not the GPU flushes them to zero first.

Scale bytes are decoded as 2**(byte - 127) for bytes 1..254; byte 0 (2**-127) reads as 0.0, and
the encoders never write it (the amax floor keeps scales >= 2**-22).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import kv_layout
from .dispatch import rows_per_program, use_triton
from .kv_layout import INDEX_BLOCK, MAIN_BLOCK, index_row_bytes, main_row_bytes


# ---- bit-level helpers (shared with the kernels that read the layouts) -----------------------

@triton.jit
def ue8m0_scale_byte(amax, QMAX_EXP: tl.constexpr, QMAX_MANT: tl.constexpr):
    """Biased exponent (int32) of the power-of-two scale for a block with this float32 amax:
    smallest 2**k with amax <= qmax * 2**k, qmax = (1 + QMAX_MANT / 2**23) * 2**QMAX_EXP."""
    bits = tl.maximum(amax, 1e-4).to(tl.int32, bitcast=True)  # the reference's amax floor
    exp = (bits >> 23) & 0xFF
    return exp - QMAX_EXP + ((bits & 0x7FFFFF) > QMAX_MANT).to(tl.int32)


@triton.jit
def pow2_from_byte(e):
    """2**(e - 127) as float32 for biased exponents e in 1..254 (int32)."""
    return (e << 23).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_code(y):
    """float32 y with |y| <= 448 -> E4M3 code (int32 0..255), round-to-nearest-even, sign kept."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = bits & 0x7FFFFFFF
    # normal E4M3 (|y| >= 2**-6): keep 3 mantissa bits, rounding on the 20 dropped ones; a carry
    # runs into the exponent, which is what rounding up to the next binade needs
    r = a + 0x7FFFF + ((a >> 20) & 1)
    normal = (r >> 20) - ((127 - 7) << 3)
    # subnormal E4M3: k * 2**-9, k = round(|y| * 2**9) = round(m * 2**(e - 141)); m < 2**24, so
    # a shift of 25 already yields 0 and clamping it keeps the shift amounts defined
    e = tl.maximum(a >> 23, 1)
    m = (a & 0x7FFFFF) | ((a >> 23) > 0).to(tl.int32) << 23
    shift = tl.minimum(141 - e, 25)
    q = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    sub = q + up.to(tl.int32)
    return tl.where(a >= 0x3C800000, normal, sub) | (sign << 7)


@triton.jit
def e4m3_value(code):
    """E4M3 code (int32 0..255) -> float32. Codes 0x7F / 0xFF (NaN) are never written."""
    e = (code >> 3) & 15
    m = code & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    val = tl.where(e > 0, normal, m.to(tl.float32) * 0.001953125)  # subnormal: m * 2**-9
    # the sign goes in as a bit: compiled for a GPU, `-val` is `0 - val`, which turns -0.0 into +0.0
    return (val.to(tl.int32, bitcast=True) | ((code & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_code(a):
    """|y| as float32 (<= 6) -> E2M1 magnitude code 0..7: nearest of 0, .5, 1, 1.5, 2, 3, 4, 6;
    a value on a midpoint goes to the even code (the reference's rule, block_quant.py)."""
    return ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
            + (a > 5.0).to(tl.int32))


@triton.jit
def e2m1_value(code):
    """E2M1 code (int32, bit 3 = sign) -> float32. Magnitude m >= 2 is a normal number whose
    exponent and mantissa bit are m's bits, placed in float32 bits with the bias moved; m = 1 is
    0.5 and m = 0 is 0."""
    m = code & 7
    bits = tl.where(m >= 2, (m << 22) + 0x3F000000, m * 0x3F000000)
    return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def load_f32(ptr, mask, FROM_BF16: tl.constexpr):
    """Load float32, or BF16 given as int16 bits and widened by a shift: exact for subnormals,
    which the interpreter's BF16 conversion flushes."""
    if FROM_BF16:
        return ((tl.load(ptr, mask=mask, other=0).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def bf16_bits(x):
    """float32 -> BF16 bit pattern (int32 0..65535), round-to-nearest-even."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


@triton.jit
def round_f32(v, BF16: tl.constexpr):
    """float32 v rounded to the tensor dtype and widened back: BF16 to nearest even (on the
    bits), float32 unchanged. Where torch rounds an elementwise BF16 operation's result."""
    if BF16:
        return (bf16_bits(v) << 16).to(tl.float32, bitcast=True)
    return v


@triton.jit
def store_f32(ptr, v, mask, BF16: tl.constexpr):
    """Store float32 v, or its BF16 rounding as int16 bits (the tensor viewed as int16)."""
    if BF16:
        tl.store(ptr, bf16_bits(v).to(tl.int16), mask=mask)
    else:
        tl.store(ptr, v, mask=mask)


@triton.jit
def _row_pointers(src_ptr, dst_ptr, src_row_stride, dst_row_stride, n_rows, ROWS: tl.constexpr):
    """This program's ROWS rows of the source and of the destination [ROWS] (int64 offsets, since
    rows x stride can pass 2**31) and which of them exist."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    return src_ptr + row * src_row_stride, dst_ptr + row * dst_row_stride, row < n_rows


@triton.jit
def _main_blocks(NOPE: tl.constexpr, NB_P: tl.constexpr):
    """The FP8 part of a main row as blocks of 64: block ids [NB_P] (padded to a power of two),
    which of them exist, and the element offsets [NB_P, 64]."""
    blk = tl.arange(0, NB_P)
    return blk, blk < NOPE // 64, blk[:, None] * 64 + tl.arange(0, 64)[None, :]


# ---- kernels: ROWS rows a program (rows_per_program), each row's math on its own -------------

@triton.jit
def _encode_main_kernel(x_ptr, out_ptr, x_row_stride, out_row_stride, n_rows,
                        NOPE: tl.constexpr, ROPE: tl.constexpr, ROW_BYTES: tl.constexpr,
                        NB_P: tl.constexpr, ROPE_P: tl.constexpr, PAD_P: tl.constexpr, FROM_BF16: tl.constexpr,
                        ROWS: tl.constexpr):
    x_row, out_row, row_ok = _row_pointers(x_ptr, out_ptr, x_row_stride, out_row_stride, n_rows, ROWS)
    blk, in_blk, offs = _main_blocks(NOPE, NB_P)
    blk_ok = row_ok[:, None] & in_blk[None, :]  # [ROWS, NB_P]
    x = load_f32(x_row[:, None, None] + offs[None, :, :], blk_ok[:, :, None], FROM_BF16)
    scale = ue8m0_scale_byte(tl.max(tl.abs(x), axis=2), 8, 0x600000)  # qmax 448 = 1.75 * 2**8
    # |x| * 2**-k <= 448 by the choice of k, so the reference's clamp never acts
    codes = e4m3_code(x * pow2_from_byte(254 - scale)[:, :, None])
    tl.store(out_row[:, None, None] + offs[None, :, :], codes.to(tl.uint8), mask=blk_ok[:, :, None])

    i = tl.arange(0, ROPE_P)
    in_rope = row_ok[:, None] & (i < ROPE)[None, :]
    rope = bf16_bits(load_f32(x_row[:, None] + NOPE + i[None, :], in_rope, FROM_BF16))
    rope_out = out_row[:, None] + NOPE + 2 * i[None, :]
    tl.store(rope_out, (rope & 0xFF).to(tl.uint8), mask=in_rope)  # little-endian
    tl.store(rope_out + 1, (rope >> 8).to(tl.uint8), mask=in_rope)

    tl.store(out_row[:, None] + NOPE + 2 * ROPE + blk[None, :], scale.to(tl.uint8), mask=blk_ok)
    USED: tl.constexpr = NOPE + 2 * ROPE + NOPE // 64
    p = tl.arange(0, PAD_P)
    tl.store(out_row[:, None] + USED + p[None, :], tl.zeros([ROWS, PAD_P], dtype=tl.uint8),
             mask=row_ok[:, None] & (p < ROW_BYTES - USED)[None, :])


@triton.jit
def _decode_main_kernel(b_ptr, out_ptr, b_row_stride, out_row_stride, n_rows,
                        NOPE: tl.constexpr, ROPE: tl.constexpr, NB_P: tl.constexpr, ROPE_P: tl.constexpr,
                        ROWS: tl.constexpr):
    b_row, out_row, row_ok = _row_pointers(b_ptr, out_ptr, b_row_stride, out_row_stride, n_rows, ROWS)
    blk, in_blk, offs = _main_blocks(NOPE, NB_P)
    blk_ok = row_ok[:, None] & in_blk[None, :]
    codes = tl.load(b_row[:, None, None] + offs[None, :, :], mask=blk_ok[:, :, None], other=0).to(tl.int32)
    scale = tl.load(b_row[:, None] + NOPE + 2 * ROPE + blk[None, :], mask=blk_ok, other=127).to(tl.int32)
    tl.store(out_row[:, None, None] + offs[None, :, :], e4m3_value(codes) * pow2_from_byte(scale)[:, :, None],
             mask=blk_ok[:, :, None])
    i = tl.arange(0, ROPE_P)
    in_rope = row_ok[:, None] & (i < ROPE)[None, :]
    rope_in = b_row[:, None] + NOPE + 2 * i[None, :]
    lo = tl.load(rope_in, mask=in_rope, other=0).to(tl.int32)
    hi = tl.load(rope_in + 1, mask=in_rope, other=0).to(tl.int32)
    tl.store(out_row[:, None] + NOPE + i[None, :], ((hi << 24) | (lo << 16)).to(tl.float32, bitcast=True),
             mask=in_rope)


@triton.jit
def _encode_index_kernel(x_ptr, out_ptr, x_row_stride, out_row_stride, n_rows, DI: tl.constexpr,
                         NB_P: tl.constexpr, FROM_BF16: tl.constexpr, ROWS: tl.constexpr):
    x_row, out_row, row_ok = _row_pointers(x_ptr, out_ptr, x_row_stride, out_row_stride, n_rows, ROWS)
    NB: tl.constexpr = DI // 32
    blk = tl.arange(0, NB_P)
    j = tl.arange(0, 16)  # byte j of a block packs elements 2j (low nibble) and 2j + 1
    blk_ok = row_ok[:, None] & (blk < NB)[None, :]  # [ROWS, NB_P]
    even_offs = (blk[:, None] * 32 + 2 * j[None, :])[None, :, :]
    even = load_f32(x_row[:, None, None] + even_offs, blk_ok[:, :, None], FROM_BF16)
    odd = load_f32(x_row[:, None, None] + even_offs + 1, blk_ok[:, :, None], FROM_BF16)
    amax = tl.maximum(tl.max(tl.abs(even), axis=2), tl.max(tl.abs(odd), axis=2))
    scale = ue8m0_scale_byte(amax, 2, 0x400000)  # qmax 6 = 1.5 * 2**2
    inv = pow2_from_byte(254 - scale)[:, :, None]
    # the sign comes from x's sign bit, so -0.0 keeps it (as encode_index does)
    lo = e2m1_code(tl.abs(even * inv)) | ((even.to(tl.int32, bitcast=True) >> 28) & 8)
    hi = e2m1_code(tl.abs(odd * inv)) | ((odd.to(tl.int32, bitcast=True) >> 28) & 8)
    tl.store(out_row[:, None, None] + (blk[:, None] * 16 + j[None, :])[None, :, :], (lo | (hi << 4)).to(tl.uint8),
             mask=blk_ok[:, :, None])
    tl.store(out_row[:, None] + DI // 2 + blk[None, :], scale.to(tl.uint8), mask=blk_ok)


@triton.jit
def _decode_index_kernel(b_ptr, out_ptr, b_row_stride, out_row_stride, n_rows, DI: tl.constexpr,
                         NB_P: tl.constexpr, ROWS: tl.constexpr):
    b_row, out_row, row_ok = _row_pointers(b_ptr, out_ptr, b_row_stride, out_row_stride, n_rows, ROWS)
    NB: tl.constexpr = DI // 32
    blk = tl.arange(0, NB_P)
    j = tl.arange(0, 16)
    blk_ok = row_ok[:, None] & (blk < NB)[None, :]
    packed = tl.load(b_row[:, None, None] + (blk[:, None] * 16 + j[None, :])[None, :, :], mask=blk_ok[:, :, None],
                     other=0).to(tl.int32)
    scale = pow2_from_byte(tl.load(b_row[:, None] + DI // 2 + blk[None, :], mask=blk_ok, other=127).to(tl.int32))
    even_offs = (blk[:, None] * 32 + 2 * j[None, :])[None, :, :]
    tl.store(out_row[:, None, None] + even_offs, e2m1_value(packed & 15) * scale[:, :, None], mask=blk_ok[:, :, None])
    tl.store(out_row[:, None, None] + even_offs + 1, e2m1_value(packed >> 4) * scale[:, :, None],
             mask=blk_ok[:, :, None])


# ---- public functions ------------------------------------------------------------------------

def as_operand(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the kernels that load and store through load_f32 / store_f32 take it:
    contiguous, BF16 as its int16 bits (the interpreter's BF16 conversion flushes subnormals)."""
    t = t.contiguous()
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _launch_rows(kernel, src: torch.Tensor, out: torch.Tensor, n_rows: int, **consts) -> None:
    """One of the four row kernels over the first n_rows rows of src into out's, a row a program
    on a GPU, as they always ran there (dispatch.rows_per_program: more in the interpreter)."""
    if n_rows:
        rows = rows_per_program(src)
        kernel[(triton.cdiv(n_rows, rows),)](src, out, src.stride(0), out.stride(0), n_rows, **consts, ROWS=rows)


def encode_main_consts(D: int, nope_dim: int, from_bf16: bool) -> dict:
    """_encode_main_kernel's constexprs for rows of D dims, nope_dim of them FP8."""
    rope, rb = D - nope_dim, main_row_bytes(D, nope_dim)
    pad = rb - (nope_dim + 2 * rope + nope_dim // MAIN_BLOCK)
    return dict(NOPE=nope_dim, ROPE=rope, ROW_BYTES=rb, NB_P=triton.next_power_of_2(nope_dim // MAIN_BLOCK),
                ROPE_P=triton.next_power_of_2(rope), PAD_P=triton.next_power_of_2(max(pad, 1)), FROM_BF16=from_bf16)


def encode_index_consts(Di: int, from_bf16: bool) -> dict:
    """_encode_index_kernel's constexprs for rows of Di dims."""
    return dict(DI=Di, NB_P=triton.next_power_of_2(Di // INDEX_BLOCK), FROM_BF16=from_bf16)


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{what}: expected [N, width], got shape {list(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def _float_rows(x: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
    """Rows to encode as the kernels read them: BF16 as its int16 bits, other dtypes as float32."""
    x = _rows(x, what)
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16), True
    return x.float(), False


def reference_encode_main(x: torch.Tensor, nope_dim: int) -> torch.Tensor:
    return kv_layout.encode_main(x, x.shape[-1], nope_dim)


def reference_decode_main(b: torch.Tensor, head_dim: int, nope_dim: int) -> torch.Tensor:
    return kv_layout.decode_main(b, head_dim, nope_dim)


def reference_encode_index(x: torch.Tensor) -> torch.Tensor:
    return kv_layout.encode_index(x, x.shape[-1])


def reference_decode_index(b: torch.Tensor, index_dim: int) -> torch.Tensor:
    return kv_layout.decode_index(b, index_dim)


def encode_main(x: torch.Tensor, nope_dim: int) -> torch.Tensor:
    """Main keys x [N, D] (any float dtype) -> uint8 [N, main_row_bytes(D, nope_dim)]: FP8 E4M3
    codes of the first nope_dim dims (scale per 64), BF16 of the rest, UE8M0 scales, zero pad."""
    if not use_triton(x):
        return reference_encode_main(x, nope_dim)
    x, from_bf16 = _float_rows(x, "encode_main")
    out = torch.empty(x.shape[0], main_row_bytes(x.shape[1], nope_dim), dtype=torch.uint8, device=x.device)
    _launch_rows(_encode_main_kernel, x, out, x.shape[0], **encode_main_consts(x.shape[1], nope_dim, from_bf16))
    return out


def decode_main(b: torch.Tensor, head_dim: int, nope_dim: int) -> torch.Tensor:
    """uint8 [N, main_row_bytes(head_dim, nope_dim)] -> float32 keys [N, head_dim]."""
    if not use_triton(b):
        return reference_decode_main(b, head_dim, nope_dim)
    b = _rows(b, "decode_main")
    if b.shape[1] != main_row_bytes(head_dim, nope_dim):
        raise ValueError(f"decode_main: rows of {b.shape[1]} bytes, expected {main_row_bytes(head_dim, nope_dim)}")
    out = torch.empty(b.shape[0], head_dim, dtype=torch.float32, device=b.device)
    rope = head_dim - nope_dim
    _launch_rows(_decode_main_kernel, b, out, b.shape[0], NOPE=nope_dim, ROPE=rope,
                 NB_P=triton.next_power_of_2(nope_dim // MAIN_BLOCK), ROPE_P=triton.next_power_of_2(rope))
    return out


def encode_index(x: torch.Tensor) -> torch.Tensor:
    """Indexer keys x [N, Di] -> uint8 [N, Di/2 + Di/32]: packed FP4 E2M1 (element 2i in the low
    nibble), then one UE8M0 scale per 32 elements."""
    if not use_triton(x):
        return reference_encode_index(x)
    x, from_bf16 = _float_rows(x, "encode_index")
    Di = x.shape[1]
    out = torch.empty(x.shape[0], index_row_bytes(Di), dtype=torch.uint8, device=x.device)
    _launch_rows(_encode_index_kernel, x, out, x.shape[0], **encode_index_consts(Di, from_bf16))
    return out


def decode_index(b: torch.Tensor, index_dim: int) -> torch.Tensor:
    """uint8 [N, index_row_bytes(index_dim)] -> float32 indexer keys [N, index_dim]."""
    if not use_triton(b):
        return reference_decode_index(b, index_dim)
    b = _rows(b, "decode_index")
    if b.shape[1] != index_row_bytes(index_dim):
        raise ValueError(f"decode_index: rows of {b.shape[1]} bytes, expected {index_row_bytes(index_dim)}")
    out = torch.empty(b.shape[0], index_dim, dtype=torch.float32, device=b.device)
    _launch_rows(_decode_index_kernel, b, out, b.shape[0], DI=index_dim,
                 NB_P=triton.next_power_of_2(index_dim // INDEX_BLOCK))
    return out
