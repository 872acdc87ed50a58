"""Triton kernels of the fused MoE layer, and their launchers.

Rows are (token, slot) assignments sorted by expert (see ``triton_meta``). Every grouped
kernel finds its expert from ``counts`` on the device, so grids are sized for the worst case
(``cdiv(T*K, BLOCK_M) + E`` row tiles) and tiles past the last expert's rows exit at once.

- ``gather_gemm``: rows of ``src`` gathered by token in the prologue (no permuted copy),
  times the expert's weight; the epilogue either applies the activation (forward
  up-projection: stores pre-activation ``h`` and activation ``a``) or its backward
  (gradient of the down-projection's input, weighted, then through the activation: ``dh``).
- ``scatter_gemm``: expert-sorted rows times the expert's weight, each result row written at
  its original (token, slot) position of a ``[T*K, H]`` buffer (no un-permute pass).
- ``combine``: ``out[t] = sum_k w[t, k] * buf[t*K + k]`` in fp32, skipping dropped slots
  (a deterministic sum over K instead of atomics).
- ``weight_grad``: ``dw[t, k] = <dout[t], y[t*K + k]>``.
- ``grouped_wgrad``: ``dW[e] = A_e^T B_e`` over expert e's rows (the token axis), with either
  side gathered by token and ``A`` optionally scaled by the routing weight.

``triton_reference`` holds a plain-PyTorch counterpart of each launcher.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moekit.ops.activations import is_gated
from moekit.ops.moe.triton_meta import RoutingMeta, new_buffer

ACT_CODES = {"swiglu": 0, "geglu": 1, "gelu": 1}  # 0: SiLU, 1: exact (erf) GELU

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


if _INTERPRET:  # the interpreter runs on the CPU: one small tile, no tuning
    GEMM_CONFIGS = _configs([(16, 32, 16, 4, 1)])
else:  # Hopper-friendly, a handful per kernel
    GEMM_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                             (64, 128, 64, 4, 4), (64, 256, 64, 8, 3)])
WGRAD_CONFIGS = GEMM_CONFIGS  # BLOCK_M / BLOCK_N tile dW's rows / columns, BLOCK_K the token axis


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's TF32 switch, as torch.matmul does (16-bit dots ignore this)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


# Without ragged K tiles the main loop's loads need only the row / column masks.
_EVEN_K = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


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
def _expert_gemm(a_ptr, a_rows, row_ok, stride_am, b_ptr, b_cols, col_ok, stride_bn, stride_bk, K,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc[i, j] = sum_k A[a_rows[i], k] * B[k, b_cols[j]] (A rows contiguous), fp32."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    b_ptrs = b_ptr + b_cols.to(tl.int64)[None, :] * stride_bn + ks.to(tl.int64)[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


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

@triton.autotune(configs=GEMM_CONFIGS, key=["F", "K", "GATED", "BACKWARD"])
@_EVEN_K
@triton.jit
def _gather_gemm_kernel(
    src_ptr, w_ptr, h_ptr, out_ptr, counts_ptr, order_ptr, weight_ptr,
    num_rows, F, K, num_experts, top_k,
    stride_src, stride_we, stride_wn, stride_wk, stride_h, stride_out,
    E_PAD: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BACKWARD: tl.constexpr,
    STORE_H: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # Forward of a gated activation: one tile's BLOCK_N weight rows are BLOCK_N/2 gate rows and
    # the matching up rows, so the epilogue has both halves in one accumulator.
    SPLIT: tl.constexpr = GATED and not BACKWARD
    TILE_F: tl.constexpr = BLOCK_N // 2 if SPLIT else BLOCK_N
    num_pid_m = tl.cdiv(num_rows, BLOCK_M) + num_experts
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(F, TILE_F), GROUP_M)
    expert, row0, row_end = _expert_tile(counts_ptr, pid_m, num_experts, E_PAD, BLOCK_M)
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    assignment = tl.load(order_ptr + rows, mask=row_ok, other=0)
    j = tl.arange(0, BLOCK_N)
    f = pid_n * TILE_F + j % TILE_F
    col_ok = f < F
    b_cols = f + (j // TILE_F) * F if SPLIT else f
    acc = _expert_gemm(src_ptr, assignment // top_k, row_ok, stride_src,
                       w_ptr + expert.to(tl.int64) * stride_we, b_cols, col_ok, stride_wn, stride_wk, K,
                       BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)
    rows64 = rows.to(tl.int64)[:, None]
    if BACKWARD:
        # acc is d(act output) before the routing weight; h holds the pre-activation.
        fs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (fs < F)[None, :]
        w = tl.load(weight_ptr + assignment, mask=row_ok, other=0.0).to(tl.float32)
        da = acc * w[:, None]
        h_ptrs = h_ptr + rows64 * stride_h + fs[None, :]
        out_ptrs = out_ptr + rows64 * stride_out + fs[None, :]
        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptrs, (da * up * _act_grad(gate, ACT)).to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out_ptrs + F, (da * _act(gate, ACT)).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptrs, (da * _act_grad(gate, ACT)).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if STORE_H:
            tl.store(h_ptr + rows64 * stride_h + b_cols[None, :], acc.to(h_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
        if SPLIT:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, TILE_F)), (0, 2, 1))
            gate, up = tl.split(halves)
            act = _act(gate, ACT) * up
        else:
            act = _act(acc, ACT)
        fs = pid_n * TILE_F + tl.arange(0, TILE_F)
        tl.store(out_ptr + rows64 * stride_out + fs[None, :], act.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (fs < F)[None, :])


@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K"])
@_EVEN_K
@triton.jit
def _scatter_gemm_kernel(
    src_ptr, w_ptr, out_ptr, counts_ptr, order_ptr,
    num_rows, N, K, num_experts,
    stride_src, stride_we, stride_wn, stride_wk, stride_out,
    E_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    num_pid_m = tl.cdiv(num_rows, BLOCK_M) + num_experts
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row0, row_end = _expert_tile(counts_ptr, pid_m, num_experts, E_PAD, BLOCK_M)
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = _expert_gemm(src_ptr, rows, row_ok, stride_src, w_ptr + expert.to(tl.int64) * stride_we,
                       cols, col_ok, stride_wn, stride_wk, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)
    assignment = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tl.store(out_ptr + assignment[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=WGRAD_CONFIGS, key=["P", "Q", "GATHER_A", "GATHER_B"])
@triton.jit
def _wgrad_kernel(
    a_ptr, b_ptr, dw_ptr, counts_ptr, order_ptr, weight_ptr,
    P, Q, num_experts, top_k, stride_a, stride_b, stride_de, stride_dp,
    E_PAD: tl.constexpr, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE_A: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dW[e, p, q] = sum over expert e's rows r of A[r, p] * B[r, q]."""
    num_p = tl.cdiv(P, BLOCK_M)
    num_q = tl.cdiv(Q, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // (num_p * num_q)
    pid_p, pid_q = _swizzle(pid % (num_p * num_q), num_p, num_q, GROUP_M)
    e, cnt, start = _expert_rows(counts_ptr, num_experts, E_PAD)
    row0 = tl.sum(tl.where(e == expert, start, 0), 0)
    row_end = row0 + tl.sum(tl.where(e == expert, cnt, 0), 0)
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
        a = tl.load(a_ptr + a_rows[:, None] * stride_a + ps[None, :], mask=ok[:, None] & p_ok[None, :], other=0.0)
        if SCALE_A:
            w = tl.load(weight_ptr + assignment, mask=ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * w[:, None]).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + qs[None, :], mask=ok[:, None] & q_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_de + ps.to(tl.int64)[:, None] * stride_dp + qs[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


@triton.jit
def _combine_kernel(buf_ptr, idx_ptr, weight_ptr, out_ptr, H, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c_ok = cols < H
    ks = tl.arange(0, K_PAD)
    slot = t * TOP_K + ks
    e = tl.load(idx_ptr + slot, mask=ks < TOP_K, other=-1)
    use = (ks < TOP_K) & (e >= 0)
    rows = tl.load(buf_ptr + slot[:, None] * H + cols[None, :], mask=use[:, None] & c_ok[None, :], other=0.0)
    rows = rows.to(tl.float32)
    if HAS_WEIGHT:
        rows = rows * tl.load(weight_ptr + slot, mask=use, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + t * H + cols, tl.sum(rows, 0).to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _weight_grad_kernel(y_ptr, dout_ptr, idx_ptr, dw_ptr, H, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, K_PAD)
    slot = t * TOP_K + ks
    e = tl.load(idx_ptr + slot, mask=ks < TOP_K, other=-1)
    use = (ks < TOP_K) & (e >= 0)
    acc = tl.zeros((K_PAD, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        c_ok = cols < H
        g = tl.load(dout_ptr + t * H + cols, mask=c_ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + slot[:, None] * H + cols[None, :], mask=use[:, None] & c_ok[None, :], other=0.0)
        acc += y.to(tl.float32) * g[None, :]
    tl.store(dw_ptr + slot, tl.sum(acc, 1), mask=ks < TOP_K)


# ----------------------------------------------------------------------------- launchers

def _row_tiles(meta: RoutingMeta, num_rows: int, block_m: int) -> int:
    return triton.cdiv(num_rows, block_m) + meta.num_experts


def gather_up(x: torch.Tensor, w_up: torch.Tensor, meta: RoutingMeta, activation: str, store_h: bool):
    """Forward up-projection: (h [T*K, U] pre-activation or None, a [T*K, F]) in expert-sorted rows."""
    gated = is_gated(activation)
    num_rows, (E, U, H) = meta.order.numel(), w_up.shape
    F = U // 2 if gated else U
    h = new_buffer((num_rows, U), x.dtype, x.device) if store_h else None
    a = new_buffer((num_rows, F), x.dtype, x.device)
    tile_f = (lambda m: m["BLOCK_N"] // 2) if gated else (lambda m: m["BLOCK_N"])
    grid = lambda m: (_row_tiles(meta, num_rows, m["BLOCK_M"]) * triton.cdiv(F, tile_f(m)),)
    _gather_gemm_kernel[grid](
        x, w_up, h if store_h else a, a, meta.counts, meta.order, meta.counts,
        num_rows, F, H, E, meta.top_k,
        x.stride(0), w_up.stride(0), w_up.stride(1), w_up.stride(2), U, F,
        E_PAD=_pow2(E), GATED=gated, ACT=ACT_CODES[activation], BACKWARD=False, STORE_H=store_h,
        PRECISION=_precision(x.dtype))
    return h, a


def gather_down_dgrad(dout: torch.Tensor, w_down: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                      meta: RoutingMeta, activation: str) -> torch.Tensor:
    """dh [T*K, U] (sorted rows): (w[t,k] * dout[t] @ w_down[e]) through the activation's backward."""
    gated = is_gated(activation)
    num_rows, (E, H, F) = meta.order.numel(), w_down.shape
    dh = new_buffer(h.shape, h.dtype, h.device)
    grid = lambda m: (_row_tiles(meta, num_rows, m["BLOCK_M"]) * triton.cdiv(F, m["BLOCK_N"]),)
    _gather_gemm_kernel[grid](
        dout, w_down, h, dh, meta.counts, meta.order, weight,
        num_rows, F, H, E, meta.top_k,
        dout.stride(0), w_down.stride(0), w_down.stride(2), w_down.stride(1), h.stride(0), dh.stride(0),
        E_PAD=_pow2(E), GATED=gated, ACT=ACT_CODES[activation], BACKWARD=True, STORE_H=False,
        PRECISION=_precision(dout.dtype))
    return dh


def scatter_gemm(src: torch.Tensor, w: torch.Tensor, meta: RoutingMeta, transpose_w: bool) -> torch.Tensor:
    """buf[order[r]] = src[r] @ W_e^T (``transpose_w``, W_e [N, K]) or src[r] @ W_e (W_e [K, N]).

    Rows of dropped assignments are left unwritten: ``combine`` never reads them.
    """
    num_rows = meta.order.numel()
    E = w.shape[0]
    N, K = (w.shape[1], w.shape[2]) if transpose_w else (w.shape[2], w.shape[1])
    stride_wn, stride_wk = (w.stride(1), w.stride(2)) if transpose_w else (w.stride(2), w.stride(1))
    out = new_buffer((num_rows, N), src.dtype, src.device)
    grid = lambda m: (_row_tiles(meta, num_rows, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)
    _scatter_gemm_kernel[grid](
        src, w, out, meta.counts, meta.order, num_rows, N, K, E,
        src.stride(0), w.stride(0), stride_wn, stride_wk, out.stride(0),
        E_PAD=_pow2(E), PRECISION=_precision(src.dtype))
    return out


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, meta: RoutingMeta, gather_a: bool, gather_b: bool,
                  weight: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dW [E, P, Q]: dW[e] = sum over expert e's sorted rows r of (w_r) A[r]^T B[r].

    A side gathered by token reads ``a[order[r] // K]`` (else ``a[r]``); likewise B.
    """
    E, P, Q = meta.num_experts, a.shape[1], b.shape[1]
    dw = torch.empty((E, P, Q), dtype=out_dtype or a.dtype, device=a.device)  # every element is written
    grid = lambda m: (E * triton.cdiv(P, m["BLOCK_M"]) * triton.cdiv(Q, m["BLOCK_N"]),)
    _wgrad_kernel[grid](
        a, b, dw, meta.counts, meta.order, meta.counts if weight is None else weight,
        P, Q, E, meta.top_k, a.stride(0), b.stride(0), dw.stride(0), dw.stride(1),
        E_PAD=_pow2(E), GATHER_A=gather_a, GATHER_B=gather_b, SCALE_A=weight is not None,
        PRECISION=_precision(a.dtype))
    return dw


def combine(buf: torch.Tensor, topk_idx: torch.Tensor, weight: torch.Tensor | None, dtype: torch.dtype):
    """out [T, H] = sum over valid slots k of (weight[t, k]) * buf[t*K + k], in fp32."""
    T, K = topk_idx.shape
    H = buf.shape[1]
    out = new_buffer((T, H), dtype, buf.device)
    block_h = min(1024, _pow2(H))
    _combine_kernel[(T, triton.cdiv(H, block_h))](
        buf, topk_idx, buf if weight is None else weight, out, H,
        TOP_K=K, K_PAD=_pow2(K), HAS_WEIGHT=weight is not None, BLOCK_H=block_h)
    return out


def weight_grad(y: torch.Tensor, dout: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """dw [T, K] fp32: <dout[t], y[t*K + k]>, 0 for dropped slots."""
    T, K = topk_idx.shape
    dw = new_buffer((T, K), torch.float32, y.device)
    _weight_grad_kernel[(T,)](y, dout, topk_idx, dw, y.shape[1], TOP_K=K, K_PAD=_pow2(K),
                              BLOCK_H=min(512, _pow2(y.shape[1])))
    return dw
