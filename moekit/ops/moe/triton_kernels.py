"""Triton kernels of the fused MoE layer, and their launchers.

Rows are (token, slot) assignments sorted by expert (see ``triton_meta``). Every grouped
kernel finds its expert from ``counts`` on the device. The row-tiled kernels are persistent:
a fixed number of programs (``persistent_programs``: a few per SM, never more than the
worst case of ``cdiv(T*K, BLOCK_M) + E`` row tiles) loop over the tiles that hold some
expert's rows, a count each program reads from ``counts``. Dropped slots (expert -1: under
expert parallelism about half of a rank's slots, or past an expert's capacity) thus cost no
program, and the host never waits for the count.

- ``gather_gemm``: rows of ``src`` gathered by token in the prologue (no permuted copy),
  times the expert's weight; the epilogue either applies the activation (forward
  up-projection: stores pre-activation ``h`` and activation ``a``) or its backward
  (gradient of the down-projection's input, weighted, then through the activation: ``dh``,
  and the routing weights' gradient ``<dout[t], y[t*K + k]>`` from the same tile).
- ``scatter_gemm``: expert-sorted rows times the expert's weight, each result row written at
  its original (token, slot) position of a ``[T*K, H]`` buffer (no un-permute pass).
- ``combine``: ``out[t] = sum_k w[t, k] * buf[t*K + k]`` in fp32, skipping dropped slots
  (a deterministic sum over K instead of atomics).
- ``grouped_wgrad``: ``dW[e] = A_e^T B_e`` over expert e's rows (the token axis), with either
  side gathered by token and ``A`` optionally scaled by the routing weight. ``_wgrad2_kernel``
  computes the same with both operands of Hopper's wgmma in shared memory and a 128-row token
  step (opt-in with ``MOEKIT_TRITON_WGRAD2=1`` until checked and timed on a GPU;
  ``benchmarks/compile_check_moe_wgrad.py`` shows how each builds for sm_90).

The weight operand of the row-tiled GEMMs can be read through TMA tensor descriptors
(``TMA`` configs, opt-in with ``MOEKIT_TRITON_TMA=1`` until measured on a GPU; gathered rows
cannot use TMA). ``benchmarks/gpu_check_moe.py --compile-only 90`` builds every variant for
sm_90 without a GPU.

``triton_reference`` holds a plain-PyTorch counterpart of each launcher.
"""

from __future__ import annotations

import copy
import functools
import os

import torch
import triton
import triton.language as tl

from moekit.ops.activations import is_gated
from moekit.ops.dot_precision import dot_precision
from moekit.ops.moe.triton_meta import RoutingMeta, new_buffer

ACT_CODES = {"swiglu": 0, "geglu": 1, "gelu": 1}  # 0: SiLU, 1: exact (erf) GELU

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Opt-in until checked and timed on a GPU: the wgrad kernel that keeps both operands of its
# Hopper dot in shared memory (``_wgrad2_kernel``); ``auto`` keeps the faster without checking results.
WGRAD2 = os.environ.get("MOEKIT_TRITON_WGRAD2") == "1"

# Opt-in until measured on a GPU: configs that read the weight operand through TMA descriptors
# (tested in the interpreter; the autotuner would race them against the pointer-load tiles).
TMA_CONFIGS = os.environ.get("MOEKIT_TRITON_TMA") == "1"


def _configs(shapes, tma: bool | None = None):
    """Configs of (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tiles; ``tma`` only for the kernels
    that take a TMA switch (a kernel refuses keyword arguments it does not declare)."""
    extra = {} if tma is None else {"TMA": tma}
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, **extra},
                          num_warps=w, num_stages=s) for m, n, k, w, s in shapes]


# Calls with at most this many rows per expert on average (decoding: a batch of 16 at top-8 over
# 64 experts gives 2) read every weight once and compute little. Their time depends on how many
# experts have rows, so how many tiles there are to spread over the SMs, which follows the row
# count: each power of two of it is tuned on its own (the ``ROWS_CLASS`` key), over every tile
# including some of their own (16 or 32 rows, narrow columns: many tiles, so no SM idles through a
# last round while the others stream weights). Larger calls share one class, tuned over the other
# tiles only. (The row count includes dropped slots: under expert parallelism a rank's share.)
FEW_ROWS_PER_EXPERT = 16
FEW_ROWS_MAX_BLOCK_M = 32

