"""Triton helpers shared by the quantization kernels: exact loads, FP8 encode / decode.

The Triton interpreter (TRITON_INTERPRET=1, how kernels run in CPU tests) converts floats with
its own bit arithmetic, which truncates instead of rounding to nearest-even and mishandles
subnormals and the FP8 special values. So that interpreted kernels stay bit-exact, every
conversion whose result could differ goes through the helpers here: bfloat16 is widened by a
bit shift, FP8 encoding first rounds in float32 arithmetic when EMULATE_RNE is set (then the
cast itself is exact), and FP8 decoding patches NaN / Inf. On a GPU the hardware cast
(cvt.rn.satfinite) already rounds to nearest-even, so kernels pass EMULATE_RNE=INTERPRETING.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Decided once, like triton.jit itself decides at decoration time whether to interpret.
INTERPRETING: bool = bool(triton.knobs.runtime.interpret)


def needs_index_64(x: torch.Tensor) -> bool:
    """Element offsets into ``x`` (and outputs of its size) can pass int32. A view is read through
    its strides, so its last element's offset counts, not only its size (a column slice of a large
    tensor reaches past its numel)."""
    last_offset = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride(), strict=True))
    return max(x.numel(), last_offset + 1) >= 2**31


@triton.jit
def program_id(axis: tl.constexpr, INDEX_64: tl.constexpr):
    """This program's index along ``axis``, widened to int64 when offsets can pass 2^31
    (``needs_index_64``; int32 address arithmetic is cheaper, so only then)."""
    pid = tl.program_id(axis)
    if INDEX_64:
        pid = pid.to(tl.int64)
    return pid


@triton.jit
def to_float32(raw, IS_BF16: tl.constexpr):
    """Exact widening of loaded values; with IS_BF16 `raw` holds bfloat16 bits as int16."""
    if IS_BF16:
        return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


@triton.jit
def load_as_float32(ptrs, mask, IS_BF16: tl.constexpr):
    """Masked-out lanes read 0. With IS_BF16 `ptrs` point at int16 bits (see `kernel_input`)."""
    return to_float32(tl.load(ptrs, mask=mask, other=0), IS_BF16)


@triton.jit
def round_to_fp8_grid(q, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr):
    """Round finite float32 `q` (|q| <= max normal) to the nearest FP8 value, ties to even."""
    bits = q.to(tl.int32, bitcast=True)
    mag = tl.abs(q)
    exp = ((bits >> 23) & 0xFF) - 127
    spacing_exp = tl.maximum(exp, MIN_NORMAL_EXP) - MANTISSA_BITS
    # Adding 2**(spacing_exp + 23) puts the grid spacing at the float32 ulp, so the float32 add
    # rounds to the FP8 grid (nearest-even); subtracting it back is exact.
    shift = ((spacing_exp + 23 + 127) << 23).to(tl.float32, bitcast=True)
    rounded = (mag + shift) - shift
    sign = bits & -2147483648  # 0x80000000 (kept so -0 and tiny negatives stay negative)
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def encode_fp8(q, MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr,
               E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """Saturating round-to-nearest-even float32 -> FP8, returned as uint8 bytes."""
    q = tl.minimum(tl.maximum(q, -MAX_NORMAL), MAX_NORMAL)
    if EMULATE_RNE:
        q = round_to_fp8_grid(q, MANTISSA_BITS, MIN_NORMAL_EXP)
    if E5M2:
        return q.to(tl.float8e5).to(tl.uint8, bitcast=True)
    else:
        return q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def encode_fp8_satfinite(q, MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr,
                         MIN_NORMAL_EXP: tl.constexpr, E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """FP8 bytes of block-scaled values `q`, saturating (cvt.rn.satfinite on the GPU, so no clamp); NaN
    encodes as 0x7F, so a non-finite block can be marked by a NaN scale factor instead of a select
    per byte."""
    if EMULATE_RNE:  # the interpreter's casts do not know NaN
        elems = encode_fp8(q, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, EMULATE_RNE)
        return tl.where(q != q, 0x7F, elems).to(tl.uint8)
    elif E5M2:
        return q.to(tl.float8e5).to(tl.uint8, bitcast=True)
    else:
        return q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def encode_fp8_words(q0, q1, q2, q3, MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr,
                     MIN_NORMAL_EXP: tl.constexpr, E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """The FP8 bytes of four `encode_fp8_satfinite` inputs as int32 words, byte j from `qj`
    (little-endian).

    On the GPU two cvt.rn.satfinite x2 instructions write the word directly; through Triton's casts
    the bytes would come out paired along the tensors' last axis and need shifting back into words.
    """
    if EMULATE_RNE:
        word = encode_fp8_satfinite(q0, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, True).to(tl.int32)
        word |= encode_fp8_satfinite(q1, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, True).to(tl.int32) << 8
        word |= encode_fp8_satfinite(q2, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, True).to(tl.int32) << 16
        return word | (encode_fp8_satfinite(q3, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, True).to(tl.int32)
                       << 24)
    elif E5M2:  # cvt puts its first source in the high byte
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi;\n cvt.rn.satfinite.e5m2x2.f32 lo, $2, $1;\n"
            " cvt.rn.satfinite.e5m2x2.f32 hi, $4, $3;\n mov.b32 $0, {lo, hi}; }",
            "=r,f,f,f,f", [q0, q1, q2, q3], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi;\n cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
            " cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n mov.b32 $0, {lo, hi}; }",
            "=r,f,f,f,f", [q0, q1, q2, q3], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def decode_fp8(b, E5M2: tl.constexpr):
    """FP8 bytes (uint8) -> float32, NaN and Inf included."""
    mag = b & 0x7F
    nan = tl.full(b.shape, float("nan"), tl.float32)
    if E5M2:
        x = b.to(tl.float8e5, bitcast=True).to(tl.float32)
        inf = tl.where(b >= 0x80, -float("inf"), float("inf"))
        x = tl.where(mag == 0x7C, inf, x)
        return tl.where(mag > 0x7C, nan, x)
    else:
        x = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return tl.where(mag == 0x7F, nan, x)


def kernel_input(x: torch.Tensor) -> torch.Tensor:
    """bfloat16 goes to kernels as its int16 bits, widened exactly by `load_as_float32`."""
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """FP8 / E8M0 tensors go to kernels as uint8 (the interpreter stores FP8 as bytes anyway)."""
    return t.view(torch.uint8)
