"""Triton kernels of the FP8 / MXFP8 routed experts (recipes in ``fp8_recipe``), and launchers.

Operands are E4M3 bytes with float32 block scales; every GEMM multiplies one K-block of
``block`` values per step on the tensor cores (``tl.dot`` on float8e4nv, FP32 result) and
applies the two blocks' scales to that partial product before adding it to the FP32
accumulator (DeepSeek-V3's promotion to CUDA cores). Rows are expert-sorted (de)assignments as in
``triton_kernels``; every row tile is ``ROW_TILE`` = 128 rows of one expert, so a tile is also
one group of the token-axis (wgrad) quantization.

- ``_gather_gemm_kernel``: rows of an FP8 source gathered by token in the prologue, times the
  expert's weight. Forward up-projection: stores the pre-activation h (input dtype), applies
  the activation and quantizes its output both ways in the epilogue (rows for the down GEMM,
  columns of ``w * a`` for dW_down). Backward down dgrad: da = w * (dout @ W_down) in float32.
- ``_act_backward_kernel``: dh = act'(h) * da, quantized the same two ways (rows for dx,
  columns for dW_up); memory-bound, apart from the dgrad GEMM so that its epilogue stays light;
  by chunks of rows, twice over where a token-axis block is longer than a chunk.
- ``_scatter_gemm_kernel``: FP8 expert-sorted rows times the expert's weight, each result
  row written at its (token, slot) place (down forward; up dgrad).
- ``_gather_cols_kernel``: rows of x / dout gathered by token, quantized along the token axis
  (the wgrad operands the GEMM epilogues cannot produce).
- ``_wgrad_kernel``: dW[e] = A_e^T B_e from two token-axis-quantized operands stored
  transposed, one 128-slot per row tile ([P, tiles * 128], zeros past an expert's rows): the
  K-major layout FP8 tensor cores want, with every load an aligned full vector.

With ``Recipe.dequantized`` (MX on GPUs without MX tensor-core instructions) the same kernels
store every MX operand as its values, E4M3 times the block's power-of-two scale (exact in bf16),
instead of bytes and scales, and their GEMMs are plain 16-bit ones: the dequantization happens once,
where an operand is quantized, not in every GEMM's K loop (``_mx_values_kernel`` does it for
x, dout and the weights).

``fp8_reference`` holds the plain-PyTorch definition of the whole op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moekit.ops.activations import is_gated
from moekit.ops.moe.fp8_recipe import DIM_MULTIPLE, ROW_TILE, Recipe
from moekit.ops.moe.triton_kernels import ACT_CODES, _act, _act_grad, _expert_rows, _expert_tile, _pow2, _swizzle
from moekit.ops.moe.triton_meta import RoutingMeta, new_buffer
from moekit.quant.triton_utils import INTERPRETING, encode_fp8_satfinite

E4M3_MAX = tl.constexpr(448.0)
E4M3_EMAX = tl.constexpr(8)
MIN_SCALE = tl.constexpr(2.0**-126)
TILE_N = DIM_MULTIPLE  # output columns per program: one whole 128-wide quantization group
# Launch options of the row GEMMs (gather_up, the dgrad GEMM, scatter); benchmarks/moe_fp8.py --sweep
# tries others.
INTERPRETER_LAUNCH = {"num_warps": 4, "num_stages": 1}
LAUNCH = INTERPRETER_LAUNCH if INTERPRETING else {"num_warps": 8, "num_stages": 3}
# The launches below are the same in the interpreter (which ignores them) as on the GPU, so that
# benchmarks/compile_check_moe_fp8.py builds what the GPU runs.
# Activation backward (memory-bound), a 128 x 128 tile of d_gate and d_up by chunks of 32 rows. sm_90
# fp8 gated: 4 warps 255 regs, no spills, 2 CTAs per SM (the whole tile at once took 16 warps at 128
# regs: one CTA per SM, loads and compute in turn); 8 warps 201 regs (1 CTA), capped at 128: spills.
ACT_BACKWARD_CHUNK = 32
ACT_BACKWARD_LAUNCH = {"num_warps": 4}
GATHER_COLS_LAUNCH = {"num_warps": 8}  # sm_90: 108 regs fp8, 2 CTAs per SM
# The MX values pass (x, dout, weights), rows per program x TILE_N (benchmarks/moe_fp8.py
# --values-sweep): H200, both layouts of a bf16 [229376, 4096] weight, % of copy: 32 rows / 4 warps
# 79%, 2 warps 71%; 64 / 4 58%; 64 / 8 54%; 128 / 8 53% (rows alone: 85-89% at every one).
MX_VALUES_TILE = 32
MX_VALUES_LAUNCH = {"num_warps": 4}
SCATTER_VALUES_TILE_N = 256  # scatter GEMM columns per program on MX values (bf16 GEMMs' usual 128 x 256)


@dataclass(frozen=True)
class WgradLaunch:
    """A weight-gradient dW tile (bm x bn; they must divide P x Q: the kernel stores whole tiles
    unmasked) and its launch. Every candidate builds without register spills for both recipes
    (benchmarks/compile_check_moe_fp8.py --wgrad checks it)."""

    bm: int
    bn: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"{self.bm}x{self.bn}/{self.num_warps}w/{self.num_stages}s"

    def fits(self, P: int, Q: int) -> bool:
        return P % self.bm == 0 and Q % self.bn == 0

    def options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


# Weight-gradient candidates, sm_90 builds at 256 experts (regs, shared memory, CTAs per SM; fp8 |
# mxfp8). The tile's K loop runs over an expert's rows: where experts see few rows (deepseek-v3:
# ~256, two K steps) each program is mostly prologue and epilogue, and every operand tile is re-read
# from L2 once per dW tile it meets. benchmarks/moe_fp8.py --wgrad-sweep times every candidate; 64 x 256
# and 64 x 64, which no measurement chose, stay as its comparisons.
WGRAD_CANDIDATES = (
    # The default: two CTAs per SM, so one's per-K-step rescale of the accumulator (fp8: an outer
    # product of row and column scales) runs beside the other's MMAs. fp8 202 regs, 74 KB, 2 CTAs |
    # mxfp8 249 regs, 88 KB, 2.
    WgradLaunch(64, 128, 4, 3),
    # Half the B re-reads and programs, one CTA per SM: fp8 245 regs, 98 KB | mxfp8 254, 106 KB.
    WgradLaunch(128, 128, 8, 3),
    # Half the A re-reads, one CTA per SM: fp8 200 regs, 124 KB | mxfp8 255, 158 KB.
    WgradLaunch(64, 256, 8, 3),
    # Four CTAs per SM, twice the A re-reads: fp8 127 regs, 49 KB | mxfp8 169 regs, 53 KB, 2 CTAs.
    WgradLaunch(64, 64, 4, 3),
)
WGRAD_DEFAULT = WGRAD_CANDIDATES[0]
# Per recipe, (most mean rows per expert, candidate): the first entry whose bound holds and whose
# tile divides dW is used, else WGRAD_DEFAULT. Entries come from benchmarks/moe_fp8.py --wgrad-sweep
# (weight-gradient ms of both calls of one fwd+bwd, H200, 2026-11-29):
# - fp8 keeps the default: deepseek-v3 (256 rows per expert) 64x128 19.41 ms vs 128x128 22.78 (0.85x),
#   every other candidate slower too; mixtral-8x7b (2048 rows) 64x128 9.66 vs 128x128 9.79, none faster.
# - mxfp8 takes 128x128/8w up to 2048 rows, the most measured (past it the default until a sweep says
#   otherwise; under 256 rows it is unmeasured too). On the H200 MX operands are values and the
#   GEMMs 16-bit (``Recipe.dequantized``): deepseek-v3 18.23 ms vs the default's 20.12 (1.10x),
#   mixtral-8x7b 11.17 vs 13.23 (1.18x); with bytes and scales (sm_100's storage): 33.56 vs 35.34
#   and 19.09 vs 21.33. Two 16-bit-only tiles (their FP8 builds spill) were no faster on MX values:
#   128x256/8w/3s 19.84 ms at deepseek-v3, 11.16 at mixtral-8x7b; 128x128/4w/4s 22.55 and 11.59.
WGRAD_BY_ROWS: dict[str, tuple[tuple[int, WgradLaunch], ...]] = {"fp8": (), "mxfp8": ((2048, WGRAD_CANDIDATES[1]),)}
# A candidate name that overrides the choice (benchmarks and tests); None: by rows.
wgrad_force: str | None = None
GROUP_M = 8
K_STEP = tl.constexpr(128)  # reduction values per MX K-loop step (4 scale blocks of 32)
# MX on Hopper: dots on exactly dequantized operands (bf16; fp32 in the interpreter, whose
# bf16 dots are wrong).
MX_DOT_DTYPE = tl.constexpr(tl.float32 if INTERPRETING else tl.bfloat16)
MX_VALUES_DTYPE = torch.float32 if INTERPRETING else torch.bfloat16  # the buffers of dequantized operands
DQ_K_STEP = tl.constexpr(64)  # reduction values per step of the 16-bit GEMMs on dequantized operands


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _fp8_ptr(ptr):
    """uint8 storage seen as E4M3 through the pointer. Bitcasting loaded bytes instead puts an op
    between the load and the dot, and on sm_90 the pipeliner then neither streams the tile into
    shared memory (async copies, num_stages) nor feeds wgmma from there: every K step waited on
    a plain global load (benchmarks/compile_check_moe_fp8.py shows it; on the H200 the byte loads
    made the mixtral-8x7b layer's fwd+bwd 55.1 ms, these loads 38.5 ms)."""
    return ptr.to(tl.pointer_type(tl.float8e4nv), bitcast=True)


@triton.jit
def _block_scales(amax_bits, MX: tl.constexpr):
    """Magnitude bits of each block's amax -> (inverse scale, scale), both NaN for a block holding
    NaN / Inf. Same rules as ``moekit.quant``: fp8 scale amax / 448 (floored at
    2**-126), MX floor E8M0."""
    nonfinite = amax_bits >= 0x7F800000
    if MX:
        exp = tl.minimum(tl.maximum(((amax_bits >> 23) & 0xFF) - 127 - E4M3_EMAX, -127), 127)
        inv = ((127 - exp) << 23).to(tl.float32, bitcast=True)
        scale = tl.where(exp == -127, 1 << 22, (exp + 127) << 23).to(tl.float32, bitcast=True)
    else:
        amax = amax_bits.to(tl.float32, bitcast=True)
        scale = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, E4M3_MAX, tl.float32)), MIN_SCALE)
        inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    # A NaN inverse scale makes the whole block NaN, encoded 0x7F: no select per byte.
    return tl.where(nonfinite, float("nan"), inv), tl.where(nonfinite, float("nan"), scale)