if _INTERPRET:  # the interpreter runs on the CPU: one small tile, no tuning
    GEMM_CONFIGS = _configs([(16, 32, 16, 4, 1)], tma=False)
    WGRAD_CONFIGS = _configs([(16, 32, 16, 4, 1)])
else:  # Hopper-friendly; every tile here fits the H200's shared memory at its stage count
    _TILES = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)]
    _FEW_ROWS_TILES = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 64, 4, 6),
                       (32, 64, 128, 4, 4)]
    GEMM_CONFIGS = _configs(_TILES + [(128, 128, 128, 8, 3)] + _FEW_ROWS_TILES, tma=False)
    if TMA_CONFIGS:  # the same tiles with TMA weight loads, kept where the strides allow (_prune)
        GEMM_CONFIGS += _configs(_TILES, tma=True)
    # BLOCK_M / BLOCK_N tile dW's rows / columns, BLOCK_K the token axis. Experts with few rows
    # (deepseek-v3: ~256) make the main loop short: tiles small enough for two CTAs per SM let
    # one's epilogue (the dW store) overlap the other's loads.
    WGRAD_CONFIGS = _configs([(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 4, 3),
                              (64, 128, 64, 4, 3), (128, 128, 128, 8, 3)])
    # _wgrad2_kernel: a 128-row token step halves the ~4-step loop of ~256 rows per expert. Each
    # tile builds for sm_90 without spills (benchmarks/compile_check_moe_wgrad.py); 128x256x128
    # and 64x256x128 spill in the weighted variant and are left out.
    WGRAD2_CONFIGS = _configs([(128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 128, 4, 3),
                               (128, 128, 128, 4, 3), (128, 128, 64, 4, 4), (64, 128, 128, 4, 3)])
if _INTERPRET:
    WGRAD2_CONFIGS = WGRAD_CONFIGS


def rows_class(num_rows: int, num_experts: int) -> int:
    """A call's tuning class: its row count rounded up to a power of two while that is at most
    FEW_ROWS_PER_EXPERT per expert, else 0."""
    return triton.next_power_of_2(max(1, num_rows)) if num_rows <= FEW_ROWS_PER_EXPERT * num_experts else 0


def _for_rows(configs, tuning_class: int):
    """The configs a call of this class may race: all for few rows per expert; else those with
    more than FEW_ROWS_MAX_BLOCK_M rows (all where there is none, e.g. the interpreter's tile)."""
    if tuning_class:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] > FEW_ROWS_MAX_BLOCK_M] or configs


def min_block_n(configs, tuning_class: int) -> int:
    """The narrowest column tile a call of this class may take from ``configs`` (a kernel's live
    list: tests pin some), so how many column-tile partials it can write."""
    return min(c.kwargs["BLOCK_N"] for c in _for_rows(configs, tuning_class))


def tma_variants(config) -> tuple:
    """The TMA settings a pointer-load GEMM config can be raced with: TMA_CONFIGS repeats the
    larger tiles only."""
    return (False, True) if config.kwargs["BLOCK_M"] > FEW_ROWS_MAX_BLOCK_M else (False,)


def tma_ok(w: torch.Tensor) -> bool:
    """Can TMA read this [E, D1, D2] weight: D2 contiguous, 16-byte aligned base and strides."""
    size = w.element_size()
    return (w.is_cuda and w.stride(2) == 1 and w.data_ptr() % 16 == 0
            and (w.stride(0) * size) % 16 == 0 and (w.stride(1) * size) % 16 == 0)


