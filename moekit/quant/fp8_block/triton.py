"""FP8 block-scaled Triton kernels, bit-exact with `reference.py` (see it for the rules).

One kernel serves every block shape: a program loads a tile of whole blocks, views it as
[tiles_r, rows, tiles_k, cols] and reduces the amax over the block axes. `quantize_both` (square
blocks, both layouts in one pass) has a kernel of its own, one block per program, which shares
the MXFP8 kernel's FP8 encoders: on the GPU four bytes of the transpose come out of two cvt
instructions as one word (inline PTX, so checked by the GPU tests only; the interpreter takes
plain Triton for the same bytes).
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
    encode_fp8_satfinite,
    encode_fp8_words,
    kernel_input,
    load_as_float32,
    needs_index_64,
    program_id,
    to_float32,
)


@triton.jit
def _block_quantize_kernel(
    x_ptr, data_ptr, scale_ptr, R, K, stride_xr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, IS_BF16: tl.constexpr,
    MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr, MIN_SCALE: tl.constexpr,
    E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr, INDEX_64: tl.constexpr, EVEN: tl.constexpr,
    TILE_R: tl.constexpr, TILE_K: tl.constexpr,
):
    """EVEN: the tiles divide [R, K]: no masks, whose bounds vary along the contiguous axis and
    would cut every store to single bytes."""
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
    scale = tl.where(nonfinite, float("nan"), scale)
    offs_rb = program_id(0, INDEX_64) * (TILE_R // BLOCK_ROWS) + tl.arange(0, TILE_R // BLOCK_ROWS)
    offs_kb = program_id(1, INDEX_64) * (TILE_K // BLOCK_COLS) + tl.arange(0, TILE_K // BLOCK_COLS)
    tl.store(scale_ptr + offs_rb[:, None] * (K // BLOCK_COLS) + offs_kb[None, :], scale,
             mask=(offs_rb[:, None] < R // BLOCK_ROWS) & (offs_kb[None, :] < K // BLOCK_COLS))


@triton.jit
def _block_quantize_both_kernel(
    x_ptr, data_ptr, scale_ptr, data_t_ptr, M, K, stride_xr,
    BLOCK: tl.constexpr, ROW_GROUP: tl.constexpr, IS_BF16: tl.constexpr,
    MAX_NORMAL: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr, MIN_SCALE: tl.constexpr,
    E5M2: tl.constexpr, EMULATE_RNE: tl.constexpr, INDEX_64: tl.constexpr,
):
    """One BLOCK x BLOCK block of the stacked [R, K] rows per program, quantized into data [R, K]
    (seen as int16 byte pairs) and, transposed, into its matrix's [K, M] in data_t (seen as int32
    words of 4 rows' bytes). With IS_BF16, x_ptr / stride_xr address int32 pairs of bfloat16.

    Tile row t = s * 4G + j * G + a (G = ROW_GROUP, j < 4, a < G) holds x row r0 + s * 4G + 4a + j,
    as in the MXFP8 kernel: with G the rows one pass of the CTA's threads covers
    (`_both_row_group`), one thread holds rows 4a .. 4a + 3 of its columns, so their bytes make a
    word in registers and the on-chip transpose moves words, not bytes. Only the speed depends on
    the layout. A NaN / Inf in the block makes the inverse scale NaN, and NaN encodes as 0x7F:
    no select per byte."""
    r0 = program_id(0, INDEX_64) * BLOCK
    t = tl.arange(0, BLOCK)
    offs_r = r0 + (t // (4 * ROW_GROUP)) * (4 * ROW_GROUP) + 4 * (t % ROW_GROUP) + (t // ROW_GROUP) % 4
    offs_k = program_id(1, INDEX_64) * BLOCK + tl.arange(0, BLOCK)
    offs_p = program_id(1, INDEX_64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)  # pairs of columns
    if IS_BF16:
        # Widened by a shift and a mask. (A widening cast of int16 values would let the compiler
        # move the words' layout conversion up to the loaded tile, 4x the bytes, and then convert
        # the row-major bytes back.)
        pairs = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_p[None, :])
        x = tl.reshape(tl.join((pairs << 16).to(tl.float32, bitcast=True),
                               (pairs & -65536).to(tl.float32, bitcast=True)), (BLOCK, BLOCK))
    else:
        x = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_k[None, :]).to(tl.float32)
    # One integer max: magnitude bits order like magnitudes, and NaN / Inf lie above every finite one.
    amax_bits = tl.max(tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1), axis=0)
    nonfinite = amax_bits >= 0x7F800000
    scale = tl.maximum(tl.math.div_rn(amax_bits.to(tl.float32, bitcast=True), MAX_NORMAL), MIN_SCALE)
    inv_scale = tl.where(nonfinite, float("nan"), tl.math.div_rn(1.0, scale))
    q = x * inv_scale
    # Row-major bytes stored in pairs: a [BLOCK, BLOCK / 2] store like the bfloat16 load, which
    # gets the load's layout (a [BLOCK, BLOCK] byte store got its own, and a conversion).
    lo, hi = tl.split(tl.reshape(encode_fp8_satfinite(q, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, EMULATE_RNE),
                                 (BLOCK, BLOCK // 2, 2)))
    tl.store(data_ptr + offs_r[:, None] * (K // 2) + offs_p[None, :], lo.to(tl.int16) | (hi.to(tl.int16) << 8))

    # [s, a, k, j]: the in-thread axis j moved last and split into its four rows (no data moves).
    S: tl.constexpr = BLOCK // (4 * ROW_GROUP)
    q = tl.permute(tl.reshape(q, (S, 4, ROW_GROUP, BLOCK)), (0, 2, 3, 1))
    q_even, q_odd = tl.split(tl.reshape(q, (S, ROW_GROUP, BLOCK, 2, 2)))
    q0, q2 = tl.split(q_even)
    q1, q3 = tl.split(q_odd)
    words = tl.reshape(encode_fp8_words(q0, q1, q2, q3, MAX_NORMAL, MANTISSA_BITS, MIN_NORMAL_EXP, E5M2, EMULATE_RNE),
                       (BLOCK // 4, BLOCK))
    # Word w of row k of matrix r0 // M's transpose: the compiler cannot see that the base is a
    # multiple of BLOCK / 4 words (r0 % M above all); without the hint the stores are not vectors.
    base = tl.multiple_of((r0 // M).to(tl.int64) * K * (M // 4) + (r0 % M) // 4, BLOCK // 4)
    offs_w = tl.arange(0, BLOCK // 4)
    tl.store(data_t_ptr + base + offs_k[None, :].to(tl.int64) * (M // 4) + offs_w[:, None], words)
    tl.store(scale_ptr + program_id(0, INDEX_64) * (K // BLOCK) + program_id(1, INDEX_64),
             tl.where(nonfinite, float("nan"), scale))


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


def _tiles(block: tuple[int, int], interpreting: bool = INTERPRETING) -> dict:
    """A tile holds whole blocks: several rows of 1-row blocks, else exactly one row of blocks.
    (`interpreting`: the interpreter's small tiles, or the GPU's, which the sm_90 builds of
    benchmarks/compile_check_moe_fp8.py ask for.)"""
    br, bc = block
    if interpreting:
        return {"TILE_R": br if br > 1 else 16, "TILE_K": bc if bc > 64 else 2 * bc, "num_warps": 4}
    return {"TILE_R": br if br > 1 else 32, "TILE_K": bc if bc >= 128 else 128, "num_warps": 8}


def _check_pow2_block(block: tuple[int, int]) -> None:
    if any(b & (b - 1) for b in block):
        raise ValueError(f"the Triton kernel needs power-of-two block sides, got {block}; use the reference")


def _format_args(elem: str) -> dict:
    fmt = element_format(elem)
    return dict(MAX_NORMAL=fmt.max_normal, MANTISSA_BITS=fmt.mantissa_bits, MIN_NORMAL_EXP=fmt.min_normal_exp,
                MIN_SCALE=MIN_SCALE, E5M2=elem == "e5m2", EMULATE_RNE=INTERPRETING)


def launch_quantize(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                    elem: str, tiles: dict | None = None, data_t: torch.Tensor | None = None,
                    rows_per_matrix: int = 0) -> None:
    """Quantize `x2` [R, K] (unit stride along K) into uint8 `data` [R, K] and float32 `scale`.
    With `data_t`, also write each [rows_per_matrix, K] matrix's transpose into it (square blocks
    of at least 4, one per program; `launch_quantize_both`). `tiles` (TILE_R, TILE_K: multiples of
    the block; num_warps) overrides the default."""
    if data_t is not None:
        launch_quantize_both(x2, data, scale, data_t, block[0], elem, rows_per_matrix, (tiles or {}).get("num_warps"))
        return
    tiles = tiles or _tiles(block)
    r, k = x2.shape
    grid = (triton.cdiv(r, tiles["TILE_R"]), triton.cdiv(k, tiles["TILE_K"]))
    _block_quantize_kernel[grid](
        kernel_input(x2), data, scale, r, k, x2.stride(0), BLOCK_ROWS=block[0], BLOCK_COLS=block[1],
        IS_BF16=x2.dtype == torch.bfloat16, INDEX_64=needs_index_64(x2),
        EVEN=r % tiles["TILE_R"] == 0 and k % tiles["TILE_K"] == 0, **_format_args(elem), **tiles,
    )


def _both_warps(block: int) -> int:
    """8 warps for a 128 x 128 block (64 values a thread; sm_90: 100 registers, 2 CTAs per SM)."""
    return max(1, min(8, block * block // 2048))


def _both_row_group(block: int, num_warps: int) -> int:
    """ROW_GROUP of `_block_quantize_both_kernel`: the rows one pass of the CTA covers in the
    layout Triton gives the loaded tile (16 values a thread along K: 16-byte stores of the
    row-major bytes, 32-byte loads of bfloat16), at most block / 4 so the tile splits into
    4-row words."""
    lanes_k = min(max(block // 16, 1), 32)
    return max(1, min(32 // lanes_k * num_warps, block // 4))


def launch_quantize_both(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, data_t: torch.Tensor,
                         block: int, elem: str, rows_per_matrix: int, num_warps: int | None = None) -> None:
    """`launch_quantize` with one block per program, plus each [rows_per_matrix, K] matrix's
    transpose into uint8 `data_t` (block >= 4: it is written in 4-byte words)."""
    r, k = x2.shape
    warps = num_warps or _both_warps(block)
    bf16 = x2.dtype == torch.bfloat16
    if bf16 and (x2.stride(0) % 2 or x2.storage_offset() % 2):  # not viewable as int32 pairs
        x2 = x2.contiguous()
    _block_quantize_both_kernel[(r // block, k // block)](
        x2.view(torch.int32) if bf16 else x2, data.view(torch.int16), scale, data_t.view(torch.int32),
        rows_per_matrix, k, x2.stride(0) // 2 if bf16 else x2.stride(0), BLOCK=block,
        ROW_GROUP=_both_row_group(block, warps), IS_BF16=bf16, INDEX_64=needs_index_64(x2),
        **_format_args(elem), num_warps=warps,
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
    if block[0] < 4:  # too small for the transpose's 4-row words: two passes
        return quantize(x, block, elem), quantize(x.transpose(-1, -2), block, elem)
    block, x2, data, scale = _checked_rows(x, block, elem)
    fmt = element_format(elem)
    *lead, m, k = x.shape
    data_t = torch.empty(*lead, k, m, dtype=torch.uint8, device=x.device)
    launch_quantize(x2, data, scale, block, elem, data_t=data_t, rows_per_matrix=m)
    scale = scale.reshape(*lead, m // block[0], -1)
    return (BlockScaledTensor(data.view(fmt.dtype).reshape(x.shape), scale, block, elem),
            BlockScaledTensor(data_t.view(fmt.dtype), scale.transpose(-1, -2).contiguous(), block, elem))
