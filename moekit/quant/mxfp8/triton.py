"""MXFP8 Triton kernels, bit-exact with `reference.py` (see it for the format's rules).

`quantize_both` reads a 2-D input once and writes the row-wise (blocks along K) and the
column-wise (blocks along M, stored transposed as [K, M]) quantizations, which the forward
GEMM and the two backward GEMMs consume. `quantize` runs the same kernel with one layout.
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
from moekit.quant.mxfp8.reference import BLOCK
from moekit.quant.tensors import MXTensor
from moekit.quant.triton_utils import (
    INTERPRETING,
    as_bytes,
    decode_fp8,
    encode_fp8,
    kernel_input,
    to_float32,
)


@triton.jit
def _shared_exponent(amax, EMAX: tl.constexpr, RCEIL: tl.constexpr):
    bits = amax.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    if RCEIL:
        exp += ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)  # mantissa above 1.75
    return tl.minimum(tl.maximum(exp - EMAX, -127), 127)


@triton.jit
def _quantize_blocks(x, AXIS: tl.constexpr, EMAX: tl.constexpr, RCEIL: tl.constexpr,
                     MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr,
                     E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """x: float32 with blocks of 32 along AXIS -> (element bytes like x, scale bytes without AXIS)."""
    mag = tl.abs(x)
    finite = mag < float("inf")
    amax = tl.max(tl.where(finite, mag, 0.0), axis=AXIS)
    nonfinite = tl.max(tl.where(finite, 0, 1), axis=AXIS) > 0
    exp = _shared_exponent(amax, EMAX, RCEIL)
    inv_scale = ((127 - exp) << 23).to(tl.float32, bitcast=True)  # 2**-exp, exact
    elems = encode_fp8(x * tl.expand_dims(inv_scale, AXIS), MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP,
                       E5M2, EMULATE_RNE)
    elems = tl.where(tl.expand_dims(nonfinite, AXIS), 0x7F, elems).to(tl.uint8)
    scale = tl.where(nonfinite, 255, exp + 127).to(tl.uint8)
    return elems, scale


@triton.jit
def _mx_quantize_kernel(
    x_ptr, row_data_ptr, row_scale_ptr, col_data_ptr, col_scale_ptr,
    M, K, stride_xm,
    ROWWISE: tl.constexpr, COLWISE: tl.constexpr, IS_BF16: tl.constexpr,
    EMAX: tl.constexpr, RCEIL: tl.constexpr, MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr,
    MIN_NORMAL_EXP: tl.constexpr, E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    raw = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0)

    if ROWWISE:
        x = to_float32(raw, IS_BF16)
        elems, scale = _quantize_blocks(tl.reshape(x, (BLOCK_M, BLOCK_K // 32, 32)), 2, EMAX, RCEIL,
                                        MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, EMULATE_RNE)
        tl.store(row_data_ptr + offs_m[:, None] * K + offs_k[None, :],
                 tl.reshape(elems, (BLOCK_M, BLOCK_K)), mask=mask)
        offs_kb = tl.program_id(1) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
        tl.store(row_scale_ptr + offs_m[:, None] * (K // 32) + offs_kb[None, :], scale,
                 mask=(offs_m[:, None] < M) & (offs_kb[None, :] < K // 32))

    if COLWISE:
        # Transpose first (the raw 16-bit input: half the shared memory of float32), so that the
        # blocks (along M) are innermost: the amax reduces within a row of the [K, M] tile and the
        # tile is already in the layout of its [K, M] destination, so both the element and the
        # scale stores are contiguous along M.
        xt = to_float32(tl.trans(raw), IS_BF16)
        elems, scale = _quantize_blocks(tl.reshape(xt, (BLOCK_K, BLOCK_M // 32, 32)), 2, EMAX, RCEIL,
                                        MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, EMULATE_RNE)
        tl.store(col_data_ptr + offs_k[:, None] * M + offs_m[None, :], tl.reshape(elems, (BLOCK_K, BLOCK_M)),
                 mask=(offs_k[:, None] < K) & (offs_m[None, :] < M))
        offs_mb = tl.program_id(0) * (BLOCK_M // 32) + tl.arange(0, BLOCK_M // 32)
        tl.store(col_scale_ptr + offs_k[:, None] * (M // 32) + offs_mb[None, :], scale,
                 mask=(offs_k[:, None] < K) & (offs_mb[None, :] < M // 32))


@triton.jit
def _mx_dequantize_kernel(
    data_ptr, scale_ptr, out_ptr, R, K,
    E5M2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
    elems = decode_fp8(tl.load(data_ptr + offs_r[:, None] * K + offs_k[None, :], mask=mask, other=0), E5M2)
    offs_kb = tl.program_id(1) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    sbytes = tl.load(scale_ptr + offs_r[:, None] * (K // 32) + offs_kb[None, :],
                     mask=(offs_r[:, None] < R) & (offs_kb[None, :] < K // 32), other=127).to(tl.int32)
    # 2**(b - 127); b = 0 is the float32 subnormal 2**-127; b = 255 is NaN.
    sbits = tl.where(sbytes == 0, 1 << 22, sbytes << 23)
    scale = tl.where(sbytes == 255, float("nan"), sbits.to(tl.float32, bitcast=True))
    out = tl.reshape(elems, (BLOCK_R, BLOCK_K // 32, 32)) * scale[:, :, None]
    tl.store(out_ptr + offs_r[:, None] * K + offs_k[None, :], tl.reshape(out, (BLOCK_R, BLOCK_K)), mask=mask)


def _tiles(num_warps_big: int = 8) -> dict:
    """Tile sizes: small ones in the interpreter (so edge masks get exercised), big ones on a GPU."""
    if INTERPRETING:
        return {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4}
    return {"BLOCK_M": 128, "BLOCK_K": 128, "num_warps": num_warps_big}


def _format_args(elem: str, scale_mode: str) -> dict:
    fmt = element_format(elem)
    check_scale_mode(scale_mode)
    return {
        "EMAX": fmt.emax, "RCEIL": scale_mode == "rceil", "MAX_NORMAL": fmt.max_normal,
        "MANTISSA_BITS": fmt.mantissa_bits, "MIN_NORMAL_EXP": fmt.min_normal_exp,
        "E5M2": elem == "e5m2", "EMULATE_RNE": INTERPRETING,
    }


def empty_outputs(m: int, k: int, rowwise: bool, colwise: bool, elem: str, device) -> dict:
    """Output buffers as uint8: row data [M, K], row scale [M, K/32]; col data [K, M], col scale [K, M/32]."""
    out = {}
    if rowwise:
        out["row_data"] = torch.empty(m, k, dtype=torch.uint8, device=device)
        out["row_scale"] = torch.empty(m, k // BLOCK, dtype=torch.uint8, device=device)
    if colwise:
        out["col_data"] = torch.empty(k, m, dtype=torch.uint8, device=device)
        out["col_scale"] = torch.empty(k, m // BLOCK, dtype=torch.uint8, device=device)
    return out


def launch_quantize(x: torch.Tensor, outputs: dict, elem: str, scale_mode: str, tiles: dict | None = None) -> None:
    """Run the kernel on 2-D `x` [M, K] (unit stride along K), writing the layouts in `outputs`.
    `tiles` (BLOCK_M, BLOCK_K: multiples of 32; num_warps) overrides the default, for tuning."""
    m, k = x.shape
    tiles = tiles or _tiles()
    grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(k, tiles["BLOCK_K"]))
    rowwise, colwise = "row_data" in outputs, "col_data" in outputs
    _mx_quantize_kernel[grid](
        kernel_input(x), outputs.get("row_data"), outputs.get("row_scale"),
        outputs.get("col_data"), outputs.get("col_scale"), m, k, x.stride(0),
        ROWWISE=rowwise, COLWISE=colwise, IS_BF16=x.dtype == torch.bfloat16,
        **_format_args(elem, scale_mode), **tiles,
    )


def _fp8(t: torch.Tensor, elem: str) -> torch.Tensor:
    return t.view(element_format(elem).dtype)


def _unit_stride_2d(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def quantize_both(x: torch.Tensor, elem: str = "e4m3", scale_mode: str = "floor") -> tuple[MXTensor, MXTensor]:
    """One pass over 2-D `x` [M, K]: (row-wise MXTensor, axis 1; column-wise MXTensor, axis 0)."""
    check_input(x)
    if x.ndim != 2:
        raise ValueError(f"quantize_both takes a 2-D tensor, got shape {tuple(x.shape)}")
    check_divisible(x.shape[0], BLOCK, "axis 0")
    check_divisible(x.shape[1], BLOCK, "axis 1")
    x = _unit_stride_2d(x)
    out = empty_outputs(*x.shape, True, True, elem, x.device)
    launch_quantize(x, out, elem, scale_mode)
    rows = MXTensor(_fp8(out["row_data"], elem), out["row_scale"].view(E8M0_DTYPE), 1, elem, scale_mode)
    cols = MXTensor(_fp8(out["col_data"], elem).t(), out["col_scale"].view(E8M0_DTYPE).t(), 0, elem, scale_mode)
    return rows, cols


def quantize(x: torch.Tensor, axis: int = -1, elem: str = "e4m3", scale_mode: str = "floor") -> MXTensor:
    check_input(x)
    axis = normalize_axis(axis, x.ndim)
    check_divisible(x.shape[axis], BLOCK, f"axis {axis}")
    if x.ndim == 2 and axis == 0:  # read in place, write transposed
        x = _unit_stride_2d(x)
        out = empty_outputs(*x.shape, False, True, elem, x.device)
        launch_quantize(x, out, elem, scale_mode)
        return MXTensor(_fp8(out["col_data"], elem).t(), out["col_scale"].view(E8M0_DTYPE).t(), 0, elem,
                        scale_mode)
    moved = x.movedim(axis, -1)
    x2 = _unit_stride_2d(moved.reshape(-1, moved.shape[-1]))
    out = empty_outputs(*x2.shape, True, False, elem, x.device)
    launch_quantize(x2, out, elem, scale_mode)
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
    tiles = _tiles(num_warps_big=4)
    block_r, block_k = tiles.pop("BLOCK_M"), tiles.pop("BLOCK_K")
    grid = (triton.cdiv(data2.shape[0], block_r), triton.cdiv(k, block_k))
    _mx_dequantize_kernel[grid](data2, scale2, out, data2.shape[0], k, E5M2=t.elem == "e5m2",
                                BLOCK_R=block_r, BLOCK_K=block_k, **tiles)
    return out.reshape(data.shape).movedim(-1, t.axis).to(dtype)
