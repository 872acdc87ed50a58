"""The two low-precision recipes of the routed-expert GEMMs, and their quantizers as
(FP8 bytes, float32 scales) pairs, the form the FP8 kernels read (MX operands on GPUs without MX
instructions are held as their values instead: ``Recipe.dequantized``, ``fp8.storage``).

Every GEMM quantizes both operands along its reduction axis, E4M3 elements, FP32 accumulation:

| recipe  | activations (fwd, dgrad) | weights                  | wgrad operands (token axis) | scale           |
| ------- | ------------------------ | ------------------------ | --------------------------- | --------------- |
| "fp8"   | 1 x 128                  | 128 x 128 (both GEMMs)   | 128 x 1                     | amax / 448      |
| "mxfp8" | 1 x 32                   | 1 x 32 along the GEMM's K | 32 x 1                     | E8M0 (floor)    |

"fp8" is DeepSeek-V3's recipe: a 128 x 128 weight tile serves the forward and the dgrad GEMM
(its transpose), so weights are quantized once per step. "mxfp8" follows the OCP MX spec: each
GEMM needs the weight blocked along its own reduction axis, so a weight is quantized twice.

Wgrad operands are blocked along the token axis of each expert's rows: blocks start at the
expert's first row (not at a global multiple of the block), so no block mixes two experts. The
rows of expert e are cut into tiles of `ROW_TILE` = 128 rows; tile i of the whole layout is the
i-th tile when every expert's rows are tiled in expert order (at most cdiv(rows, 128) + E
tiles), and holds 128 / block scale rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.quant import fp8_block, mxfp8
from moekit.quant.formats import e8m0_to_float32

ROW_TILE = 128  # expert-aligned row tile of the kernels; a multiple of every recipe's block
DIM_MULTIPLE = 128  # hidden and ffn sizes must be multiples of this (whole 128-wide tiles)


@dataclass(frozen=True)
class Recipe:
    name: str
    block: int  # one scale per `block` values along a GEMM's reduction axis (features or tokens)
    weight_rows: int  # weights: one scale per weight_rows output rows x `block` reduction values
    mx: bool  # power-of-two E8M0 scales (OCP MX floor rule) instead of amax / 448
    # The kernels' storage of MX operands: False, E4M3 bytes and scales; True, the MX values
    # themselves (E4M3 times scale, exact in bf16 unless a block's amax is under about 2**-118)
    # without scales, multiplied by 16-bit GEMMs on GPUs without MX tensor-core instructions
    # (``fp8.storage``).
    dequantized: bool = False


RECIPES = {
    "fp8": Recipe("fp8", block=128, weight_rows=128, mx=False),
    "mxfp8": Recipe("mxfp8", block=32, weight_rows=1, mx=True),
}


def recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown low-precision recipe {name!r}; expected one of {sorted(RECIPES)}") from None


def quantize_rows(x: torch.Tensor, r: Recipe, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] blocked along K: (uint8 [..., K], float32 [..., K / block])."""
    if r.mx:
        t = mxfp8.quantize(x, -1, "e4m3", "floor", backend=backend)
        return t.data.view(torch.uint8), e8m0_to_float32(t.scale)
    t = fp8_block.quantize(x, (1, r.block), "e4m3", backend=backend)
    return t.data.view(torch.uint8), t.scale


def quantize_weight(w: torch.Tensor, r: Recipe, reduce_axis: int, backend: str = "auto"):
    """Expert weights [E, A, B] for a GEMM reducing over `reduce_axis` (1 or 2).

    Returns (data uint8 [E, N, K] contiguous along K, scale float32 indexed
    [e, n // weight_rows, k // block] (possibly a strided view)), where (N, K) is (A, B) for
    reduce_axis 2 and (B, A) for reduce_axis 1.
    """
    if r.mx:
        t = mxfp8.quantize(w, reduce_axis, "e4m3", "floor", backend=backend)
        data, scale = t.data.view(torch.uint8), e8m0_to_float32(t.scale)
    else:
        t = fp8_block.quantize(w, (r.weight_rows, r.block), "e4m3", backend=backend)
        data, scale = t.data.view(torch.uint8), t.scale
    if reduce_axis == 1:
        return transpose_weight(data, scale)
    return data, scale


def quantize_weight_both(w: torch.Tensor, r: Recipe, backend: str = "auto"):
    """``(quantize_weight(w, r, 2), quantize_weight(w, r, 1))`` with one read of ``w`` [E, A, B]
    for MX (both layouts from one pass over the stacked [E * A, B] matrix: its blocks of 32 rows
    never straddle two experts as A is a multiple of 32); for "fp8" the 128 x 128 tiles are
    written twice by one kernel, once transposed."""
    if not r.mx:
        t, t_t = fp8_block.quantize_both(w, (r.weight_rows, r.block), "e4m3", backend=backend)
        return (t.data.view(torch.uint8), t.scale), (t_t.data.view(torch.uint8), t_t.scale)
    E, A, B = w.shape
    rows, cols = mxfp8.quantize_both(w.reshape(E * A, B), "e4m3", "floor", backend=backend)
    fwd = (rows.data.view(torch.uint8).view(E, A, B), e8m0_to_float32(rows.scale).view(E, A, B // r.block))
    # cols.data is the [B, E * A] buffer seen transposed: expert e's [B, A] block is K-contiguous.
    data_t = cols.data.view(torch.uint8).t().view(B, E, A).transpose(0, 1)
    scale_t = e8m0_to_float32(cols.scale.t()).view(B, E, A // r.block).transpose(0, 1)
    return fwd, (data_t, scale_t)


def transpose_weight(data: torch.Tensor, scale: torch.Tensor):
    """The same quantized weight seen from the other GEMM (valid when the scale tile is square:
    the "fp8" recipe's 128 x 128, and MX's per-axis layout that `mxfp8.quantize` stores K-innermost)."""
    return data.transpose(1, 2).contiguous(), scale.transpose(1, 2)


def dequantize_rows(data: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `quantize_rows` with blocks of `block` along the last axis, in float32."""
    values = data.view(torch.float8_e4m3fn).float()
    return (values.unflatten(-1, (-1, block)) * scale[..., None]).flatten(-2)