def _fit_operands(configs, named_args, **kwargs):
    """The tiles are sized for 16-bit operands: 4-byte (float32) ones take them at half BLOCK_K,
    so that shared memory holds as many bytes as in bf16. Without this, the tiles that exceed shared
    memory are each compiled (minutes in all) only for the launch to refuse them."""
    operands = [v for v in named_args.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if _INTERPRET or not operands or operands[0].element_size() < 4:
        return configs
    halved = []
    for c in configs:
        c = copy.copy(c)
        c.kwargs = {**c.kwargs, "BLOCK_K": max(16, c.kwargs["BLOCK_K"] // 2)}
        if all(c.all_kwargs() != h.all_kwargs() for h in halved):
            halved.append(c)
    return halved


def _prune(configs, named_args, **kwargs):
    configs = _fit_operands(_for_rows(configs, named_args["ROWS_CLASS"]), named_args)
    return [c for c in configs if not c.kwargs["TMA"] or named_args["TMA_OK"]]


def _tma_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


# Without ragged K tiles the main loop's loads need only the row / column masks.
_EVEN_K = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


# Programs of a persistent launch per SM: two, so a config small enough for two CTAs per SM
# keeps both busy (one's epilogue under the other's loads); a larger config runs them one after
# the other, which costs only the start of a program. The CPU interpreter runs programs one by
# one: a few, so each loops over several tiles (the tests also pin other counts).
PROGRAMS_PER_SM = 2
CPU_PROGRAMS = 3


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(tiles: int, device: torch.device, per_sm: int = PROGRAMS_PER_SM) -> int:
    """Programs for a persistent launch over at most ``tiles`` tiles: ``per_sm`` per SM, never more
    than ``tiles`` (at least 1)."""
    if device.type == "cuda":
        cap = per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        cap = CPU_PROGRAMS
    return max(1, min(tiles, cap))


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Walk GROUP_M row tiles across all column tiles before moving on: an expert's weight
    tiles and a row tile's activations are reused from L2."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _expert_rows(counts_ptr, num_experts, E_PAD: tl.constexpr):
    """Per-expert vectors: expert ids, counts, and the row where each expert's block starts."""
    e = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    return e, cnt, tl.cumsum(cnt, 0) - cnt


@triton.jit
def _valid_row_tiles(counts_ptr, num_experts, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row tiles holding some expert's rows (``sum_e cdiv(counts[e], BLOCK_M)``): the loop bound of a
    persistent kernel, read on the device."""
    e = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    return tl.sum((cnt + BLOCK_M - 1) // BLOCK_M, 0)


@triton.jit
def _expert_tile(counts_ptr, pid_m, num_experts, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, end row) of row tile ``pid_m``; expert == num_experts past the last tile."""
    e, cnt, start = _expert_rows(counts_ptr, num_experts, E_PAD)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    row0 = tl.sum(tl.where(mine, start, 0), 0)
    row_end = row0 + tl.sum(tl.where(mine, cnt, 0), 0)
    return expert, row0 + (pid_m - first_tile) * BLOCK_M, row_end


@triton.jit
def _weight_desc(w_ptr, num_experts, D1, D2, stride_we, stride_w1, B_K_MAJOR: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """TMA descriptor of the [E, D1, D2] weight (D2 contiguous), tiled as B's [N, K] or [K, N] block."""
    BLOCK_D1: tl.constexpr = BLOCK_N if B_K_MAJOR else BLOCK_K
    BLOCK_D2: tl.constexpr = BLOCK_K if B_K_MAJOR else BLOCK_N
    return tl.make_tensor_descriptor(w_ptr, shape=[num_experts, D1, D2], strides=[stride_we, stride_w1, 1],
                                     block_shape=[1, BLOCK_D1, BLOCK_D2])


@triton.jit
def _load_b(b_ptrs, b_mask, w_desc, expert, n0, k0, TMA: tl.constexpr, B_K_MAJOR: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """B's [BLOCK_K, BLOCK_N] tile: a TMA load of expert ``expert``'s weight (out of range is 0), or pointers."""
    if TMA:
        if B_K_MAJOR:
            return tl.trans(tl.reshape(w_desc.load([expert, n0, k0]), (BLOCK_N, BLOCK_K)))
        return tl.reshape(w_desc.load([expert, k0, n0]), (BLOCK_K, BLOCK_N))
    return tl.load(b_ptrs, mask=b_mask, other=0.0)


@triton.jit
def _expert_gemm(a_ptr, a_rows, row_ok, stride_am, b_ptr, b_cols, col_ok, stride_bn, stride_bk, K, b2_cols,
                 w_desc, expert, n0,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, DUAL: tl.constexpr, TMA: tl.constexpr, B_K_MAJOR: tl.constexpr,
                 PRECISION: tl.constexpr):
    """acc[i, j] = sum_k A[a_rows[i], k] * B[k, b_cols[j]] (A rows contiguous), fp32.

    B is expert ``expert``'s weight: read through ``b_ptr`` (already at that expert) or, with
    ``TMA``, through the descriptor ``w_desc`` from column ``n0`` on. With ``DUAL`` a second
    accumulator takes the same A against the B columns ``b2_cols`` further on (a gated
    activation's up half beside its gate half); otherwise it is unused.
    """
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    b_ptrs = b_ptr + b_cols.to(tl.int64)[None, :] * stride_bn + ks.to(tl.int64)[:, None] * stride_bk
    b2_offset = b2_cols * stride_bn  # within one expert: fits int32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a_mask = row_ok[:, None]
            b_mask = col_ok[None, :]
        else:
            k_ok = ks < K - k0
            a_mask = row_ok[:, None] & k_ok[None, :]
            b_mask = k_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = _load_b(b_ptrs, b_mask, w_desc, expert, n0, k0, TMA, B_K_MAJOR, BLOCK_N, BLOCK_K)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if DUAL:
            b2 = _load_b(b_ptrs + b2_offset, b_mask, w_desc, expert, n0 + b2_cols, k0, TMA, B_K_MAJOR,
                         BLOCK_N, BLOCK_K)
            acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc, acc2


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))


@triton.jit
def _act_grad(g, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))
    return 0.5 * (1.0 + tl.erf(g * 0.7071067811865476)) + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)


# ----------------------------------------------------------------------------- kernels

# _ROW_TILED_LOOPS: the persistent tile loops below. ``disable_licm`` and the tile's body under an
# always-true guard (a region loop-invariant code motion does not hoist from) keep the compiler
# from lifting a tile's index vectors, laid out like the accumulator, above the loop, where they
# would stay live through every main loop: up to 60 more registers and more spills in the sm_90
# builds (benchmarks/compile_check_moe.py).

# dweight_ptr gets per-column-tile partials: zeroed again once tuning is done, because configs
# with narrower tiles write more partial rows than the chosen one overwrites.
@triton.autotune(configs=GEMM_CONFIGS, key=["F", "K", "GATED", "BACKWARD", "TMA_OK", "ROWS_CLASS"],
                 reset_to_zero=["dweight_ptr"], prune_configs_by={"early_config_prune": _prune})
@_EVEN_K
@triton.jit
def _gather_gemm_kernel(
    src_ptr, w_ptr, h_ptr, out_ptr, counts_ptr, order_ptr, weight_ptr, dweight_ptr,
    num_rows, F, K, num_experts, top_k, W_D1, W_D2, TMA_OK, ROWS_CLASS,
    stride_src, stride_we, stride_wn, stride_wk, stride_h, stride_out,
    E_PAD: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BACKWARD: tl.constexpr,
    STORE_H: tl.constexpr, WEIGHT_GRAD: tl.constexpr, B_K_MAJOR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, EVEN_K: tl.constexpr,
):
    # Forward of a gated activation: a tile's BLOCK_N weight rows are BLOCK_N/2 gate rows and
    # the matching up rows, in two accumulators, so the epilogue has both halves at hand.
    DUAL: tl.constexpr = GATED and not BACKWARD
    TILE_F: tl.constexpr = BLOCK_N // 2 if DUAL else BLOCK_N
    num_pid_m = _valid_row_tiles(counts_ptr, num_experts, E_PAD, BLOCK_M)
    num_pid_n = tl.cdiv(F, TILE_F)
    w_desc = _weight_desc(w_ptr, num_experts, W_D1, W_D2, stride_we, tl.maximum(stride_wn, stride_wk), B_K_MAJOR,
                          TILE_F, BLOCK_K) if TMA else w_ptr
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0), disable_licm=True):
        pid_m, pid_n = _swizzle(tile, num_pid_m, num_pid_n, GROUP_M)
        expert, row0, row_end = _expert_tile(counts_ptr, pid_m, num_experts, E_PAD, BLOCK_M)
        if row0 < row_end:  # always true: see _ROW_TILED_LOOPS
            rows = row0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            assignment = tl.load(order_ptr + rows, mask=row_ok, other=0)
            fs = pid_n * TILE_F + tl.arange(0, TILE_F)
            col_ok = fs < F
            acc, acc2 = _expert_gemm(src_ptr, assignment // top_k, row_ok, stride_src,
                                     w_ptr + expert.to(tl.int64) * stride_we, fs, col_ok, stride_wn, stride_wk, K, F,
                                     w_desc, expert, pid_n * TILE_F, BLOCK_M, TILE_F, BLOCK_K, EVEN_K, DUAL, TMA,
                                     B_K_MAJOR, PRECISION)
            rows64 = rows.to(tl.int64)[:, None]
            mask = row_ok[:, None] & col_ok[None, :]
            if BACKWARD:
                # acc is d(act output) before the routing weight; h holds the pre-activation.
                h_ptrs = h_ptr + rows64 * stride_h + fs[None, :]
                out_ptrs = out_ptr + rows64 * stride_out + fs[None, :]
                gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(weight_ptr + assignment, mask=row_ok, other=0.0).to(tl.float32)
                da = acc * w[:, None]
                if GATED:
                    up = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
                    act = _act(gate, ACT)
                    tl.store(out_ptrs, (da * up * _act_grad(gate, ACT)).to(out_ptr.dtype.element_ty), mask=mask)
                    tl.store(out_ptrs + F, (da * act).to(out_ptr.dtype.element_ty), mask=mask)
                    act = act * up
                else:
                    act = _act(gate, ACT)
                    tl.store(out_ptrs, (da * _act_grad(gate, ACT)).to(out_ptr.dtype.element_ty), mask=mask)
                if WEIGHT_GRAD:
                    # d(routing weight) = <dout, y> = <dout @ W_down, act>: this tile's share of it, one
                    # partial per column tile (summed afterwards: deterministic, no atomics). Masked
                    # columns hold zeros in both factors.
                    tl.store(dweight_ptr + pid_n.to(tl.int64) * num_rows + assignment, tl.sum(acc * act, 1),
                             mask=row_ok)
            else:
                if STORE_H:
                    h_ptrs = h_ptr + rows64 * stride_h + fs[None, :]
                    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask)
                    if DUAL:
                        tl.store(h_ptrs + F, acc2.to(h_ptr.dtype.element_ty), mask=mask)
                act = _act(acc, ACT) * acc2 if DUAL else _act(acc, ACT)
                tl.store(out_ptr + rows64 * stride_out + fs[None, :], act.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K", "TMA_OK", "ROWS_CLASS"],
                 prune_configs_by={"early_config_prune": _prune})
