"""MXFP8 Triton kernels, bit-exact with `reference.py` (see it for the format's rules).

`quantize_both` reads a 2-D input once and writes the row-wise (blocks along K) and the
column-wise (blocks along M, stored transposed as [K, M]) quantizations, which the forward
GEMM and the two backward GEMMs consume. `quantize` runs the same kernel with one layout.

The per-element work is what limits the one-pass kernel (`benchmarks/quant.py --compile-only 90
--sass` counts it), so on the GPU a few steps are inline PTX: bfloat16 widened and masked in
pairs, block maxima with max.u16x2, four FP8 bytes per cvt pair written as one word. The
interpreter (CPU tests) cannot run inline assembly: there EMULATE_RNE (set exactly when
interpreting) selects plain Triton for the same results, so those PTX lines are checked by the
GPU tests only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.quant.formats import (
    E8M0_DTYPE,
    check_divisible,
    check_input,
    check_scale_mode,
    element_format,
    normalize_axis,
)
from moekit.quant.mxfp8.blocked import (
    SCALE_TILE_COLS,
    SCALE_TILE_ROWS,
    MXBlockedTensor,
    blocked_numel,
    check_scale_layout,
)
from moekit.quant.mxfp8.reference import BLOCK
from moekit.quant.tensors import MXTensor
from moekit.quant.triton_utils import (
    INTERPRETING,
    as_bytes,
    decode_fp8,
    encode_fp8_satfinite,
    encode_fp8_words,
    kernel_input,
    needs_index_64,
    program_id,
    to_float32,
)


@triton.jit
def _block_scale(amax_bits, EMAX: tl.constexpr, RCEIL: tl.constexpr):
    """(2**-s, E8M0 byte s + 127) for blocks whose |x| maxima have int32 bits `amax_bits` (s: the
    scale exponent); (NaN, 0xFF) for blocks holding NaN or Inf. The product with a NaN factor is
    NaN, which the GPU's cvt.rn.satfinite encodes as 0x7F: one select per block, not per byte.

    One integer max serves both: as integers the bits of non-negative floats order like the floats,
    and every NaN or Inf (exponent field 0xFF) exceeds every finite magnitude. The exponent field
    b = bits >> 23 is floor(log2 amax) + 127; for rceil, adding 0x1FFFFF carries into it exactly when
    the mantissa exceeds 1.75. s = max(b, EMAX) - 127 - EMAX: at least -127, and never above 127.
    """
    nonfinite = amax_bits >= 0x7F800000
    b = tl.maximum((amax_bits + 0x1FFFFF if RCEIL else amax_bits) >> 23, EMAX)
    factor = ((254 + EMAX - b) << 23).to(tl.float32, bitcast=True)  # exponent field 127 - s
    return tl.where(nonfinite, float("nan"), factor), tl.where(nonfinite, 255, b - EMAX).to(tl.uint8)


@triton.jit
def _magnitude_bits(x):
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _widen(raw, IS_BF16: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """Loaded values as float32. On the GPU, bfloat16 bits (int16) widen in pairs from the 32-bit
    register that holds them: a shift for the low value, a mask for the high one; extracted one at
    a time, the high value costs a byte permute and a shift. The interpreter takes `to_float32`."""
    if IS_BF16 and not EMULATE_RNE:
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16;\n and.b32 $1, $2, 0xFFFF0000; }", "=r,=r,r",
                                         [raw], dtype=tl.float32, is_pure=True, pack=2)
    return to_float32(raw, IS_BF16)


@triton.jit
def _magnitude_pairs(raw, EMULATE_RNE: tl.constexpr):
    """|x| bits of bfloat16 pairs (int16 `raw` [R, C]) as int32 words [R, C / 2], the even column
    in the low half: the block maxima then take one 16x2 max per two values (`_block_max`)."""
    if EMULATE_RNE:
        lo, hi = tl.split(tl.reshape(raw, (raw.shape[0], raw.shape[1] // 2, 2)))
        return (lo.to(tl.int32) & 0x7FFF) | ((hi.to(tl.int32) & 0x7FFF) << 16)
    # The word goes to the pair's first value (the second gets 0, unused): the register holding the
    # pair is read as it is, where joining two extracted halves would copy or permute it.
    words = tl.inline_asm_elementwise("{ and.b32 $0, $2, 0x7FFF7FFF;\n mov.b32 $1, 0; }", "=r,=r,r", [raw],
                                      dtype=tl.int32, is_pure=True, pack=2)
    return tl.split(tl.reshape(words, (raw.shape[0], raw.shape[1] // 2, 2)))[0]


@triton.jit
def _max_u16x2(a, b):
    return tl.inline_asm_elementwise("max.u16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _block_max(mag, axis: tl.constexpr, PAIRS: tl.constexpr, U16X2: tl.constexpr):
    """Max along `axis` of magnitude bits, or of both halves of `_magnitude_pairs` words: at once
    with U16X2 (sm_90's max.u16x2), else each half on its own (also the interpreter's way: a custom
    combine is slow there)."""
    if not PAIRS:
        return tl.max(mag, axis=axis)
    elif U16X2:
        return tl.reduce(mag, axis, _max_u16x2)
    else:
        return tl.max(mag & -65536, axis=axis) | tl.max(mag & 0xFFFF, axis=axis)


@triton.jit
def _store(ptrs, values, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, values)
    else:
        tl.store(ptrs, values, mask=mask)


@triton.jit
def _store_scale_tile(ptr, scale, tile_row, tile_col, n_cols):
    """Store `scale` [128, 4], tile (`tile_row`, `tile_col`) of an [n_rows, n_cols] E8M0 scale matrix,
    in the blocked layout (`blocked.py`): 512 contiguous bytes, element (r, c) at (r % 32) * 16 +
    (r // 32) * 4 + c. Written whole, as a [32, 16] grid the compiler sees as contiguous (each warp
    stores whole 32-byte sectors), so no sector waits for another program's part. Unmasked: past the
    matrix's edge lie the padding rows / columns, whose blocks were read as zeros, and the scale byte
    of a zero block is 0x00, the layout's padding."""
    grid = tl.reshape(tl.permute(tl.reshape(scale, (4, 32, 4)), (1, 0, 2)), (32, 16))
    offs = (tile_row * tl.cdiv(n_cols, 4) + tile_col) * 512 + tl.arange(0, 32)[:, None] * 16 + tl.arange(0, 16)[None, :]
    tl.store(ptr + offs, grid)


