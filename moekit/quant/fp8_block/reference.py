"""FP8 block-scaled quantization (DeepSeek-V3 style) in plain PyTorch: the definition.

Per tile of `block` = (rows, cols) values of the last two dims ((1, 128) for activations,
(128, 128) for weights):

    scale = max(amax / max_normal, 2**-126)       float32, correctly rounded division
    P_i   = saturate_rne(V_i * (1 / scale))       1 / scale correctly rounded, once per tile
    decode: P_i * scale

The floor of 2**-126 (the smallest normal float32) keeps all-zero and vanishingly small tiles
finite (instead of 0 / 0) and keeps scales out of the subnormal range, where GPUs may flush to
zero. A tile holding NaN or +-Inf gets a NaN scale and every element byte 0x7F (NaN), so it
decodes to all NaN, as in `moekit.quant.mxfp8`.

Error bound (finite input, tile amax >= max_normal * 2**-126): each decoded element y_i satisfies
|y_i - V_i| <= 2**-(mantissa_bits + 1) * |V_i| * (1 + 2**-22) + scale * 2**(min_normal_exp - mantissa_bits - 1)
(relative rounding of the element, the two float32 roundings of the scale, and half the
subnormal spacing); nothing saturates beyond rounding since |V_i| / scale <= max_normal up to
a float32 ulp.
"""

from __future__ import annotations

import math

import torch

from moekit.quant.formats import check_divisible, check_input, element_format
from moekit.quant.tensors import BlockScaledTensor

ACTIVATION_BLOCK = (1, 128)
WEIGHT_BLOCK = (128, 128)
MIN_SCALE = 2.0**-126


def check_block(x: torch.Tensor, block: tuple[int, int]) -> tuple[int, int]:
    """Validate `block` against `x` [..., M, K]; returns it as a tuple of two positive ints."""
    if len(block) != 2 or any(not isinstance(b, int) or b <= 0 for b in block):
        raise ValueError(f"block must be two positive ints (rows, cols), got {block!r}")
    if x.ndim < 2:
        raise ValueError(f"block-scaled quantization takes a tensor [..., M, K], got shape {tuple(x.shape)}")
    check_divisible(x.shape[-2], block[0], "dim -2")
    check_divisible(x.shape[-1], block[1], "dim -1")
    return tuple(block)


def quantize(x: torch.Tensor, block: tuple[int, int] = ACTIVATION_BLOCK, elem: str = "e4m3") -> BlockScaledTensor:
    check_input(x)
    fmt = element_format(elem)
    br, bc = check_block(x, block)
    *lead, m, k = x.shape
    # math.prod, not -1: an empty x (no tokens) has no size to infer
    tiles = x.float().reshape(math.prod(lead), m // br, br, k // bc, bc)
    mag = tiles.abs()
    finite = mag < float("inf")  # False for NaN too
    amax = torch.where(finite, mag, torch.zeros_like(mag)).amax(dim=(2, 4))
    nonfinite = ~finite.all(dim=4).all(dim=2)
    # A tensor divisor: CUDA turns division by a Python scalar into a multiply by its reciprocal.
    scale = torch.div(amax, torch.full_like(amax, fmt.max_normal)).clamp_min(MIN_SCALE)
    scaled = tiles * torch.reciprocal(scale)[:, :, None, :, None]
    elems = scaled.clamp(-fmt.max_normal, fmt.max_normal).to(fmt.dtype).view(torch.uint8)
    elems = torch.where(nonfinite[:, :, None, :, None], torch.full_like(elems, fmt.nan_byte), elems)
    scale = torch.where(nonfinite, torch.full_like(scale, float("nan")), scale)
    return BlockScaledTensor(elems.reshape(x.shape).view(fmt.dtype), scale.reshape(*lead, m // br, k // bc),
                             (br, bc), elem)


def quantize_both(x: torch.Tensor, block: tuple[int, int], elem: str = "e4m3"):
    """(quantize(x), quantize of x^T): with a square block the second is the first transposed."""
    t = quantize(x, block, elem)
    return t, BlockScaledTensor(t.data.transpose(-1, -2).contiguous(), t.scale.transpose(-1, -2).contiguous(),
                                t.block, elem)


def dequantize(t: BlockScaledTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    br, bc = t.block
    *lead, m, k = t.data.shape
    tiles = t.data.float().reshape(math.prod(lead), m // br, br, k // bc, bc)
    scale = t.scale.reshape(math.prod(lead), m // br, k // bc)
    return (tiles * scale[:, :, None, :, None]).reshape(t.data.shape).to(dtype)
