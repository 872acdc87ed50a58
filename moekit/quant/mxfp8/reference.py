"""MXFP8 in plain PyTorch: the definition the Triton kernels must match bit for bit.

Per block of 32 values V_i along `axis` (OCP Microscaling spec v1.0, section 6.3):

    amax = max_i |V_i|
    floor: s = floor(log2(amax)) - emax             (the spec's rule; emax = 8 for e4m3, 15 for e5m2)
    rceil: s = ceil(log2(amax / max_normal))        (smallest s with amax / 2**s <= max_normal)
    s is clamped to the E8M0 range [-127, 127]; the scale byte is s + 127
    P_i = saturate_rne(V_i / 2**s)                  (saturating round-to-nearest-even cast)

Both exponents come exactly from the float32 bits of amax (amax = m * 2**e, 1 <= m < 2): floor is
e - emax; rceil adds one when m > 1.75, since max_normal = 1.75 * 2**emax for both element types.
An all-zero block (and any block whose amax is below 2**(emax - 127)) gets the smallest scale,
byte 0x00 = 2**-127, and decodes to its exact elements.

Non-finite input: the spec makes an E8M0 scale of 0xFF mean NaN for the whole block, whatever
its elements, and leaves the conversion of NaN / Inf inputs to the implementation. Here a block
holding any NaN or +-Inf gets scale 0xFF and every element byte 0x7F (NaN in both element types),
so it decodes to all NaN; E4M3 has no Inf and a power-of-two scale cannot carry one either.

Error bound (finite input): each decoded element y_i satisfies

    |y_i - V_i| <= r * |V_i| + 2**(s + min_normal_exp - mantissa_bits - 1)

with r = 2**-(mantissa_bits + 1) for rceil (1/16 for e4m3, 1/8 for e5m2) and r = 1/8 for floor,
whose scale lets values in [max_normal, 2**(emax + 1)) * 2**s saturate to max_normal. The second
term is half the element type's subnormal spacing, times the scale. One exception, rceil within a
few percent of float32's largest value (amax >= about 1.94 * 2**127 for e4m3, 1.875 * 2**127 for
e5m2): an element rounds up to 2**128, which `dequantize` to float32 returns as +-inf.
"""

from __future__ import annotations

import torch

from moekit.quant.formats import (
    E8M0_BIAS,
    E8M0_DTYPE,
    E8M0_MAX_EXP,
    E8M0_MIN_EXP,
    E8M0_NAN,
    ElementFormat,
    check_divisible,
    check_input,
    check_scale_mode,
    e8m0_to_float32,
    element_format,
    normalize_axis,
)
from moekit.quant.mxfp8.blocked import MXBlockedTensor, check_scale_layout, from_plain
from moekit.quant.tensors import MXTensor

BLOCK = 32
_MANTISSA_MASK = (1 << 23) - 1
_MANTISSA_1_75 = 3 << 21  # float32 mantissa bits of 1.75


def shared_exponent(amax: torch.Tensor, fmt: ElementFormat, scale_mode: str) -> torch.Tensor:
    """Unbiased scale exponent s (int32) of blocks with float32 absolute maximum `amax`."""
    bits = amax.view(torch.int32)
    # floor(log2(amax)) for normal amax; zero and subnormals give -127, clamped below either way.
    exp = ((bits >> 23) & 0xFF) - 127
    if scale_mode == "rceil":
        exp = exp + ((bits & _MANTISSA_MASK) > _MANTISSA_1_75).to(torch.int32)
    return (exp - fmt.emax).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def pow2(exp: torch.Tensor) -> torch.Tensor:
    """2**exp as float32 for int32 exp in [-126, 127]: exact, built from the bits."""
    return ((exp + 127) << 23).view(torch.float32)


def quantize_blocks(blocks: torch.Tensor, fmt: ElementFormat, scale_mode: str):
    """Quantize float32 `blocks` [..., 32]: returns (element bytes [..., 32], scale bytes [...]) as uint8."""
    mag = blocks.abs()
    finite = mag < float("inf")  # False for NaN too
    amax = torch.where(finite, mag, torch.zeros_like(mag)).amax(dim=-1)
    nonfinite = ~finite.all(dim=-1)
    exp = shared_exponent(amax, fmt, scale_mode)
    # Exact power-of-two multiply; -exp >= -120 since float32 amax < 2**128.
    scaled = blocks * pow2(-exp)[..., None]
    elems = scaled.clamp(-fmt.max_normal, fmt.max_normal).to(fmt.dtype).view(torch.uint8)
    elems = torch.where(nonfinite[..., None], torch.full_like(elems, fmt.nan_byte), elems)
    scale = torch.where(nonfinite, torch.full_like(exp, E8M0_NAN), exp + E8M0_BIAS).to(torch.uint8)
    return elems, scale


def quantize(x: torch.Tensor, axis: int = -1, elem: str = "e4m3", scale_mode: str = "floor",
             scale_layout: str = "plain") -> MXTensor | MXBlockedTensor:
    """MXFP8-quantize `x` in blocks of 32 along `axis` (whose length must be a multiple of 32);
    `scale_layout="blocked"` (2-D `x`): the scales in cuBLAS's layout (`blocked.py`)."""
    check_input(x)
    fmt = element_format(elem)
    check_scale_mode(scale_mode)
    check_scale_layout(scale_layout, x.ndim)
    axis = normalize_axis(axis, x.ndim)
    check_divisible(x.shape[axis], BLOCK, f"axis {axis}")
    moved = x.movedim(axis, -1)
    blocks = moved.float().reshape(*moved.shape[:-1], moved.shape[-1] // BLOCK, BLOCK)
    elems, scale = quantize_blocks(blocks, fmt, scale_mode)
    data = elems.reshape(moved.shape).view(fmt.dtype).movedim(-1, axis)
    t = MXTensor(data, scale.view(E8M0_DTYPE).movedim(-1, axis), axis, elem, scale_mode)
    return from_plain(t) if scale_layout == "blocked" else t


def quantize_both(x: torch.Tensor, elem: str = "e4m3", scale_mode: str = "floor", scale_layout: str = "plain"):
    """Row-wise (axis 1) and column-wise (axis 0) quantization of a 2-D `x` [M, K]."""
    if x.ndim != 2:
        raise ValueError(f"quantize_both takes a 2-D tensor, got shape {tuple(x.shape)}")
    return quantize(x, 1, elem, scale_mode, scale_layout), quantize(x, 0, elem, scale_mode, scale_layout)


def dequantize(t: MXTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode `t` to `dtype`: element * 2**(scale - 127), NaN where the scale byte is 0xFF."""
    data = t.data.movedim(t.axis, -1)
    scale = e8m0_to_float32(t.scale.movedim(t.axis, -1))
    blocks = data.float().reshape(*data.shape[:-1], scale.shape[-1], t.block)
    out = (blocks * scale[..., None]).reshape(data.shape)
    return out.movedim(-1, t.axis).to(dtype)