@triton.jit
def _encode_fp8_pairs(lo, hi, MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr,
                      E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """FP8 bytes of `encode_fp8_satfinite` inputs `lo`, `hi` as int16 (lo in the low byte): on the GPU one
    cvt x2 instruction (its first source goes to the high byte)."""
    if EMULATE_RNE:
        lo = encode_fp8_satfinite(lo, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, True).to(tl.int16)
        return lo | (encode_fp8_satfinite(hi, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, True).to(tl.int16) << 8)
    elif E5M2:
        return tl.inline_asm_elementwise("cvt.rn.satfinite.e5m2x2.f32 $0, $2, $1;", "=h,f,f", [lo, hi],
                                         dtype=tl.int16, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;", "=h,f,f", [lo, hi],
                                         dtype=tl.int16, is_pure=True, pack=1)


@triton.jit
def _quantize_both_paired(
    x_ptr, row_data_ptr, row_scale_ptr, col_data_ptr, col_scale_ptr, M, K, stride_xm, pid_m, pid_k,
    EMAX: tl.constexpr, RCEIL: tl.constexpr, MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr,
    MIN_NORMAL_EXP: tl.constexpr, E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, U16X2: tl.constexpr,
    BLOCKED_SCALES: tl.constexpr,
):
    """Both layouts of a bfloat16 tile, moved as `fp8_block`'s both-layout kernel moves its block:
    x read as int32 pairs (two columns a word) and widened by a shift and a mask, the row-wise
    bytes stored as int16 pairs in the load's layout, the column-wise ones as words of 4 rows.

    The tile is held as [a, h, j, p]: x row 4a + j, pair 32h + p (columns 64h + 2p, + 1). Triton
    gives the pair axis 8 values a thread (16-byte stores of the int16 pairs) and 4 lanes, then
    fills the leading axis: 8 lanes along a, warps along a, then h; j stays in registers. So a
    thread holds rows 4a .. 4a + 3 and a warp 32 rows: a column's 32-row block is j (in-thread)
    by a % 8 (lanes), its amax shuffles only, and a row's 32 columns are 16 pairs on 2 lanes.
    Even and odd columns stay apart (`lo`, `hi`) from the load to the stores. Only the speed
    depends on the layout.
    """
    H: tl.constexpr = BLOCK_K // 64
    A: tl.constexpr = BLOCK_M // 4
    S: tl.constexpr = BLOCK_M // 32
    a = tl.arange(0, A)[:, None, None, None]
    h = tl.arange(0, H)[None, :, None, None]
    rows = pid_m * BLOCK_M + 4 * a + tl.arange(0, 4)[None, None, :, None]
    pair = pid_k * (BLOCK_K // 2) + 32 * h + tl.arange(0, 32)[None, None, None, :]
    ptrs = x_ptr.to(tl.pointer_type(tl.int32)) + rows * (stride_xm // 2) + pair
    mask = (rows < M) & (pair < K // 2)
    if EVEN:
        pairs = tl.load(ptrs)
    else:
        pairs = tl.load(ptrs, mask=mask, other=0)
    lo = (pairs << 16).to(tl.float32, bitcast=True)
    hi = (pairs & -65536).to(tl.float32, bitcast=True)
    mag = pairs & 0x7FFF7FFF  # |x| bits of both halves

    # Row-wise: a block is 16 pairs along p.
    amax = _block_max(tl.reshape(mag, (A, H, 4, 2, 16)), 4, True, U16X2)
    factor, scale = _block_scale(tl.maximum(amax & 0xFFFF, amax >> 16) << 16, EMAX, RCEIL)
    row_lo = tl.reshape(tl.reshape(lo, (A, H, 4, 2, 16)) * factor[:, :, :, :, None], (A, H, 4, 32))
    row_hi = tl.reshape(tl.reshape(hi, (A, H, 4, 2, 16)) * factor[:, :, :, :, None], (A, H, 4, 32))
    _store(row_data_ptr.to(tl.pointer_type(tl.int16)) + rows * (K // 2) + pair,
           _encode_fp8_pairs(row_lo, row_hi, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, EMULATE_RNE), mask,
           EVEN)
    kb = pid_k * (BLOCK_K // 32) + 2 * h + tl.arange(0, 2)[None, None, None, :]
    if BLOCKED_SCALES:  # [a, h, j, half] -> [row 4a + j, column 2h + half]
        _store_scale_tile(row_scale_ptr, tl.reshape(tl.permute(scale, (0, 2, 1, 3)), (BLOCK_M, 4)), pid_m, pid_k,
                          K // 32)
    else:
        _store(row_scale_ptr + rows * (K // 32) + kb, scale, (rows < M) & (kb < K // 32), EVEN)

    # Column-wise: a block is a % 8 by j; the in-thread axis is reduced first, then the lanes.
    amax = _block_max(_block_max(tl.reshape(mag, (S, 8, H, 4, 32)), 3, True, U16X2), 1, True, U16X2)
    factor_lo, scale_lo = _block_scale(amax << 16, EMAX, RCEIL)
    factor_hi, scale_hi = _block_scale(amax & -65536, EMAX, RCEIL)
    col_lo = _rows_as_words(tl.reshape(lo, (S, 8, H, 4, 32)) * tl.expand_dims(tl.expand_dims(factor_lo, 1), 3),
                            MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, EMULATE_RNE)
    col_hi = _rows_as_words(tl.reshape(hi, (S, 8, H, 4, 32)) * tl.expand_dims(tl.expand_dims(factor_hi, 1), 3),
                            MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, EMULATE_RNE)
    # [s, a % 8, h, p, even / odd] -> [column, word]: column 64h + 2p + odd, word 8s + a % 8.
    words = tl.reshape(tl.permute(tl.join(col_lo, col_hi), (2, 3, 4, 0, 1)), (BLOCK_K, BLOCK_M // 4))
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
    offs_w = pid_m * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)[None, :]
    _store(col_data_ptr + offs_k * (M // 4) + offs_w, words, (offs_k < K) & (offs_w < M // 4), EVEN)
    scale = tl.reshape(tl.permute(tl.join(scale_lo, scale_hi), (1, 2, 3, 0)), (BLOCK_K, S))
    offs_mb = pid_m * S + tl.arange(0, S)[None, :]
    if BLOCKED_SCALES:
        _store_scale_tile(col_scale_ptr, scale, pid_k, pid_m, M // 32)
    else:
        _store(col_scale_ptr + offs_k * (M // 32) + offs_mb, scale, (offs_k < K) & (offs_mb < M // 32), EVEN)


@triton.jit
def _rows_as_words(q, MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr,
                   E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """FP8 words of `q` [s, a, h, j, p] along j (in-thread): byte j from row j. The axis moves last and
    splits into its four rows (no data moves)."""
    q = tl.permute(q, (0, 1, 2, 4, 3))
    q_even, q_odd = tl.split(tl.reshape(q, (q.shape[0], q.shape[1], q.shape[2], q.shape[3], 2, 2)))
    q0, q2 = tl.split(q_even)
    q1, q3 = tl.split(q_odd)
    return encode_fp8_words(q0, q1, q2, q3, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, EMULATE_RNE)


@triton.jit
def _mx_quantize_kernel(
    x_ptr, row_data_ptr, row_scale_ptr, col_data_ptr, col_scale_ptr,
    M, K, stride_xm,
    ROWWISE: tl.constexpr, COLWISE: tl.constexpr, IS_BF16: tl.constexpr,
    EMAX: tl.constexpr, RCEIL: tl.constexpr, MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr,
    MIN_NORMAL_EXP: tl.constexpr, E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROW_GROUP: tl.constexpr, INDEX_64: tl.constexpr,
    EVEN: tl.constexpr, GROUP_M: tl.constexpr, U16X2: tl.constexpr, PAIRED: tl.constexpr = False,
    BLOCKED_SCALES: tl.constexpr = False,
):
    """One read of an x tile [BLOCK_M, BLOCK_K]; row-wise and / or column-wise outputs. EVEN: the
    tile divides the input, so no loads or stores need masks (their predicates cost instructions).
    U16X2: the GPU has max.u16x2 (sm_90). EMULATE_RNE: interpreting (see the module docstring).
    PAIRED: `_quantize_both_paired` moves the data instead (its docstring), the rest is the general path.
    BLOCKED_SCALES: both scale arrays in cuBLAS's blocked layout (`_store_scale_tile`; 128 x 128 tiles only).

    Column-wise, tile row t = s * 4G + j * G + a (G = ROW_GROUP, j < 4, a < G) holds x row
    m0 + s * 4G + 4a + j. With G the rows one pass of the CTA's threads covers (see
    `_row_group`), the tile's repetitions put rows 4a .. 4a + 3 of a column in one thread, so
    the 32-row amax starts in registers, and their 4 FP8 bytes pack into one int32 of the [K, M]
    output: the on-chip transpose moves words instead of bytes, and the store is 16-byte vectors
    along M. Correctness does not depend on the layout, only the speed.
    """
    # Tile order (grid axis 0 runs first): groups of GROUP_M row bands, walked one column of GROUP_M
    # tiles after another (GROUP_M = 1: a row band's tiles in a row). See `_config`.
    pid_m = program_id(1, INDEX_64) * GROUP_M + program_id(0, INDEX_64) % GROUP_M
    pid_k = program_id(0, INDEX_64) // GROUP_M
    if GROUP_M > 1 and pid_m >= tl.cdiv(M, BLOCK_M):  # past the last row band (a shorter last group)
        return
    if PAIRED:  # both layouts of bfloat16 input (`paired_applies`)
        _quantize_both_paired(x_ptr, row_data_ptr, row_scale_ptr, col_data_ptr, col_scale_ptr, M, K, stride_xm,
                              pid_m, pid_k, EMAX, RCEIL, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2,
                              EMULATE_RNE, BLOCK_M, BLOCK_K, EVEN, U16X2, BLOCKED_SCALES)
        return
    t = tl.arange(0, BLOCK_M)
    m0 = pid_m * BLOCK_M
    if COLWISE:
        offs_m = m0 + (t // (4 * ROW_GROUP)) * (4 * ROW_GROUP) + 4 * (t % ROW_GROUP) + (t // ROW_GROUP) % 4
    else:
        offs_m = m0 + t
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    if EVEN:
        raw = tl.load(x_ptrs)
    else:
        raw = tl.load(x_ptrs, mask=mask, other=0)
    x = _widen(raw, IS_BF16, EMULATE_RNE)
    # bfloat16: magnitudes in pairs (16 bits each), P = 2 values per int32 word
    P: tl.constexpr = 2 if IS_BF16 else 1
    mag = _magnitude_pairs(raw, EMULATE_RNE) if IS_BF16 else _magnitude_bits(x)

    if ROWWISE:
        xr = tl.reshape(x, (BLOCK_M, BLOCK_K // 32, 32))
        amax = _block_max(tl.reshape(mag, (BLOCK_M, BLOCK_K // 32, 32 // P)), 2, IS_BF16, U16X2)
        if IS_BF16:  # the larger half, as the float32 bits of a bfloat16
            amax = tl.maximum(amax & 0xFFFF, amax >> 16) << 16
        factor, scale = _block_scale(amax, EMAX, RCEIL)
        elems = encode_fp8_satfinite(xr * factor[:, :, None], MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2,
                                     EMULATE_RNE)
        _store(row_data_ptr + offs_m[:, None] * K + offs_k[None, :], tl.reshape(elems, (BLOCK_M, BLOCK_K)),
               mask, EVEN)
        offs_kb = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
        if BLOCKED_SCALES and COLWISE:  # tile rows back in order: t = s * 4G + j * G + a is row s * 4G + 4a + j
            scale = tl.reshape(tl.permute(tl.reshape(scale, (BLOCK_M // (4 * ROW_GROUP), 4, ROW_GROUP, 4)),
                                          (0, 2, 1, 3)), (BLOCK_M, 4))
        if BLOCKED_SCALES:
            _store_scale_tile(row_scale_ptr, scale, pid_m, pid_k, K // 32)
        else:
            _store(row_scale_ptr + offs_m[:, None] * (K // 32) + offs_kb[None, :], scale,
                   (offs_m[:, None] < M) & (offs_kb[None, :] < K // 32), EVEN)

    if COLWISE:
        # [s, j, a // 8, a % 8, k]: a block of 32 rows is (j, a % 8) at fixed (s, a // 8).
        xc = tl.reshape(x, (BLOCK_M // (4 * ROW_GROUP), 4, ROW_GROUP // 8, 8, BLOCK_K))
        amax = tl.reshape(mag, (BLOCK_M // (4 * ROW_GROUP), 4, ROW_GROUP // 8, 8, BLOCK_K // P))
        amax = _block_max(_block_max(amax, 1, IS_BF16, U16X2), 2, IS_BF16, U16X2)  # in-thread axis first
        if IS_BF16:  # the two columns of each word, as float32 bits of bfloat16s
            amax = tl.reshape(tl.join(amax << 16, amax & -65536), (BLOCK_M // (4 * ROW_GROUP), ROW_GROUP // 8, BLOCK_K))
        factor, scale = _block_scale(amax, EMAX, RCEIL)
        # Expanded in the reverse order of the reductions, so the layouts match without a convert.
        q = xc * tl.expand_dims(tl.expand_dims(factor, 2), 1)
        # The in-thread axis j moved last and split into its four rows (no data moves).
        q_even, q_odd = tl.split(tl.reshape(tl.permute(q, (0, 2, 3, 4, 1)),
                                            (BLOCK_M // (4 * ROW_GROUP), ROW_GROUP // 8, 8, BLOCK_K, 2, 2)))
        q0, q2 = tl.split(q_even)
        q1, q3 = tl.split(q_odd)
        words = tl.reshape(encode_fp8_words(q0, q1, q2, q3, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2,
                                            EMULATE_RNE), (BLOCK_M // 4, BLOCK_K))
        offs_w = m0 // 4 + tl.arange(0, BLOCK_M // 4)
        _store(col_data_ptr + offs_k[:, None] * (M // 4) + offs_w[None, :], tl.trans(words),
               (offs_k[:, None] < K) & (offs_w[None, :] < M // 4), EVEN)
        scale = tl.reshape(scale, (BLOCK_M // 32, BLOCK_K))
        offs_mb = pid_m * (BLOCK_M // 32) + tl.arange(0, BLOCK_M // 32)
        if BLOCKED_SCALES:
            _store_scale_tile(col_scale_ptr, tl.trans(scale), pid_k, pid_m, M // 32)
        else:
            _store(col_scale_ptr + offs_k[:, None] * (M // 32) + offs_mb[None, :], tl.trans(scale),
                   (offs_k[:, None] < K) & (offs_mb[None, :] < M // 32), EVEN)


@triton.jit
def _mx_dequantize_kernel(
    data_ptr, scale_ptr, out_ptr, R, K,
    E5M2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, INDEX_64: tl.constexpr,
):
    offs_r = program_id(0, INDEX_64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = program_id(1, INDEX_64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
    elems = decode_fp8(tl.load(data_ptr + offs_r[:, None] * K + offs_k[None, :], mask=mask, other=0), E5M2)
    offs_kb = program_id(1, INDEX_64) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    sbytes = tl.load(scale_ptr + offs_r[:, None] * (K // 32) + offs_kb[None, :],
                     mask=(offs_r[:, None] < R) & (offs_kb[None, :] < K // 32), other=127).to(tl.int32)
    # 2**(b - 127); b = 0 is the float32 subnormal 2**-127; b = 255 is NaN.
    sbits = tl.where(sbytes == 0, 1 << 22, sbytes << 23)
    scale = tl.where(sbytes == 255, float("nan"), sbits.to(tl.float32, bitcast=True))
    out = tl.reshape(elems, (BLOCK_R, BLOCK_K // 32, 32)) * scale[:, :, None]
    tl.store(out_ptr + offs_r[:, None] * K + offs_k[None, :], tl.reshape(out, (BLOCK_R, BLOCK_K)), mask=mask)


def _row_group(block_m: int, block_k: int, num_warps: int) -> int:
    """ROW_GROUP for a tile: the rows one pass of the CTA covers in the layout Triton gives it
    (16 elements per thread along K, for 16-byte FP8 stores; lanes fill BLOCK_K first, warps
    stack along M), kept within [8, BLOCK_M / 4] so the tile still splits as the kernel needs."""
    lanes_m = 32 // min(block_k // 16, 32)
    return max(8, min(lanes_m * num_warps, block_m // 4))


def _config(block_m: int, block_k: int, num_warps: int, maxnreg: int | None = None,
            group_m: int = 1, paired: bool = False) -> triton.Config:
    """GROUP_M: row bands per group of the tile order. 1 (K-major) runs a row band's tiles one after
    another: its input rows, row-wise output lines and row scale sectors (32 bytes: 1024 / BLOCK_K
    tiles) fill in quick succession. A column scale sector spans 1024 / BLOCK_M row bands; with
    GROUP_M that large its tiles run together too, where K-major leaves the sector's eight 4-byte
    pieces (BLOCK_M 128) in L2 for 8 * K / BLOCK_K programs, long enough to be written back
    partial (a read-modify-write in DRAM); and each [K, M] output row gets written in runs of
    GROUP_M * BLOCK_M bytes instead of BLOCK_M. `paired`: `_quantize_both_paired`'s data path (BLOCK_M
    and BLOCK_K multiples of 32 and 64), where it applies (`paired_applies`)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_K": block_k, "GROUP_M": group_m,
                          "ROW_GROUP": _row_group(block_m, block_k, num_warps), "PAIRED": paired},
                         num_warps=num_warps, num_stages=1, maxnreg=maxnreg)


def config_tiles(config: triton.Config) -> dict:
    """A config as `launch_quantize`'s `tiles` (the same build: register limit included)."""
    tiles = {key: config.kwargs[key] for key in ("BLOCK_M", "BLOCK_K", "GROUP_M", "PAIRED")}
    tiles["num_warps"] = config.num_warps
    if config.maxnreg is not None:
        tiles["maxnreg"] = config.maxnreg
    return tiles


def _is_blocked_tile(tiles: dict) -> bool:
    return (tiles["BLOCK_M"], tiles["BLOCK_K"]) == BLOCKED_TILE


def _sector_group(block_m: int) -> int:
    """Row bands whose column scale bytes (BLOCK_M / 32 each) fill one 32-byte sector."""
    return max(1, 1024 // block_m)


# Blocked scales: a tile's scales must be one whole 128 x 4 scale tile per layout (`_store_scale_tile`).
BLOCKED_TILE = (SCALE_TILE_ROWS, SCALE_TILE_COLS * BLOCK)
BLOCKED_ROW_CONFIG = _config(*BLOCKED_TILE, 8)

if INTERPRETING:  # the interpreter runs on the CPU: one small tile (edge masks get exercised), no tuning
    ROW_CONFIG = _config(32, 64, 4)
    BOTH_CONFIGS = [ROW_CONFIG]
    BLOCKED_CONFIGS = [BLOCKED_ROW_CONFIG]  # one config is never pruned: the general path, valid for all input
else:
    ROW_CONFIG = _config(128, 128, 8)
    # Hopper candidates for the one-pass kernel (sm_90 builds, `benchmarks/quant.py --compile-only
    # 90 --sass`), K-major, about 100 registers (2 CTAs of 8 warps per SM), no spills. The paired
    # data path first: 128x128 is fp8_block's both-layout block (91% of copy there); 256x64 and
    # 128x64 keep each warp on whole 64-column rows, which lets the word transpose use stmatrix.
    # Last the general path's tile that won before (83% of copy). Without bfloat16 both-layout
    # input the paired tiles run the general path (`_fit_groups`). The paired 128x128's register
    # limit: see BLOCKED_CONFIGS (without it ptxas issues 2 of its 8 loads late, with it none).
    BOTH_CONFIGS = [_config(128, 128, 8, 104, paired=True), _config(256, 64, 8, paired=True),
                    _config(128, 64, 4, paired=True), _config(128, 128, 8)]
    # Blocked scales: the same two 128x128 tiles with a register limit. Left to itself ptxas builds
    # both with about 98 registers and issues the last 2 of a thread's 8 16-byte loads only after
    # the first use of the first one's data: a second DRAM round trip per program, which with one
    # tile per program and 2 programs an SM leaves the reads half covered (75% of copy on the H200
    # where the same bytes moved without the arithmetic, every load issued first, reach 92%). With
    # these limits every load is issued first, for each element format and scale mode, at 2 CTAs
    # an SM still and no spills (`benchmarks/quant.py --compile-only 90`: "late LDG 0/8").
    BLOCKED_CONFIGS = [_config(128, 128, 8, 104, paired=True), _config(128, 128, 8, 112)]

_MAX_GRID_Y = 65535


def _fitted_group(m: int, tiles: dict) -> int:
    """GROUP_M, doubled as often as the grid's second axis (row band groups) needs to stay within
    CUDA's limit (only for inputs of millions of rows)."""
    group, n_m = tiles["GROUP_M"], triton.cdiv(m, tiles["BLOCK_M"])
    while triton.cdiv(n_m, group) > _MAX_GRID_Y:
        group *= 2
    return group


def paired_applies(rowwise: bool, colwise: bool, is_bf16: bool) -> bool:
    """`_quantize_both_paired` writes both layouts of bfloat16 input (read as int32 pairs)."""
    return rowwise and colwise and is_bf16


def _fit_groups(configs, named_args, **flags):
    """The autotune candidates for this launch: each GROUP_M fitted to the shape's grid, and the
    paired tiles on the general path where the paired one does not apply (duplicates dropped)."""
    paired = paired_applies(flags["ROWWISE"], flags["COLWISE"], flags["IS_BF16"])
    fitted = []
    for config in configs:
        kwargs = dict(config.kwargs, GROUP_M=_fitted_group(named_args["M"], config.kwargs),
                      PAIRED=config.kwargs["PAIRED"] and paired)
        # a paired tile's register limit is set for the paired build: the general one goes without
        maxnreg = config.maxnreg if kwargs["PAIRED"] == config.kwargs["PAIRED"] else None
        if any(kwargs == c.kwargs and (config.num_warps, maxnreg) == (c.num_warps, c.maxnreg) for c in fitted):
            continue
        fitted.append(config if (kwargs, maxnreg) == (config.kwargs, config.maxnreg) else
                      triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
                                    maxnreg=maxnreg))
    return fitted


def _grid(m: int, k: int, tiles: dict) -> tuple[int, int]:
    group = tiles["GROUP_M"]
    return group * triton.cdiv(k, tiles["BLOCK_K"]), triton.cdiv(triton.cdiv(m, tiles["BLOCK_M"]), group)


_mx_quantize_even = triton.heuristics(
    {"EVEN": lambda args: args["M"] % args["BLOCK_M"] == 0 and args["K"] % args["BLOCK_K"] == 0})(_mx_quantize_kernel)
# Weights are what both layouts get made of, so (M, K) repeat: tune once per shape and scale layout.
_mx_quantize_tuned = {
    layout: triton.autotune(configs=configs, key=["M", "K", "ROWWISE", "IS_BF16"],
                            prune_configs_by={"early_config_prune": _fit_groups})(_mx_quantize_even)
    for layout, configs in (("plain", BOTH_CONFIGS), ("blocked", BLOCKED_CONFIGS))}


def _format_args(elem: str, scale_mode: str) -> dict:
    fmt = element_format(elem)
    check_scale_mode(scale_mode)
    return {
        "EMAX": fmt.emax, "RCEIL": scale_mode == "rceil", "MAX_NORMAL": fmt.max_normal,
        "MANTISSA_BITS": fmt.mantissa_bits, "MIN_NORMAL_EXP": fmt.min_normal_exp,
        "E5M2": elem == "e5m2", "EMULATE_RNE": INTERPRETING,
    }


def empty_outputs(m: int, k: int, rowwise: bool, colwise: bool, elem: str, device, scale_layout: str = "plain") -> dict:
    """Output buffers as uint8: row data [M, K], row scale [M, K/32]; col data [K, M], col scale [K, M/32];
    blocked scales flat, as `blocked.to_blocked` returns them."""
    def scale(rows, cols):
        if scale_layout == "blocked":
            return torch.empty(blocked_numel(rows, cols), dtype=torch.uint8, device=device)
        return torch.empty(rows, cols, dtype=torch.uint8, device=device)

    out = {}
    if rowwise:
        out["row_data"] = torch.empty(m, k, dtype=torch.uint8, device=device)
        out["row_scale"] = scale(m, k // BLOCK)
    if colwise:
        out["col_data"] = torch.empty(k, m, dtype=torch.uint8, device=device)
        out["col_scale"] = scale(k, m // BLOCK)
    return out


def has_u16x2_max(device: torch.device) -> bool:
    """max.u16x2 (the paired block maxima) needs sm_90; FP8 conversion itself runs from sm_89."""
    return not INTERPRETING and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def launch_quantize(x: torch.Tensor, outputs: dict, elem: str, scale_mode: str, tiles: dict | None = None,
                    scale_layout: str = "plain") -> None:
    """Run the kernel on 2-D `x` [M, K] (unit stride along K), writing the layouts in `outputs`
    (`empty_outputs` with the same `scale_layout`). Both layouts: the autotuned configs; row-wise
    only: `ROW_CONFIG` (`BLOCKED_ROW_CONFIG` for blocked scales). `tiles` (BLOCK_M, BLOCK_K: powers of
    two >= 32, 128 x 128 for blocked scales; num_warps; optional GROUP_M tile order, default 1; optional
    PAIRED, default False, for BLOCK_K >= 64 and both layouts of bfloat16; optional maxnreg, ptxas's register
    limit; `config_tiles` of a config) forces one tile instead, for tuning by hand."""
    m, k = x.shape
    rowwise, colwise = "row_data" in outputs, "col_data" in outputs
    paired = paired_applies(rowwise, colwise, x.dtype == torch.bfloat16)
    check_scale_layout(scale_layout, x.ndim)
    blocked = scale_layout == "blocked"
    if tiles is not None and blocked and not _is_blocked_tile(tiles):
        raise ValueError(f"blocked scales need {BLOCKED_TILE[0]}x{BLOCKED_TILE[1]} tiles (one whole 128 x 4 scale "
                         f"tile per layout), got {tiles['BLOCK_M']}x{tiles['BLOCK_K']}")
    if tiles is not None and tiles.get("PAIRED") and not (paired and tiles["BLOCK_K"] >= 64):
        raise ValueError(f"PAIRED tiles need both layouts of bfloat16 input and BLOCK_K >= 64, got {x.dtype}, "
                         f"rowwise={rowwise}, colwise={colwise}, BLOCK_K={tiles['BLOCK_K']}")
    if paired and (x.stride(0) % 2 or x.data_ptr() % 4):  # the paired path reads int32 pairs
        x = x.clone(memory_format=torch.contiguous_format)
    col_data = outputs.get("col_data")
    args = (kernel_input(x), outputs.get("row_data"), outputs.get("row_scale"),
            None if col_data is None else col_data.view(torch.int32),  # written 4 rows (bytes) at a time
            outputs.get("col_scale"), m, k, x.stride(0))
    flags = dict(ROWWISE=rowwise, COLWISE=colwise, IS_BF16=x.dtype == torch.bfloat16, INDEX_64=needs_index_64(x),
                 U16X2=has_u16x2_max(x.device), BLOCKED_SCALES=blocked, **_format_args(elem, scale_mode))
    if tiles is None and colwise:
        _mx_quantize_tuned[scale_layout][lambda meta: _grid(m, k, meta)](*args, **flags)
        return
    if tiles is None:
        row_config = BLOCKED_ROW_CONFIG if blocked else ROW_CONFIG
        tiles = dict(row_config.kwargs, num_warps=row_config.num_warps)
    else:
        tiles = dict(tiles, ROW_GROUP=_row_group(tiles["BLOCK_M"], tiles["BLOCK_K"], tiles["num_warps"]),
                     GROUP_M=tiles.get("GROUP_M", 1), PAIRED=tiles.get("PAIRED", False))
    tiles["GROUP_M"] = _fitted_group(m, tiles)
    grid = _grid(m, k, tiles)
    _mx_quantize_even[grid](*args, **flags, **tiles)


def _fp8(t: torch.Tensor, elem: str) -> torch.Tensor:
    return t.view(element_format(elem).dtype)


def _unit_stride_2d(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _mx_tensor(data: torch.Tensor, scale: torch.Tensor, axis: int, elem: str, scale_mode: str, scale_layout: str):
    """A 2-D layout's output buffers as the API returns them; column-wise ones (axis 0) are stored
    transposed, and so are their plain scales."""
    data, scale = _fp8(data, elem), scale.view(E8M0_DTYPE)
    if axis == 0:
        data = data.t()
    if scale_layout == "blocked":
        return MXBlockedTensor(data, scale, axis, elem, scale_mode)
    return MXTensor(data, scale.t() if axis == 0 else scale, axis, elem, scale_mode)


def quantize_both(x: torch.Tensor, elem: str = "e4m3", scale_mode: str = "floor", scale_layout: str = "plain"):
    """One pass over 2-D `x` [M, K]: (row-wise tensor, axis 1; column-wise tensor, axis 0), MXTensors,
    or MXBlockedTensors for `scale_layout="blocked"`."""
    check_input(x)
    if x.ndim != 2:
        raise ValueError(f"quantize_both takes a 2-D tensor, got shape {tuple(x.shape)}")
    check_divisible(x.shape[0], BLOCK, "axis 0")
    check_divisible(x.shape[1], BLOCK, "axis 1")
    check_scale_layout(scale_layout, x.ndim)
    x = _unit_stride_2d(x)
    out = empty_outputs(*x.shape, True, True, elem, x.device, scale_layout)
    launch_quantize(x, out, elem, scale_mode, scale_layout=scale_layout)
    return (_mx_tensor(out["row_data"], out["row_scale"], 1, elem, scale_mode, scale_layout),
            _mx_tensor(out["col_data"], out["col_scale"], 0, elem, scale_mode, scale_layout))


def quantize(x: torch.Tensor, axis: int = -1, elem: str = "e4m3", scale_mode: str = "floor",
             scale_layout: str = "plain") -> MXTensor | MXBlockedTensor:
    check_input(x)
    axis = normalize_axis(axis, x.ndim)
    check_divisible(x.shape[axis], BLOCK, f"axis {axis}")
    check_scale_layout(scale_layout, x.ndim)
    if x.ndim == 2 and axis == 0:  # read in place, write transposed
        x = _unit_stride_2d(x)
        out = empty_outputs(*x.shape, False, True, elem, x.device, scale_layout)
        launch_quantize(x, out, elem, scale_mode, scale_layout=scale_layout)
        return _mx_tensor(out["col_data"], out["col_scale"], 0, elem, scale_mode, scale_layout)
    moved = x.movedim(axis, -1)
    x2 = _unit_stride_2d(moved.reshape(-1, moved.shape[-1]))
    out = empty_outputs(*x2.shape, True, False, elem, x.device, scale_layout)
    launch_quantize(x2, out, elem, scale_mode, scale_layout=scale_layout)
    if scale_layout == "blocked":  # 2-D x, axis 1
        return _mx_tensor(out["row_data"], out["row_scale"], 1, elem, scale_mode, scale_layout)
    data = _fp8(out["row_data"], elem).reshape(moved.shape).movedim(-1, axis)
    scale = out["row_scale"].view(E8M0_DTYPE).reshape(*moved.shape[:-1], -1).movedim(-1, axis)
    return MXTensor(data, scale, axis, elem, scale_mode)


def dequantize(t: MXTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode in float32 (exact: an FP8 value times a power of two), then cast to `dtype`."""
    data = t.data.movedim(t.axis, -1)
    k = data.shape[-1]
    data2 = as_bytes(data.reshape(-1, k).contiguous())
    scale2 = as_bytes(t.scale.movedim(t.axis, -1).reshape(-1, k // t.block).contiguous())
    out = torch.empty(data2.shape, dtype=torch.float32, device=data.device)
    block_r, block_k, warps = (32, 64, 4) if INTERPRETING else (128, 128, 4)
    grid = (triton.cdiv(data2.shape[0], block_r), triton.cdiv(k, block_k))
    _mx_dequantize_kernel[grid](data2, scale2, out, data2.shape[0], k, E5M2=t.elem == "e5m2",
                                BLOCK_R=block_r, BLOCK_K=block_k, INDEX_64=needs_index_64(data2), num_warps=warps)
    return out.reshape(data.shape).movedim(-1, t.axis).to(dtype)
