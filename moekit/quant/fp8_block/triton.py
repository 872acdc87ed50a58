"""FP8 block-scaled Triton kernels, bit-exact with `reference.py` (see it for the rules).

One kernel serves every block shape: a program loads a tile of whole blocks, views it as
[tiles_r, rows, tiles_k, cols] and reduces the amax over the block axes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.quant.formats import check_input, element_format
from moekit.quant.fp8_block.reference import ACTIVATION_BLOCK, MIN_SCALE, check_block
from moekit.quant.tensors import BlockScaledTensor
from moekit.quant.triton_utils import (
    INTERPRETING,
    as_bytes,
    decode_fp8,
    encode_fp8,
    kernel_input,
    load_as_float32,
    needs_index_64,
    program_id,
    to_float32,
)


@triton.jit
def _block_quantize_kernel(
    x_ptr, data_ptr, scale_ptr, data_t_ptr, R, K, M, stride_xr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, IS_BF16: tl.constexpr, TRANSPOSED: tl.constexpr,
    MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr, MIN_SCALE: tl.constexpr,
    E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr, INDEX_64: tl.constexpr, EVEN: tl.constexpr,
    TILE_R: tl.constexpr, TILE_K: tl.constexpr,
):
    """EVEN: the tiles divide [R, K] (always so for quantize_both's one-block tiles): no masks,
    whose bounds vary along the contiguous axis and would cut every store to single bytes."""
    offs_r = program_id(0, INDEX_64) * TILE_R + tl.arange(0, TILE_R)
    offs_k = program_id(1, INDEX_64) * TILE_K + tl.arange(0, TILE_K)
    x_ptrs = x_ptr + offs_r[:, None] * stride_xr + offs_k[None, :]
    if EVEN:
        mask = None
        x = to_float32(tl.load(x_ptrs), IS_BF16)
    else:
        mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
        x = load_as_float32(x_ptrs, mask, IS_BF16)
    x = tl.reshape(x, (TILE_R // BLOCK_ROWS, BLOCK_ROWS, TILE_K // BLOCK_COLS, BLOCK_COLS))

    mag = tl.abs(x)
    finite = mag < float("inf")
    amax = tl.max(tl.max(tl.where(finite, mag, 0.0), axis=3), axis=1)
    nonfinite = tl.max(tl.max(tl.where(finite, 0, 1), axis=3), axis=1) > 0
    scale = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, MAX_NORMAL, tl.float32)), MIN_SCALE)
    inv_scale = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    elems = encode_fp8(x * inv_scale[:, None, :, None], MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2,
                       EMULATE_RNE)
    elems = tl.reshape(tl.where(nonfinite[:, None, :, None], 0x7F, elems).to(tl.uint8), (TILE_R, TILE_K))
    tl.store(data_ptr + offs_r[:, None] * K + offs_k[None, :], elems, mask=mask)
    if TRANSPOSED:
        # Also each [M, K] matrix's transpose [K, M] (a tile never spans two matrices: M is a
        # multiple of TILE_R); the byte tile is transposed on chip so both stores are contiguous.
        # The compiler cannot see that base (r0 % M above all) is a multiple of TILE_R: without
        # the hint it stores the transposed tile one byte at a time.
        r0 = program_id(0, INDEX_64) * TILE_R
        base = tl.multiple_of((r0 // M).to(tl.int64) * K * M + (r0 % M), TILE_R)
        offs_t = tl.arange(0, TILE_R)
        mask_t = None if EVEN else (offs_k[:, None] < K) & (r0 + offs_t[None, :] < R)
        tl.store(data_t_ptr + base + offs_k[:, None].to(tl.int64) * M + offs_t[None, :], tl.trans(elems),
                 mask=mask_t)

    scale = tl.where(nonfinite, float("nan"), scale)
    offs_rb = program_id(0, INDEX_64) * (TILE_R // BLOCK_ROWS) + tl.arange(0, TILE_R // BLOCK_ROWS)
    offs_kb = program_id(1, INDEX_64) * (TILE_K // BLOCK_COLS) + tl.arange(0, TILE_K // BLOCK_COLS)
    tl.store(scale_ptr + offs_rb[:, None] * (K // BLOCK_COLS) + offs_kb[None, :], scale,
             mask=(offs_rb[:, None] < R // BLOCK_ROWS) & (offs_kb[None, :] < K // BLOCK_COLS))


@triton.jit
def _block_dequantize_kernel(
    data_ptr, scale_ptr, out_ptr, R, K,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, E5M2: tl.constexpr,
    TILE_R: tl.constexpr, TILE_K: tl.constexpr, INDEX_64: tl.constexpr,
):
    offs_r = program_id(0, INDEX_64) * TILE_R + tl.arange(0, TILE_R)
    offs_k = program_id(1, INDEX_64) * TILE_K + tl.arange(0, TILE_K)
    mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
    elems = decode_fp8(tl.load(data_ptr + offs_r[:, None] * K + offs_k[None, :], mask=mask, other=0), E5M2)
    offs_rb = program_id(0, INDEX_64) * (TILE_R // BLOCK_ROWS) + tl.arange(0, TILE_R // BLOCK_ROWS)
    offs_kb = program_id(1, INDEX_64) * (TILE_K // BLOCK_COLS) + tl.arange(0, TILE_K // BLOCK_COLS)
    scale = tl.load(scale_ptr + offs_rb[:, None] * (K // BLOCK_COLS) + offs_kb[None, :],
                    mask=(offs_rb[:, None] < R // BLOCK_ROWS) & (offs_kb[None, :] < K // BLOCK_COLS), other=1.0)
    out = tl.reshape(elems, (TILE_R // BLOCK_ROWS, BLOCK_ROWS, TILE_K // BLOCK_COLS, BLOCK_COLS))
    out = out * scale[:, None, :, None]
    tl.store(out_ptr + offs_r[:, None] * K + offs_k[None, :], tl.reshape(out, (TILE_R, TILE_K)), mask=mask)


def _tiles(block: tuple[int, int]) -> dict:
    """A tile holds whole blocks: several rows of 1-row blocks, else exactly one row of blocks."""
    br, bc = block
    if INTERPRETING:
        return {"TILE_R": br if br > 1 else 16, "TILE_K": bc if bc > 64 else 2 * bc, "num_warps": 4}
    return {"TILE_R": br if br > 1 else 32, "TILE_K": bc if bc >= 128 else 128, "num_warps": 8}


def _check_pow2_block(block: tuple[int, int]) -> None:
    if any(b & (b - 1) for b in block):
        raise ValueError(f"the Triton kernel needs power-of-two block sides, got {block}; use the reference")


def launch_quantize(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                    elem: str, tiles: dict | None = None, data_t: torch.Tensor | None = None,
                    rows_per_matrix: int = 0) -> None:
    """Quantize `x2` [R, K] (unit stride along K) into uint8 `data` [R, K] and float32 `scale`.
    With `data_t`, also write each [rows_per_matrix, K] matrix's transpose into it (one block per
    tile). `tiles` (TILE_R, TILE_K: multiples of the block; num_warps) overrides the default."""
    fmt = element_format(elem)
    tiles = tiles or _tiles(block)
    r, k = x2.shape
    grid = (triton.cdiv(r, tiles["TILE_R"]), triton.cdiv(k, tiles["TILE_K"]))
    _block_quantize_kernel[grid](
        kernel_input(x2), data, scale, data if data_t is None else data_t, r, k, max(rows_per_matrix, 1),
        x2.stride(0), BLOCK_ROWS=block[0], BLOCK_COLS=block[1], IS_BF16=x2.dtype == torch.bfloat16,
        TRANSPOSED=data_t is not None,
        MAX_NORMAL=fmt.max_normal, MANTISSA_BITS=fmt.mantissa_bits, MIN_NORMAL_EXP=fmt.min_normal_exp,
        MIN_SCALE=MIN_SCALE, E5M2=elem == "e5m2", EMULATE_RNE=INTERPRETING, INDEX_64=needs_index_64(x2),
        EVEN=r % tiles["TILE_R"] == 0 and k % tiles["TILE_K"] == 0, **tiles,
    )


def _checked_rows(x: torch.Tensor, block: tuple[int, int], elem: str):
    """Validated (block, x as [R, K] rows, element bytes [R, K], scales [R / block rows, K / block
    cols]) for a quantization kernel. Blocks never cross matrices since M is a multiple of the
    block rows, so the leading dims flatten into rows."""
    check_input(x)
    element_format(elem)
    block = check_block(x, block)
    _check_pow2_block(block)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    data = torch.empty(x2.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty(x2.shape[0] // block[0], k // block[1], dtype=torch.float32, device=x.device)
    return block, x2, data, scale


def quantize(x: torch.Tensor, block: tuple[int, int] = ACTIVATION_BLOCK, elem: str = "e4m3") -> BlockScaledTensor:
    block, x2, data, scale = _checked_rows(x, block, elem)
    *lead, m, _ = x.shape
    launch_quantize(x2, data, scale, block, elem)
    return BlockScaledTensor(data.view(element_format(elem).dtype).reshape(x.shape),
                             scale.reshape(*lead, m // block[0], -1), block, elem)


def dequantize(t: BlockScaledTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode in float32 (one rounding: FP8 value times scale), then cast to `dtype`."""
    _check_pow2_block(t.block)
    k = t.data.shape[-1]
    data2 = as_bytes(t.data.reshape(-1, k).contiguous())
    scale2 = t.scale.reshape(-1, k // t.block[1]).contiguous()
    out = torch.empty(data2.shape, dtype=torch.float32, device=data2.device)
    tiles = _tiles(t.block)
    grid = (triton.cdiv(data2.shape[0], tiles["TILE_R"]), triton.cdiv(k, tiles["TILE_K"]))
    _block_dequantize_kernel[grid](data2, scale2, out, data2.shape[0], k, BLOCK_ROWS=t.block[0],
                                   BLOCK_COLS=t.block[1], E5M2=t.elem == "e5m2", INDEX_64=needs_index_64(data2),
                                   **tiles)
    return out.reshape(t.data.shape).to(dtype)


def quantize_both(x: torch.Tensor, block: tuple[int, int], elem: str = "e4m3"):
    """(quantize(x), the same for x^T) in one pass; square power-of-two blocks only."""
    block, x2, data, scale = _checked_rows(x, block, elem)
    fmt = element_format(elem)
    *lead, m, k = x.shape
    data_t = torch.empty(*lead, k, m, dtype=torch.uint8, device=x.device)
    tiles = {**_tiles(block), "TILE_R": block[0], "TILE_K": block[1]}  # one block per tile
    launch_quantize(x2, data, scale, block, elem, tiles, data_t=data_t, rows_per_matrix=m)
    scale = scale.reshape(*lead, m // block[0], -1)
    return (BlockScaledTensor(data.view(fmt.dtype).reshape(x.shape), scale, block, elem),
            BlockScaledTensor(data_t.view(fmt.dtype), scale.transpose(-1, -2).contiguous(), block, elem))