@triton.jit
def _encode(v, inv, AXIS: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """E4M3 bytes of v times its blocks' inverse scales (v's shape without AXIS). Saturating: a
    finite block's |v| * inv is at most 448 (up to rounding), which the conversion clamps."""
    return encode_fp8_satfinite(v * tl.expand_dims(inv, AXIS), E4M3_MAX, 3, -6, False, EMULATE_RNE)


@triton.jit
def _amax_bits(v, AXIS: tl.constexpr):
    """One integer max per block: magnitude bits order like the magnitudes, and NaN / Inf
    (exponent field 0xFF) lie above every finite one."""
    return tl.max(v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=AXIS)


@triton.jit
def _quantize_along(v, AXIS: tl.constexpr, MX: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """float32 v, one block per line along AXIS -> (E4M3 bytes, v's shape; float32 scales, v's
    shape without AXIS); a block holding NaN / Inf becomes NaN."""
    inv, scale = _block_scales(_amax_bits(v, AXIS), MX)
    return _encode(v, inv, AXIS, EMULATE_RNE), scale


@triton.jit
def _quantize_blocks(v, AXIS: tl.constexpr, BLOCK: tl.constexpr, MX: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """float32 v [R, C] in blocks of BLOCK along AXIS (0 or 1) -> (E4M3 bytes [R, C], float32
    scales [R / BLOCK, C] or [R, C / BLOCK]). A block as long as the tile is reduced in v's own
    layout (a GEMM accumulator's): a reshape to 3-D would on sm_90 move the float32 tile through
    shared memory into another layout, and keep both copies live."""
    R: tl.constexpr = v.shape[0]
    C: tl.constexpr = v.shape[1]
    if AXIS == 0:
        if R == BLOCK:
            q, s = _quantize_along(v, 0, MX, EMULATE_RNE)
            s = s[None, :]
        else:
            q, s = _quantize_along(tl.reshape(v, (R // BLOCK, BLOCK, C)), 1, MX, EMULATE_RNE)
            q = tl.reshape(q, (R, C))
    else:
        if C == BLOCK:
            q, s = _quantize_along(v, 1, MX, EMULATE_RNE)
            s = s[:, None]
        else:
            q, s = _quantize_along(tl.reshape(v, (R, C // BLOCK, BLOCK)), 2, MX, EMULATE_RNE)
            q = tl.reshape(q, (R, C))
    return q, s


@triton.jit
def _mx_values(v, AXIS: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """float32 v [R, C] -> the MX values of its blocks of BLOCK along AXIS (each E4M3 element times
    its block's E8M0 scale; NaN for a block holding NaN / Inf), in MX_DOT_DTYPE."""
    R: tl.constexpr = v.shape[0]
    C: tl.constexpr = v.shape[1]
    A3: tl.constexpr = AXIS + 1  # the block axis of the 3-D view
    if AXIS == 0:
        v3 = tl.reshape(v, (R // BLOCK, BLOCK, C))
    else:
        v3 = tl.reshape(v, (R, C // BLOCK, BLOCK))
    inv, scale = _block_scales(_amax_bits(v3, A3), True)
    q = _encode(v3, inv, A3, EMULATE_RNE).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return tl.reshape(q * tl.expand_dims(scale, A3), (R, C)).to(MX_DOT_DTYPE)


@triton.jit
def _store_rows(v, rows, row_ok, col0, q_ptr, ld_q, s_ptr, ld_s,
                BLOCK: tl.constexpr, MX: tl.constexpr, DQ: tl.constexpr, EMULATE_RNE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
    """Quantize v [BM, BN] along its columns: q[rows, col0:col0+BN], s[rows, col0/BLOCK + ...]
    (DQ: the MX values in q, no scales)."""
    rows64 = rows.to(tl.int64)[:, None]
    cols = col0 + tl.arange(0, BN)
    if DQ:
        tl.store(q_ptr + rows64 * ld_q + cols[None, :], _mx_values(v, 1, BLOCK, EMULATE_RNE), mask=row_ok[:, None])
    else:
        q, s = _quantize_blocks(v, 1, BLOCK, MX, EMULATE_RNE)
        tl.store(q_ptr + rows64 * ld_q + cols[None, :], q, mask=row_ok[:, None])
        sc = col0 // BLOCK + tl.arange(0, BN // BLOCK)
        tl.store(s_ptr + rows64 * ld_s + sc[None, :], s, mask=row_ok[:, None])


@triton.jit
def _store_cols(v, slot0, col0, c_ptr, ld_c, cs_ptr, ld_cs,
                BLOCK: tl.constexpr, MX: tl.constexpr, DQ: tl.constexpr, EMULATE_RNE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
    """Quantize v [BM, BN] (rows of one expert from tile slot `slot0`, a multiple of BLOCK; rows
    past its end hold zeros) along its rows, stored transposed: c[col, slot0 + i] (whole aligned
    tiles, so loads and stores are full vectors), scales cs[slot0 / BLOCK + j, col].
    The blocks are reduced in v's own layout and the bytes stored at transposed addresses: the
    compiler transposes the uint8 result on its way to the store, where a float32 tl.trans(v)
    moved 4x the bytes through shared memory. (It still re-derives the scale row in the scale
    store's layout from a converted copy of the magnitude bits.) DQ: the MX values in c, no scales."""
    if DQ:
        _store_transposed(_mx_values(v, 0, BLOCK, EMULATE_RNE), slot0, col0, c_ptr, ld_c, BM, BN)
    else:
        q, s = _quantize_blocks(v, 0, BLOCK, MX, EMULATE_RNE)
        _store_transposed(q, slot0, col0, c_ptr, ld_c, BM, BN)
        sb = (slot0 // BLOCK + tl.arange(0, BM // BLOCK)).to(tl.int64)
        tl.store(cs_ptr + sb[:, None] * ld_cs + (col0 + tl.arange(0, BN))[None, :], s)


@triton.jit
def _store_transposed(q, slot0, col0, c_ptr, ld_c, BM: tl.constexpr, BN: tl.constexpr):
    """q [BM, BN] at c[col0 + j, slot0 + i]."""
    cols = (col0 + tl.arange(0, BN)).to(tl.int64)
    slots = slot0.to(tl.int64) + tl.arange(0, BM)
    tl.store(c_ptr + cols[None, :] * ld_c + slots[:, None], q)


@triton.jit
def _outer(sa, sb, SCALAR_B: tl.constexpr):
    """sa[i] * sb[j] as a broadcastable factor; the same float32 products either way, but a scalar
    sb keeps a [BM, 1] column live instead of a [BM, BN] tile: on sm_90 the tile (64 registers a
    thread at 8 warps) beside the dot result and the accumulators made the gated K loop spill."""
    if SCALAR_B:
        s = (sa * sb)[:, None]
    else:
        s = sa[:, None] * sb[None, :]
    return s


@triton.jit
def _scaled_gemm(a_ptr, a_rows, row_ok, ld_a, as_ptr, ld_as,
                 b_ptr, b_cols, ld_b, bs_ptr, ld_bs_n, ld_bs_k, b2_offset, num_k,
                 TWO: tl.constexpr, BLOCK: tl.constexpr, WEIGHT_ROWS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):
    """acc[i, j] = sum_k A[a_rows[i], k] B[b_cols[j], k] with per-block scales (A: one per row and
    K-block, B: one per WEIGHT_ROWS columns and K-block). With TWO, also acc2 over the columns
    b_cols + b2_offset (the up half of a gated projection), sharing A's loads."""
    ks = tl.arange(0, BLOCK)
    rows64 = a_rows.to(tl.int64)
    cols64 = b_cols.to(tl.int64)
    a_ptrs = _fp8_ptr(a_ptr) + rows64[:, None] * ld_a + ks[None, :]
    b_ptrs = _fp8_ptr(b_ptr) + cols64[None, :] * ld_b + ks[:, None]
    as_ptrs = as_ptr + rows64 * ld_as
    b2_ptrs = b_ptrs + b2_offset * ld_b
    # When a column tile lies in one weight block (BN divides WEIGHT_ROWS; tiles start at
    # multiples of BN): one scalar weight scale per K step. Else one per column, a [BM, BN] tile.
    SCALAR_B: tl.constexpr = WEIGHT_ROWS % BN == 0
    if not SCALAR_B:
        bs_ptrs = bs_ptr + (cols64 // WEIGHT_ROWS) * ld_bs_n
        bs2_ptrs = bs_ptr + ((cols64 + b2_offset) // WEIGHT_ROWS) * ld_bs_n
    else:
        col0 = tl.min(cols64, 0)
        bs_ptrs = bs_ptr + (col0 // WEIGHT_ROWS) * ld_bs_n
        bs2_ptrs = bs_ptr + ((col0 + b2_offset) // WEIGHT_ROWS) * ld_bs_n
    zero = tl.zeros((BM, BLOCK), a_ptrs.dtype.element_ty)  # typed: the interpreter cannot cast 0 to E4M3
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, num_k):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=zero)
        sa = tl.load(as_ptrs + kb, mask=row_ok, other=0.0)
        b = tl.load(b_ptrs)
        sb = tl.load(bs_ptrs + kb * ld_bs_k)
        acc += tl.dot(a, b) * _outer(sa, sb, SCALAR_B)
        if TWO:
            b2 = tl.load(b2_ptrs)
            sb2 = tl.load(bs2_ptrs + kb * ld_bs_k)
            acc2 += tl.dot(a, b2) * _outer(sa, sb2, SCALAR_B)
            b2_ptrs += BLOCK
        a_ptrs += BLOCK
        b_ptrs += BLOCK
    return acc, acc2


@triton.jit
def _dequantize(q, s, K_AXIS: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """E4M3 bytes q [R, C] (reduction along K_AXIS) times power-of-two scales s (one per BLOCK
    along it: [R, C / BLOCK] or [R / BLOCK, C]) -> MX_DOT_DTYPE. Exact: an E4M3 value times a
    power of two is a bf16 value, unless it falls below bf16's normal range (block amax < 2**-118)."""
    v = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if K_AXIS == 1:
        v = tl.reshape(tl.reshape(v, (R, C // BLOCK, BLOCK)) * s[:, :, None], (R, C))
    else:
        v = tl.reshape(tl.reshape(v, (R // BLOCK, BLOCK, C)) * s[:, None, :], (R, C))
    return v.to(MX_DOT_DTYPE)


@triton.jit
def _dequantized_gemm(a_ptr, a_rows, row_ok, ld_a, as_ptr, ld_as,
                      b_ptr, b_cols, ld_b, bs_ptr, ld_bs_n, ld_bs_k, b2_offset, num_k,
                      TWO: tl.constexpr, BLOCK: tl.constexpr, WEIGHT_ROWS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
    """``_scaled_gemm`` for MX blocks on GPUs without MX instructions: each K_STEP of both
    operands is dequantized in registers (4 scale blocks of 32) and multiplied at 16-bit speed,
    instead of an FP8 dot plus a rescale every 32 values."""
    NS: tl.constexpr = K_STEP // BLOCK
    ks = tl.arange(0, K_STEP)
    js = tl.arange(0, NS)
    rows64 = a_rows.to(tl.int64)
    cols64 = b_cols.to(tl.int64)
    a_ptrs = a_ptr + rows64[:, None] * ld_a + ks[None, :]
    as_ptrs = as_ptr + rows64[:, None] * ld_as + js[None, :]
    b_ptrs = b_ptr + cols64[None, :] * ld_b + ks[:, None]
    bs_ptrs = bs_ptr + (cols64 // WEIGHT_ROWS)[None, :] * ld_bs_n + js[:, None] * ld_bs_k
    b2_ptrs = b_ptrs + b2_offset * ld_b
    bs2_ptrs = bs_ptr + ((cols64 + b2_offset) // WEIGHT_ROWS)[None, :] * ld_bs_n + js[:, None] * ld_bs_k
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, num_k // NS):
        a = _dequantize(tl.load(a_ptrs, mask=row_ok[:, None], other=0),
                        tl.load(as_ptrs, mask=row_ok[:, None], other=0.0), 1, BLOCK, BM, K_STEP)
        b = _dequantize(tl.load(b_ptrs), tl.load(bs_ptrs), 0, BLOCK, K_STEP, BN)
        acc = tl.dot(a, b, acc)
        if TWO:
            acc2 = tl.dot(a, _dequantize(tl.load(b2_ptrs), tl.load(bs2_ptrs), 0, BLOCK, K_STEP, BN), acc2)
            b2_ptrs += K_STEP
            bs2_ptrs += NS * ld_bs_k
        a_ptrs += K_STEP
        as_ptrs += NS
        b_ptrs += K_STEP
        bs_ptrs += NS * ld_bs_k
    return acc, acc2


@triton.jit
def _values_gemm(a_ptr, a_rows, row_ok, ld_a, b_ptr, b_cols, ld_b, b2_offset, K,
                 TWO: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """``_scaled_gemm`` on operands that hold their MX values (``Recipe.dequantized``): a 16-bit
    GEMM whose tiles the pipeliner streams through shared memory like any other."""
    ks = tl.arange(0, DQ_K_STEP)
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * ld_a + ks[None, :]
    b_ptrs = b_ptr + b_cols.to(tl.int64)[None, :] * ld_b + ks[:, None]
    b2_ptrs = b_ptrs + b2_offset * ld_b
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K // DQ_K_STEP):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        acc = tl.dot(a, tl.load(b_ptrs), acc)
        if TWO:
            acc2 = tl.dot(a, tl.load(b2_ptrs), acc2)
            b2_ptrs += DQ_K_STEP
        a_ptrs += DQ_K_STEP
        b_ptrs += DQ_K_STEP
    return acc, acc2


@triton.jit
def _gemm(a_ptr, a_rows, row_ok, ld_a, as_ptr, ld_as, b_ptr, b_cols, ld_b, bs_ptr, ld_bs_n, ld_bs_k, b2_offset,
          K, TWO: tl.constexpr, BLOCK: tl.constexpr, WEIGHT_ROWS: tl.constexpr, MX: tl.constexpr,
          DQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # One branch per storage (an early return would not keep the compiler from building the rest)
    if DQ:
        acc, acc2 = _values_gemm(a_ptr, a_rows, row_ok, ld_a, b_ptr, b_cols, ld_b, b2_offset, K, TWO, BM, BN)
    elif MX:
        acc, acc2 = _dequantized_gemm(a_ptr, a_rows, row_ok, ld_a, as_ptr, ld_as, b_ptr, b_cols, ld_b, bs_ptr,
                                      ld_bs_n, ld_bs_k, b2_offset, K // BLOCK, TWO, BLOCK, WEIGHT_ROWS, BM, BN)
    else:
        acc, acc2 = _scaled_gemm(a_ptr, a_rows, row_ok, ld_a, as_ptr, ld_as, b_ptr, b_cols, ld_b, bs_ptr, ld_bs_n,
                                 ld_bs_k, b2_offset, K // BLOCK, TWO, BLOCK, WEIGHT_ROWS, BM, BN)
    return acc, acc2


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _gather_gemm_kernel(
    src_ptr, src_s_ptr, w_ptr, w_s_ptr, out_ptr, weight_ptr, counts_ptr, order_ptr,
    q_ptr, q_s_ptr, c_ptr, c_s_ptr,
    num_rows, F, K, num_experts, top_k,
    ld_src, ld_src_s, stride_we, ld_w, stride_wse, ld_ws_n, ld_ws_k, ld_out, ld_q, ld_qs, ld_c, ld_cs,
    E_PAD: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BACKWARD: tl.constexpr,
    SAVE: tl.constexpr, BLOCK: tl.constexpr, WEIGHT_ROWS: tl.constexpr, MX: tl.constexpr, DQ: tl.constexpr,
    EMULATE_RNE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr,
):
    """Forward (BACKWARD=False): a = act(Q(x)[token] @ Q(W_up)^T); F is the activation width, one
    program owns BN of its columns (and the matching up columns F + f of a gated h). SAVE: also
    store h in out and the token-axis quantization of w * a that dW_down needs.
    Backward: out = da = w * (Q(dout)[token] @ Q(W_down)) in float32, nothing else (the
    activation backward and dh's quantizations are ``_act_backward_kernel``'s)."""
    num_pid_m = tl.cdiv(num_rows, BM) + num_experts
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, F // BN, GROUP)
    expert, row0, row_end = _expert_tile(counts_ptr, pid_m, num_experts, E_PAD, BM)
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    assignment = tl.load(order_ptr + rows, mask=row_ok, other=0)
    f0 = pid_n * BN
    fs = f0 + tl.arange(0, BN)
    e64 = expert.to(tl.int64)
    TWO: tl.constexpr = GATED and not BACKWARD
    acc, acc2 = _gemm(src_ptr, assignment // top_k, row_ok, ld_src, src_s_ptr, ld_src_s,
                      w_ptr + e64 * stride_we, fs, ld_w, w_s_ptr + e64 * stride_wse, ld_ws_n, ld_ws_k,
                      F, K, TWO, BLOCK, WEIGHT_ROWS, MX, DQ, BM, BN)
    w = tl.load(weight_ptr + assignment, mask=row_ok, other=0.0)  # 0 on rows outside the tile's expert
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * ld_out + fs[None, :]
    if BACKWARD:
        tl.store(out_ptrs, acc * w[:, None], mask=row_ok[:, None])
    else:
        if SAVE:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
            if GATED:
                tl.store(out_ptrs + F, acc2.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        a = _act(acc, ACT) * acc2 if GATED else _act(acc, ACT)
        _store_rows(a, rows, row_ok, f0, q_ptr, ld_q, q_s_ptr, ld_qs, BLOCK, MX, DQ, EMULATE_RNE, BM, BN)
        if SAVE:
            _store_cols(a * w[:, None], pid_m * BM, f0, c_ptr, ld_c, c_s_ptr, ld_cs, BLOCK, MX, DQ,
                        EMULATE_RNE, BM, BN)


@triton.jit
def _act_backward_chunk(da_ptr, h_ptr, rows, row_ok, fs, F, ld_da, ld_h, GATED: tl.constexpr, ACT: tl.constexpr):
    """(d_gate, d_up) of gated rows (d_up unused otherwise): dh = act'(h) * da in float32; zeros
    past the expert's rows (_store_cols needs them: the wgrad reads whole tile slots)."""
    rows64 = rows.to(tl.int64)[:, None]
    da = tl.load(da_ptr + rows64 * ld_da + fs[None, :], mask=row_ok[:, None], other=0.0)
    h_ptrs = h_ptr + rows64 * ld_h + fs[None, :]
    gate = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(h_ptrs + F, mask=row_ok[:, None], other=0.0).to(tl.float32)
        return (da * _act_grad(gate, ACT)) * up, da * _act(gate, ACT)
    return da * _act_grad(gate, ACT), da


@triton.jit
def _act_backward_kernel(
    da_ptr, h_ptr, counts_ptr, q_ptr, q_s_ptr, c_ptr, c_s_ptr,
    num_rows, F, num_experts, ld_da, ld_h, ld_q, ld_qs, ld_c, ld_cs,
    E_PAD: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr, MX: tl.constexpr,
    DQ: tl.constexpr, EMULATE_RNE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr,
):
    """dh = act'(h) * da for one row tile and BN activation columns, quantized both ways: rows
    (q, q_s: dx's operand) and the token axis (c, c_s: dW_up's, ``_store_cols`` layout). Gated:
    d_gate = (da * act'(gate)) * up in columns [0, F) and d_up = da * act(gate) in [F, 2F), both
    from one read of da and gate (and one sigmoid).
    The tile goes by CHUNK rows, so that a few CTAs fit an SM (one's loads in flight while
    another computes: with the whole 128-row tile live it took 16 warps at 128 registers, one
    CTA per SM). Where a token-axis block is longer than a chunk (the "fp8" recipe's 128), a
    first pass stores the rows' quantization and takes each column's amax, and a second
    computes the chunks again (da and h from L2) to quantize them along the token axis."""
    pid_m = tl.program_id(0) // (F // BN)
    f0 = (tl.program_id(0) % (F // BN)) * BN
    expert, row0, row_end = _expert_tile(counts_ptr, pid_m, num_experts, E_PAD, BM)
    if expert >= num_experts:
        return
    fs = f0 + tl.arange(0, BN)
    rs = tl.arange(0, CHUNK)
    slot0 = pid_m * BM
    tl.static_assert(BLOCK <= CHUNK or BLOCK == BM, "a token-axis block spans one chunk or the whole tile")
    tl.static_assert(BLOCK <= CHUNK or not DQ, "dequantized operands are MX ones, blocks of 32")
    if BLOCK > CHUNK:
        amax_gate = tl.zeros((BN,), tl.int32)
        amax_up = tl.zeros((BN,), tl.int32)
        for i in range(BM // CHUNK):
            rows = row0 + i * CHUNK + rs
            row_ok = rows < row_end
            d_gate, d_up = _act_backward_chunk(da_ptr, h_ptr, rows, row_ok, fs, F, ld_da, ld_h, GATED, ACT)
            _store_rows(d_gate, rows, row_ok, f0, q_ptr, ld_q, q_s_ptr, ld_qs, BLOCK, MX, False, EMULATE_RNE,
                        CHUNK, BN)
            amax_gate = tl.maximum(amax_gate, _amax_bits(d_gate, 0))
            if GATED:
                _store_rows(d_up, rows, row_ok, F + f0, q_ptr, ld_q, q_s_ptr, ld_qs, BLOCK, MX, False,
                            EMULATE_RNE, CHUNK, BN)
                amax_up = tl.maximum(amax_up, _amax_bits(d_up, 0))
        inv_gate, s_gate = _block_scales(amax_gate, MX)
        inv_up, s_up = _block_scales(amax_up, MX)  # unused unless GATED (the compiler drops it)
        for i in range(BM // CHUNK):
            rows = row0 + i * CHUNK + rs
            d_gate, d_up = _act_backward_chunk(da_ptr, h_ptr, rows, rows < row_end, fs, F, ld_da, ld_h, GATED,
                                               ACT)
            _store_transposed(_encode(d_gate, inv_gate, 0, EMULATE_RNE), slot0 + i * CHUNK, f0, c_ptr,
                              ld_c, CHUNK, BN)
            if GATED:
                _store_transposed(_encode(d_up, inv_up, 0, EMULATE_RNE), slot0 + i * CHUNK, F + f0,
                                  c_ptr, ld_c, CHUNK, BN)
        cs_ptrs = c_s_ptr + (slot0 // BLOCK).to(tl.int64) * ld_cs + fs
        tl.store(cs_ptrs, s_gate)
        if GATED:
            tl.store(cs_ptrs + F, s_up)
    else:
        for i in range(BM // CHUNK):
            rows = row0 + i * CHUNK + rs
            row_ok = rows < row_end
            d_gate, d_up = _act_backward_chunk(da_ptr, h_ptr, rows, row_ok, fs, F, ld_da, ld_h, GATED, ACT)
            _store_rows(d_gate, rows, row_ok, f0, q_ptr, ld_q, q_s_ptr, ld_qs, BLOCK, MX, DQ, EMULATE_RNE,
                        CHUNK, BN)
            _store_cols(d_gate, slot0 + i * CHUNK, f0, c_ptr, ld_c, c_s_ptr, ld_cs, BLOCK, MX, DQ, EMULATE_RNE,
                        CHUNK, BN)
            if GATED:
                _store_rows(d_up, rows, row_ok, F + f0, q_ptr, ld_q, q_s_ptr, ld_qs, BLOCK, MX, DQ, EMULATE_RNE,
                            CHUNK, BN)
                _store_cols(d_up, slot0 + i * CHUNK, F + f0, c_ptr, ld_c, c_s_ptr, ld_cs, BLOCK, MX, DQ,
                            EMULATE_RNE, CHUNK, BN)


@triton.jit
def _scatter_gemm_kernel(
    src_ptr, src_s_ptr, w_ptr, w_s_ptr, out_ptr, counts_ptr, order_ptr,
    num_rows, N, K, num_experts,
    ld_src, ld_src_s, stride_we, ld_w, stride_wse, ld_ws_n, ld_ws_k, ld_out,
    E_PAD: tl.constexpr, BLOCK: tl.constexpr, WEIGHT_ROWS: tl.constexpr, MX: tl.constexpr, DQ: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr,
):
    """out[order[r]] = Q(src)[r] @ Q(W_e)^T for expert-sorted rows r (N columns per row)."""
    num_pid_m = tl.cdiv(num_rows, BM) + num_experts
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, N // BN, GROUP)
    expert, row0, row_end = _expert_tile(counts_ptr, pid_m, num_experts, E_PAD, BM)
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    cols = pid_n * BN + tl.arange(0, BN)
    e64 = expert.to(tl.int64)
    acc, _ = _gemm(src_ptr, rows, row_ok, ld_src, src_s_ptr, ld_src_s,
                   w_ptr + e64 * stride_we, cols, ld_w, w_s_ptr + e64 * stride_wse, ld_ws_n, ld_ws_k,
                   0, K, False, BLOCK, WEIGHT_ROWS, MX, DQ, BM, BN)
    assignment = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tl.store(out_ptr + assignment[:, None] * ld_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _gather_cols_kernel(
    src_ptr, counts_ptr, order_ptr, c_ptr, c_s_ptr,
    P, num_experts, top_k, ld_src, ld_c, ld_cs,
    E_PAD: tl.constexpr, BLOCK: tl.constexpr, MX: tl.constexpr, DQ: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """c / c_s (``_store_cols`` layout): src[token(r), p] quantized along each expert's rows."""
    pid_m = tl.program_id(0) // (P // BN)
    pid_n = tl.program_id(0) % (P // BN)
    expert, row0, row_end = _expert_tile(counts_ptr, pid_m, num_experts, E_PAD, BM)
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    token = (tl.load(order_ptr + rows, mask=row_ok, other=0) // top_k).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    v = tl.load(src_ptr + token[:, None] * ld_src + cols[None, :], mask=row_ok[:, None], other=0.0)
    _store_cols(v.to(tl.float32), pid_m * BM, pid_n * BN, c_ptr, ld_c, c_s_ptr, ld_cs, BLOCK, MX, DQ,
                EMULATE_RNE, BM, BN)


@triton.jit
def _wgrad_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, dw_ptr, counts_ptr,
    P, Q, num_experts, ld_a, ld_as, ld_b, ld_bs, stride_de, stride_dp,
    E_PAD: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, MX: tl.constexpr, DQ: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr,
):
    """dW[e, p, q] = sum over expert e's rows r of Q(A)[p, r] Q(B)[q, r] (operands stored
    transposed in tile slots, see ``_store_cols``)."""
    num_p = P // BM
    num_q = Q // BN
    pid = tl.program_id(0)
    expert = pid // (num_p * num_q)
    pid_p, pid_q = _swizzle(pid % (num_p * num_q), num_p, num_q, GROUP)
    e, cnt, _ = _expert_rows(counts_ptr, num_experts, E_PAD)
    tiles = (cnt + TILE - 1) // TILE
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tl.cumsum(tiles, 0) - tiles, 0), 0).to(tl.int64)
    num_rows = tl.sum(tl.where(mine, cnt, 0), 0)
    ps = (pid_p * BM + tl.arange(0, BM)).to(tl.int64)
    qs = (pid_q * BN + tl.arange(0, BN)).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # The expert's tiles are consecutive slots; rows past its count are zeros: no masks.
    if DQ:  # operands holding their MX values: a 16-bit GEMM
        slots = first_tile * TILE + tl.arange(0, DQ_K_STEP)
        a_ptrs = a_ptr + ps[:, None] * ld_a + slots[None, :]
        b_ptrs = b_ptr + qs[None, :] * ld_b + slots[:, None]
        for _ in range(0, tl.cdiv(num_rows, DQ_K_STEP)):
            acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
            a_ptrs += DQ_K_STEP
            b_ptrs += DQ_K_STEP
    elif MX:  # a whole tile per step, dequantized (see _dequantized_gemm)
        NS: tl.constexpr = TILE // BLOCK
        slots = first_tile * TILE + tl.arange(0, TILE)
        blocks = first_tile * NS + tl.arange(0, NS)
        for _ in range(0, tl.cdiv(num_rows, TILE)):
            sa = tl.load(a_s_ptr + blocks[None, :] * ld_as + ps[:, None])
            sb = tl.load(b_s_ptr + blocks[:, None] * ld_bs + qs[None, :])
            a = _dequantize(tl.load(a_ptr + ps[:, None] * ld_a + slots[None, :]), sa, 1, BLOCK, BM, TILE)
            b = _dequantize(tl.load(b_ptr + qs[None, :] * ld_b + slots[:, None]), sb, 0, BLOCK, TILE, BN)
            acc = tl.dot(a, b, acc)
            slots += TILE
            blocks += NS
    else:
        slots = first_tile * TILE + tl.arange(0, BLOCK)
        a_ptrs = _fp8_ptr(a_ptr) + ps[:, None] * ld_a + slots[None, :]
        b_ptrs = _fp8_ptr(b_ptr) + qs[None, :] * ld_b + slots[:, None]
        first_block = first_tile * (TILE // BLOCK)
        num_k = tl.cdiv(num_rows, BLOCK)
        sa = tl.load(a_s_ptr + first_block * ld_as + ps)
        sb = tl.load(b_s_ptr + first_block * ld_bs + qs)
        for j in range(0, num_k):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            # The next step's scales (the last step reloads its own), a step ahead so that their
            # latency hides behind this step's MMA and rescale. The pipeliner streams a and b
            # only: loaded in the step that used them, the scales (16 of a thread's 18 loads per
            # step on sm_90 are column scales) were waited on before the step's rescale began.
            nxt = first_block + tl.minimum(j + 1, num_k - 1)
            sa_next = tl.load(a_s_ptr + nxt * ld_as + ps)
            sb_next = tl.load(b_s_ptr + nxt * ld_bs + qs)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
            sa = sa_next
            sb = sb_next
            a_ptrs += BLOCK
            b_ptrs += BLOCK
    tl.store(dw_ptr + expert.to(tl.int64) * stride_de + ps[:, None] * stride_dp + qs[None, :],
             acc.to(dw_ptr.dtype.element_ty))


@triton.jit
def _mx_values_kernel(src_ptr, rows_ptr, cols_ptr, M, N, ld_src, ld_rows, ld_cols,
                      ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
    """The MX values of src [M, N] from one read: blocked along N into rows[m, n] (ROWS), blocked
    along M into cols[n, m] (COLS; M a multiple of BLOCK)."""
    ms = tl.program_id(0) * BM + tl.arange(0, BM)
    ns = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    m_ok = (ms < M)[:, None]
    ms64 = ms.to(tl.int64)[:, None]
    v = tl.load(src_ptr + ms64 * ld_src + ns[None, :], mask=m_ok, other=0.0).to(tl.float32)
    if ROWS:
        tl.store(rows_ptr + ms64 * ld_rows + ns[None, :], _mx_values(v, 1, BLOCK, EMULATE_RNE), mask=m_ok)
    if COLS:
        tl.store(cols_ptr + ns[None, :] * ld_cols + ms64, _mx_values(v, 0, BLOCK, EMULATE_RNE), mask=m_ok)


@triton.jit
def _weight_grad_kernel(y_ptr, dout_ptr, idx_ptr, dw_ptr, H, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """dw[t, k] = <dout[t], y[t*K + k]> in fp32; 0 for dropped slots (whose y rows are unwritten)."""
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, K_PAD)
    slot = t * TOP_K + ks
    use = (ks < TOP_K) & (tl.load(idx_ptr + slot, mask=ks < TOP_K, other=-1) >= 0)
    acc = tl.zeros((K_PAD, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        g = tl.load(dout_ptr + t * H + cols, mask=cols < H, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + slot[:, None] * H + cols[None, :], mask=use[:, None] & (cols < H)[None, :], other=0.0)
        acc += y.to(tl.float32) * g[None, :]
    tl.store(dw_ptr + slot, tl.sum(acc, 1), mask=ks < TOP_K)


# ----------------------------------------------------------------------------- launchers

def _row_tiles(meta: RoutingMeta) -> int:
    return triton.cdiv(meta.order.numel(), ROW_TILE) + meta.num_experts


def _data_buffers(shape: tuple, scale_shape: tuple, r: Recipe, device):
    """An operand's (data, scales) buffers; scales None where the data hold MX values. Float
    buffers come from ``new_buffer`` (NaN in tests that poison them: unwritten rows would show)."""
    if r.dequantized:
        return new_buffer(shape, MX_VALUES_DTYPE, device), None
    return torch.empty(shape, dtype=torch.uint8, device=device), new_buffer(scale_shape, torch.float32, device)


def _cols_buffers(meta: RoutingMeta, width: int, r: Recipe, device):
    """Token-axis-quantized operand [width, tiles * ROW_TILE] (one slot of 128 per row tile) and
    its scales [tiles * ROW_TILE / block, width]."""
    tiles = _row_tiles(meta)
    return _data_buffers((width, tiles * ROW_TILE), (tiles * (ROW_TILE // r.block), width), r, device)


def _scales(pair: tuple) -> torch.Tensor:
    """The scale argument of a (data, scales) operand; for MX values (no scales) a stand-in the
    kernels never read."""
    data, scale = pair
    return data if scale is None else scale


def _weight_args(w_data: torch.Tensor, w_scale: torch.Tensor) -> tuple:
    return (w_data.stride(0), w_data.stride(1), w_scale.stride(0), w_scale.stride(1), w_scale.stride(2))


def mx_values(x: torch.Tensor, r: Recipe, rows: bool = True, cols: bool = False) -> tuple:
    """The MX operands of x [M, N] as values (``Recipe.dequantized``), from one read: (blocked
    along N, [M, N]; blocked along M, stored [N, M]), each None unless asked for. The same numbers
    as ``mxfp8.dequantize(mxfp8.quantize(x))``, which would write and re-read the FP8 bytes and
    a float32 copy (tests/quant/test_mxfp8.py compares the two)."""
    M, N = x.shape
    if not r.mx or r.block > MX_VALUES_TILE:
        raise ValueError(f"mx_values: recipe {r.name!r} has no MX blocks of at most {MX_VALUES_TILE} values")
    if N % TILE_N or (cols and M % r.block):
        raise ValueError(f"mx_values: shape {tuple(x.shape)} is not in whole blocks")
    x = x.contiguous()
    out_rows = new_buffer((M, N), MX_VALUES_DTYPE, x.device) if rows else None
    out_cols = new_buffer((N, M), MX_VALUES_DTYPE, x.device) if cols else None
    _mx_values_kernel[(triton.cdiv(M, MX_VALUES_TILE), N // TILE_N)](
        x, x if out_rows is None else out_rows, x if out_cols is None else out_cols, M, N, x.stride(0),
        N, M, ROWS=rows, COLS=cols, BLOCK=r.block, EMULATE_RNE=INTERPRETING, BM=MX_VALUES_TILE, BN=TILE_N,
        **MX_VALUES_LAUNCH)
    return out_rows, out_cols


def gather_up(xq, w_up_q, weight, meta: RoutingMeta, activation: str, r: Recipe, dtype, save: bool):
    """Forward up-projection. Returns (h [rows, U] dtype or None, (a rows-quantized: uint8
    [rows, F], scales [rows, F/block]), (w*a cols-quantized: [F, tiles * 128], scales) or None);
    with ``r.dequantized`` the data are MX values and the scales None."""
    x_data, w_data = xq[0], w_up_q[0]
    gated = is_gated(activation)
    num_rows = meta.order.numel()
    E, U, H = w_data.shape
    F = U // 2 if gated else U
    dev = x_data.device
    h = new_buffer((num_rows, U), dtype, dev) if save else None
    a_rows = _data_buffers((num_rows, F), (num_rows, F // r.block), r, dev)
    a_cols = _cols_buffers(meta, F, r, dev) if save else a_rows
    x_scale, w_scale, a_s, a_cs = _scales(xq), _scales(w_up_q), _scales(a_rows), _scales(a_cols)
    _gather_gemm_kernel[(_row_tiles(meta) * (F // TILE_N),)](
        x_data, x_scale, w_data, w_scale, h if save else a_s, weight, meta.counts, meta.order,
        a_rows[0], a_s, a_cols[0], a_cs, num_rows, F, H, E, meta.top_k,
        x_data.stride(0), x_scale.stride(0), *_weight_args(w_data, w_scale),
        U, F, a_s.stride(0), a_cols[0].stride(0), a_cs.stride(0),
        E_PAD=_pow2(E), GATED=gated, ACT=ACT_CODES[activation], BACKWARD=False, SAVE=save,
        BLOCK=r.block, WEIGHT_ROWS=r.weight_rows, MX=r.mx, DQ=r.dequantized, EMULATE_RNE=INTERPRETING,
        BM=ROW_TILE, BN=TILE_N, GROUP=GROUP_M, **LAUNCH)
    return h, a_rows, (a_cols if save else None)


def down_dgrad(dq, w_down_t, h, weight, meta: RoutingMeta, activation: str, r: Recipe):
    """dh = act'(h) * w * (Q(dout)[token] @ Q(W_down)), quantized both ways:
    ((uint8 [rows, U], scales [rows, U/block]), (uint8 [U, tiles * 128], scales)); MX values and
    None scales with ``r.dequantized``."""
    d_data, d_scale, w_data, w_scale = dq[0], _scales(dq), w_down_t[0], _scales(w_down_t)
    num_rows = h.shape[0]
    E, F, H = w_data.shape
    da = new_buffer((num_rows, F), torch.float32, h.device)  # float32: the fused epilogue's values
    _gather_gemm_kernel[(_row_tiles(meta) * (F // TILE_N),)](
        d_data, d_scale, w_data, w_scale, da, weight, meta.counts, meta.order,
        da, da, da, da, num_rows, F, H, E, meta.top_k,  # no quantized outputs
        d_data.stride(0), d_scale.stride(0), *_weight_args(w_data, w_scale),
        da.stride(0), 0, 0, 0, 0,
        E_PAD=_pow2(E), GATED=False, ACT=0, BACKWARD=True, SAVE=False,
        BLOCK=r.block, WEIGHT_ROWS=r.weight_rows, MX=r.mx, DQ=r.dequantized, EMULATE_RNE=INTERPRETING,
        BM=ROW_TILE, BN=TILE_N, GROUP=GROUP_M, **LAUNCH)
    return act_backward(da, h, meta, activation, r)


def act_backward(da: torch.Tensor, h: torch.Tensor, meta: RoutingMeta, activation: str, r: Recipe):
    """dh = act'(h) * da for expert-sorted rows (da float32 [rows, F], h [rows, U]), quantized
    both ways as ``down_dgrad`` returns it."""
    num_rows, U = h.shape
    F = da.shape[1]
    dev = h.device
    dh_rows = _data_buffers((num_rows, U), (num_rows, U // r.block), r, dev)
    dh_cols = _cols_buffers(meta, U, r, dev)
    (dh_q, dh_c), dh_s, dh_cs = (dh_rows[0], dh_cols[0]), _scales(dh_rows), _scales(dh_cols)
    _act_backward_kernel[(_row_tiles(meta) * (F // TILE_N),)](
        da, h, meta.counts, dh_q, dh_s, dh_c, dh_cs, num_rows, F, meta.num_experts,
        da.stride(0), h.stride(0), dh_q.stride(0), dh_s.stride(0), dh_c.stride(0), dh_cs.stride(0),
        E_PAD=_pow2(meta.num_experts), GATED=is_gated(activation), ACT=ACT_CODES[activation], BLOCK=r.block,
        MX=r.mx, DQ=r.dequantized, EMULATE_RNE=INTERPRETING, BM=ROW_TILE, BN=TILE_N, CHUNK=ACT_BACKWARD_CHUNK,
        **ACT_BACKWARD_LAUNCH)
    return dh_rows, dh_cols


def scatter_gemm(src_q, w_q, meta: RoutingMeta, r: Recipe, dtype) -> torch.Tensor:
    """buf [T*K, N] (dtype): buf[order[r]] = Q(src)[r] @ Q(W_e)^T; dropped slots left unwritten."""
    s_data, s_scale, w_data, w_scale = src_q[0], _scales(src_q), w_q[0], _scales(w_q)
    E, N, K = w_data.shape
    num_rows = meta.order.numel()
    out = new_buffer((num_rows, N), dtype, s_data.device)
    # The output is not quantized: with MX values any column tile will do (no weight-scale blocks)
    bn = SCATTER_VALUES_TILE_N if r.dequantized and N % SCATTER_VALUES_TILE_N == 0 else TILE_N
    _scatter_gemm_kernel[(_row_tiles(meta) * (N // bn),)](
        s_data, s_scale, w_data, w_scale, out, meta.counts, meta.order, num_rows, N, K, E,
        s_data.stride(0), s_scale.stride(0), *_weight_args(w_data, w_scale), out.stride(0),
        E_PAD=_pow2(E), BLOCK=r.block, WEIGHT_ROWS=r.weight_rows, MX=r.mx, DQ=r.dequantized, BM=ROW_TILE,
        BN=bn, GROUP=GROUP_M, **LAUNCH)
    return out


def gather_cols(src: torch.Tensor, meta: RoutingMeta, r: Recipe):
    """src [T, P] gathered by token into expert-sorted rows, quantized along the token axis:
    (uint8 [P, tiles * ROW_TILE], float32 scales [tiles * ROW_TILE / block, P]; MX values and None
    with ``r.dequantized``)."""
    P = src.shape[1]
    out = _cols_buffers(meta, P, r, src.device)
    data, scale = out[0], _scales(out)
    _gather_cols_kernel[(_row_tiles(meta) * (P // TILE_N),)](
        src, meta.counts, meta.order, data, scale, P, meta.num_experts, meta.top_k,
        src.stride(0), data.stride(0), scale.stride(0),
        E_PAD=_pow2(meta.num_experts), BLOCK=r.block, MX=r.mx, DQ=r.dequantized, EMULATE_RNE=INTERPRETING,
        BM=ROW_TILE, BN=TILE_N, **GATHER_COLS_LAUNCH)
    return out


def wgrad_launch(meta: RoutingMeta, P: int, Q: int, r: Recipe) -> WgradLaunch:
    """The weight-gradient launch for dW [E, P, Q]: ``wgrad_force`` if set, else by the mean rows per
    expert (routed slots, dropped ones included: known on the host, no sync)."""
    if wgrad_force is not None:
        chosen = {c.name: c for c in WGRAD_CANDIDATES}.get(wgrad_force)
        if chosen is None:
            raise ValueError(f"unknown weight-gradient launch {wgrad_force!r}; candidates: "
                             f"{[c.name for c in WGRAD_CANDIDATES]}")
        if not chosen.fits(P, Q):
            raise ValueError(f"weight-gradient launch {chosen.name}: its {chosen.bm} x {chosen.bn} tile does not "
                             f"divide dW's {P} x {Q}")
        return chosen
    mean_rows = meta.order.numel() / meta.num_experts
    for most_rows, candidate in WGRAD_BY_ROWS[r.name]:
        if mean_rows <= most_rows and candidate.fits(P, Q):
            return candidate
    return WGRAD_DEFAULT


def grouped_wgrad(a_cols, b_cols, meta: RoutingMeta, r: Recipe, dtype) -> torch.Tensor:
    """dW [E, P, Q] (dtype) from two operands made by ``gather_cols`` / the GEMM epilogues."""
    a, a_s, b, b_s = a_cols[0], _scales(a_cols), b_cols[0], _scales(b_cols)
    E, P, Q = meta.num_experts, a.shape[0], b.shape[0]
    launch = wgrad_launch(meta, P, Q, r)
    dw = new_buffer((E, P, Q), dtype, a.device)  # every element is written
    _wgrad_kernel[(E * (P // launch.bm) * (Q // launch.bn),)](
        a, a_s, b, b_s, dw, meta.counts, P, Q, E, a.stride(0), a_s.stride(0), b.stride(0), b_s.stride(0),
        dw.stride(0), dw.stride(1),
        E_PAD=_pow2(E), BLOCK=r.block, TILE=ROW_TILE, MX=r.mx, DQ=r.dequantized, BM=launch.bm, BN=launch.bn,
        GROUP=GROUP_M, **launch.options())
    return dw


def weight_grad(y: torch.Tensor, dout: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """Routing-weight gradient [T, K] fp32 from the saved expert outputs y [T*K, H]."""
    T, K = topk_idx.shape
    dw = torch.empty(T, K, dtype=torch.float32, device=y.device)
    _weight_grad_kernel[(T,)](y, dout, topk_idx, dw, y.shape[1], TOP_K=K, K_PAD=_pow2(K),
                              BLOCK_H=min(512, _pow2(y.shape[1])))
    return dw