@_EVEN_K
@triton.jit
def _scatter_gemm_kernel(
    src_ptr, w_ptr, out_ptr, counts_ptr, order_ptr,
    num_rows, N, K, num_experts, W_D1, W_D2, TMA_OK, ROWS_CLASS,
    stride_src, stride_we, stride_wn, stride_wk, stride_out,
    E_PAD: tl.constexpr, B_K_MAJOR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, EVEN_K: tl.constexpr,
):
    num_pid_m = _valid_row_tiles(counts_ptr, num_experts, E_PAD, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    w_desc = _weight_desc(w_ptr, num_experts, W_D1, W_D2, stride_we, tl.maximum(stride_wn, stride_wk), B_K_MAJOR,
                          BLOCK_N, BLOCK_K) if TMA else w_ptr
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0), disable_licm=True):
        pid_m, pid_n = _swizzle(tile, num_pid_m, num_pid_n, GROUP_M)
        expert, row0, row_end = _expert_tile(counts_ptr, pid_m, num_experts, E_PAD, BLOCK_M)
        if row0 < row_end:  # always true: see _ROW_TILED_LOOPS
            rows = row0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            acc, _ = _expert_gemm(src_ptr, rows, row_ok, stride_src, w_ptr + expert.to(tl.int64) * stride_we,
                                  cols, col_ok, stride_wn, stride_wk, K, 0, w_desc, expert, pid_n * BLOCK_N,
                                  BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, False, TMA, B_K_MAJOR, PRECISION)
            assignment = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            tl.store(out_ptr + assignment[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _wgrad(
    a_ptr, b_ptr, dw_ptr, counts_ptr, starts_ptr, order_ptr, weight_ptr,
    P, Q, top_k, stride_a, stride_b, stride_de, stride_dp,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE: tl.constexpr, WGMMA_LAYOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dW[e, p, q] = sum over expert e's rows r of A[r, p] * B[r, q] (times the routing weight w_r
    with SCALE).

    Each expert's first row comes precomputed (``starts_ptr``): with few rows per expert the
    main loop is only a few steps, and a scan over all experts' counts per tile would show.

    WGMMA_LAYOUT (``_wgrad2_kernel``, see ``benchmarks/compile_check_moe_wgrad.py``): A's tile is
    addressed as [BLOCK_M, BLOCK_K] (p down, tokens across), so no ``tl.trans`` of a register
    tile: it goes global -> shared by cp.async and feeds Hopper's wgmma from there; and w scales
    B's rows instead of A's (``sum_r (w_r A_r)^T B_r == sum_r A_r^T (w_r B_r)``), B being the
    dot's [K, N] operand in its natural order. Without it, the sm_90 build transposes the scaled A
    in registers and issues register-operand wgmmas. Not persistent: Triton 3.6's
    ``tl.range(flatten=True)`` leaves a token loop with data-dependent bounds unfused, and a
    hand-flattened (tile, step) loop builds without any cp.async overlap.
    """
    num_p = tl.cdiv(P, BLOCK_M)
    num_q = tl.cdiv(Q, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // (num_p * num_q)
    pid_p, pid_q = _swizzle(pid % (num_p * num_q), num_p, num_q, GROUP_M)
    row0 = tl.load(starts_ptr + expert)
    row_end = row0 + tl.load(counts_ptr + expert)
    ps = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    qs = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok = ps < P
    q_ok = qs < Q
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row0, row_end, BLOCK_K):
        rows = r0 + ks
        ok = rows < row_end
        assignment = tl.load(order_ptr + rows, mask=ok, other=0)
        a_rows = (assignment // top_k if GATHER_A else rows).to(tl.int64)
        b_rows = (assignment // top_k if GATHER_B else rows).to(tl.int64)
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + qs[None, :], mask=ok[:, None] & q_ok[None, :], other=0.0)
        if SCALE:
            w = tl.load(weight_ptr + assignment, mask=ok, other=0.0).to(tl.float32)
        if WGMMA_LAYOUT:
            a = tl.load(a_ptr + ps[:, None] + a_rows[None, :] * stride_a, mask=p_ok[:, None] & ok[None, :],
                        other=0.0)
            if SCALE:
                b = (b.to(tl.float32) * w[:, None]).to(b_ptr.dtype.element_ty)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            a = tl.load(a_ptr + a_rows[:, None] * stride_a + ps[None, :], mask=ok[:, None] & p_ok[None, :],
                        other=0.0)
            if SCALE:
                a = (a.to(tl.float32) * w[:, None]).to(a_ptr.dtype.element_ty)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_de + ps.to(tl.int64)[:, None] * stride_dp + qs[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


_WGRAD_KEY = ["P", "Q", "GATHER_A", "GATHER_B"]
_WGRAD_PRUNE = {"early_config_prune": _fit_operands}
_wgrad_kernel = triton.autotune(configs=WGRAD_CONFIGS, key=_WGRAD_KEY, prune_configs_by=_WGRAD_PRUNE)(_wgrad)
_wgrad2_kernel = triton.autotune(configs=WGRAD2_CONFIGS, key=_WGRAD_KEY,  # WGMMA_LAYOUT=True
                                 prune_configs_by=_WGRAD_PRUNE)(_wgrad)


@triton.jit
def _combine_kernel(buf_ptr, idx_ptr, weight_ptr, row_ptr, out_ptr, H, TOP_K: tl.constexpr,
                    K_PAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROW_MAP: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c_ok = cols < H
    ks = tl.arange(0, K_PAD)
    slot = t * TOP_K + ks
    e = tl.load(idx_ptr + slot, mask=ks < TOP_K, other=-1)
    use = (ks < TOP_K) & (e >= 0)
    row = tl.load(row_ptr + slot, mask=use, other=0).to(tl.int64) if ROW_MAP else slot
    rows = tl.load(buf_ptr + row[:, None] * H + cols[None, :], mask=use[:, None] & c_ok[None, :], other=0.0)
    rows = rows.to(tl.float32)
    if HAS_WEIGHT:
        rows = rows * tl.load(weight_ptr + slot, mask=use, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + t * H + cols, tl.sum(rows, 0).to(out_ptr.dtype.element_ty), mask=c_ok)


# ----------------------------------------------------------------------------- launchers

def _weight_tma(w: torch.Tensor) -> bool:
    """Whether TMA configs may read ``w``; on a GPU, gives Triton the scratch its descriptors need
    (set at every launch: the autograd backward runs in another thread, and context)."""
    if not (TMA_CONFIGS and tma_ok(w)):
        return False
    triton.set_allocator(_tma_scratch)
    return True


def _row_grid(meta: RoutingMeta, num_rows: int, block_m: int, col_tiles: int, device: torch.device) -> tuple:
    """Persistent grid of a row-tiled kernel: sized by the all-slots worst case of row tiles
    (``cdiv(T*K, BLOCK_M) + E``, each expert's last tile ragged) but capped; the kernel loops over
    the valid tiles only."""
    return (persistent_programs((triton.cdiv(num_rows, block_m) + meta.num_experts) * col_tiles, device),)


def gather_up(x: torch.Tensor, w_up: torch.Tensor, meta: RoutingMeta, activation: str, store_h: bool):
    """Forward up-projection: (h [T*K, U] pre-activation or None, a [T*K, F]) in expert-sorted rows."""
    gated = is_gated(activation)
    num_rows, (E, U, H) = meta.order.numel(), w_up.shape
    F = U // 2 if gated else U
    h = new_buffer((num_rows, U), x.dtype, x.device) if store_h else None
    a = new_buffer((num_rows, F), x.dtype, x.device)
    tile_f = (lambda m: m["BLOCK_N"] // 2) if gated else (lambda m: m["BLOCK_N"])
    grid = lambda m: _row_grid(meta, num_rows, m["BLOCK_M"], triton.cdiv(F, tile_f(m)), x.device)
    # dweight_ptr is unused here; ``a`` stands in (tuning zeroes it before the real launch fills it).
    _gather_gemm_kernel[grid](
        x, w_up, h if store_h else a, a, meta.counts, meta.order, meta.counts, a,
        num_rows, F, H, E, meta.top_k, U, H, int(_weight_tma(w_up)), rows_class(num_rows, E),
        x.stride(0), w_up.stride(0), w_up.stride(1), w_up.stride(2), U, F,
        E_PAD=_pow2(E), GATED=gated, ACT=ACT_CODES[activation], BACKWARD=False, STORE_H=store_h,
        WEIGHT_GRAD=False, B_K_MAJOR=True, PRECISION=dot_precision(x.dtype))
    return h, a


def gather_down_dgrad(dout: torch.Tensor, w_down: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                      meta: RoutingMeta, activation: str, weight_grad: bool):
    """(dh [T*K, U] in sorted rows, dweight [T*K] fp32 by assignment or None).

    dh: (w[t,k] * dout[t] @ w_down[e]) through the activation's backward. dweight (with
    ``weight_grad``): <dout[t], y[t*K+k]>, the routing weight's gradient, 0 for dropped slots;
    computed as <dout[t] @ w_down[e], act(h)> in the epilogue, so y need not be kept.
    """
    gated = is_gated(activation)
    num_rows, (E, H, F) = meta.order.numel(), w_down.shape
    dh = new_buffer(h.shape, h.dtype, h.device)
    # One partial row per column tile of the narrowest config; rows a config does not reach stay 0.
    tuning_class = rows_class(num_rows, E)
    narrowest = min_block_n(_gather_gemm_kernel.configs, tuning_class)
    parts = torch.zeros((triton.cdiv(F, narrowest) if weight_grad else 1, num_rows),
                        dtype=torch.float32, device=h.device)
    grid = lambda m: _row_grid(meta, num_rows, m["BLOCK_M"], triton.cdiv(F, m["BLOCK_N"]), h.device)
    _gather_gemm_kernel[grid](
        dout, w_down, h, dh, meta.counts, meta.order, weight, parts,
        num_rows, F, H, E, meta.top_k, H, F, int(_weight_tma(w_down)), tuning_class,
        dout.stride(0), w_down.stride(0), w_down.stride(2), w_down.stride(1), h.stride(0), dh.stride(0),
        E_PAD=_pow2(E), GATED=gated, ACT=ACT_CODES[activation], BACKWARD=True, STORE_H=False,
        WEIGHT_GRAD=weight_grad, B_K_MAJOR=False, PRECISION=dot_precision(dout.dtype))
    return dh, parts.sum(0) if weight_grad else None


def scatter_gemm(src: torch.Tensor, w: torch.Tensor, meta: RoutingMeta, transpose_w: bool) -> torch.Tensor:
    """buf[order[r]] = src[r] @ W_e^T (``transpose_w``, W_e [N, K]) or src[r] @ W_e (W_e [K, N]).

    Rows of dropped assignments are left unwritten: ``combine`` never reads them.
    """
    num_rows = meta.order.numel()
    E = w.shape[0]
    N, K = (w.shape[1], w.shape[2]) if transpose_w else (w.shape[2], w.shape[1])
    stride_wn, stride_wk = (w.stride(1), w.stride(2)) if transpose_w else (w.stride(2), w.stride(1))
    out = new_buffer((num_rows, N), src.dtype, src.device)
    grid = lambda m: _row_grid(meta, num_rows, m["BLOCK_M"], triton.cdiv(N, m["BLOCK_N"]), src.device)
    _scatter_gemm_kernel[grid](
        src, w, out, meta.counts, meta.order, num_rows, N, K, E, w.shape[1], w.shape[2], int(_weight_tma(w)),
        rows_class(num_rows, E), src.stride(0), w.stride(0), stride_wn, stride_wk, out.stride(0),
        E_PAD=_pow2(E), B_K_MAJOR=transpose_w, PRECISION=dot_precision(src.dtype))
    return out


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, meta: RoutingMeta, gather_a: bool, gather_b: bool,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """dW [E, P, Q]: dW[e] = sum over expert e's sorted rows r of (w_r) A[r]^T B[r].

    A side gathered by token reads ``a[order[r] // K]`` (else ``a[r]``); likewise B.
    """
    E, P, Q = meta.num_experts, a.shape[1], b.shape[1]
    dw = torch.empty((E, P, Q), dtype=a.dtype, device=a.device)  # every element is written
    grid = lambda m: (E * triton.cdiv(P, m["BLOCK_M"]) * triton.cdiv(Q, m["BLOCK_N"]),)
    starts = torch.cumsum(meta.counts, 0, dtype=torch.int32) - meta.counts
    args = (a, b, dw, meta.counts, starts, meta.order, meta.counts if weight is None else weight,
            P, Q, meta.top_k, a.stride(0), b.stride(0), dw.stride(0), dw.stride(1))
    flags = dict(GATHER_A=gather_a, GATHER_B=gather_b, PRECISION=dot_precision(a.dtype))
    if WGRAD2:
        _wgrad2_kernel[grid](*args, SCALE=weight is not None, WGMMA_LAYOUT=True, **flags)
    else:
        _wgrad_kernel[grid](*args, SCALE=weight is not None, WGMMA_LAYOUT=False, **flags)
    return dw


def combine(buf: torch.Tensor, topk_idx: torch.Tensor, weight: torch.Tensor | None, dtype: torch.dtype,
            slot_row: torch.Tensor | None = None):
    """out [T, H] = sum over valid slots k of (weight[t, k]) * buf[row], in fp32; ``row`` is
    ``t*K + k``, or ``slot_row[t*K + k]`` for a buffer in another row order (expert-sorted)."""
    T, K = topk_idx.shape
    H = buf.shape[1]
    out = new_buffer((T, H), dtype, buf.device)
    block_h = min(1024, _pow2(H))
    _combine_kernel[(T, triton.cdiv(H, block_h))](
        buf, topk_idx, buf if weight is None else weight, topk_idx if slot_row is None else slot_row, out, H,
        TOP_K=K, K_PAD=_pow2(K), HAS_WEIGHT=weight is not None, ROW_MAP=slot_row is not None, BLOCK_H=block_h)
    return out
