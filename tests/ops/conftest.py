"""``gpu_like_bf16``: the Triton 3.6 interpreter computing bf16 the way an NVIDIA GPU does.

The interpreter keeps bf16 values as raw uint16 bits, so its tl.dot multiplies those integers
(garbage), and its float32 -> bf16 conversions truncate where the GPU rounds to nearest even.
With the fixture, for the test's duration: dots widen bf16 operands to float32 exactly (tensor
cores multiply bf16 exactly and sum in float32), TF32 dots round float32 operands to TF32 (10
mantissa bits, nearest with ties away, like cvt.rna.tf32), and float32 -> bf16 rounds to nearest
even. It lets CI check the kernels' bf16 numerics, which otherwise only the GPU run covers.
"""

import numpy as np
import pytest
import triton.language as tl
from triton._C.libtriton import ir
from triton.runtime import interpreter


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    b = x.astype(np.float32).view(np.uint32)
    rounded = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)  # a NaN's low bits must not carry into inf


def _round_tf32(x: np.ndarray) -> np.ndarray:
    b = x.astype(np.float32).view(np.uint32)
    return ((b + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.fixture
def gpu_like_bf16(monkeypatch):
    builder = interpreter.InterpreterBuilder
    plain_dot, plain_cast, plain_fp_to_fp = builder.create_dot, builder.cast_impl, builder.create_fp_to_fp

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 and b.dtype.scalar == tl.bfloat16:
            widened = [interpreter.TensorHandle(_bf16_to_f32(t.data), tl.float32) for t in (a, b)]
            return plain_dot(self, *widened, d, input_precision, max_num_imprecise_acc)
        if a.dtype.scalar == tl.float32 and input_precision == ir.INPUT_PRECISION.TF32:
            rounded = [interpreter.TensorHandle(_round_tf32(t.data), tl.float32) for t in (a, b)]
            return plain_dot(self, *rounded, d, input_precision, max_num_imprecise_acc)
        return plain_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_f32_to_bf16(src.data), dst_type.scalar)
        return plain_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_f32_to_bf16(src.data), dst_type.scalar)
        return plain_fp_to_fp(self, src, dst_type, rounding_mode)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)
    monkeypatch.setattr(builder, "create_fp_trunc", lambda self, src, dst_type: cast_impl(self, src, dst_type))
    monkeypatch.setattr(builder, "create_fp_to_fp", create_fp_to_fp)
    yield
