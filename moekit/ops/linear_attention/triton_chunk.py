"""Chunked Triton kernels for scalar-gated linear attention and the (gated) delta rule.

One family: ``USE_G`` switches the scalar log-decay on (simple GLA / Gated DeltaNet; off is
linear attention / DeltaNet), ``DELTA`` switches the delta rule on. Tensors are packed
[tokens, H, D] (see ``triton_layout``); gc is the chunk-local cumulative log-gate in float32.

Forward (per chunk of BT tokens, state S_n entering chunk n):
    delta only   wy_fwd      T = (I + A)^-1, A = tril(beta_i e^{gc_i - gc_j} k_i.k_j, -1);
                             w = T (beta e^{gc} k), u = T (beta v)
    state_fwd    sequential over chunks: stores S_n; (delta: v <- u - w S_n, stored);
                 S_{n+1} = e^{gc_L} S_n + (k e^{gc_L - gc})^T v
    output_fwd   o = scale (e^{gc} q S_n + (q k^T * e^{gc_i - gc_j}, causal) v)
Backward mirrors it: state_bwd (reverse pass for the state gradients dh_n), dv_local (dv: the
intra-chunk part, plus (k e^{gc_L - gc}) dh_n; the delta rule's dh reads dv, so there state_bwd
finishes dv from dv_local's intra-chunk part, which the ungated rule's state_bwd forms itself),
dqk (dq, dk, dw and the gate gradient), wy_bwd (through T).

Robustness on Hopper (Triton 3.4-3.7 miscompiles ``tl.trans`` of a dot result fed to another
dot): no kernel here transposes a computed tile; every transposed operand is loaded
transposed from memory (the WY backward writes one tile to a scratch buffer to read it back
transposed), or a result is formed transposed and stored to transposed addresses (dk in dqk).
Accumulation is float32; the state is carried in float32 registers and stored per chunk in the
input dtype, and so is its gradient dh unless a gate's gradient reads it (see ``state_bwd``). The
delta rule stores w, dw, dv and (gated) the intra-chunk dv in the input dtype too (half the bytes in
the sequential passes, 16-bit dots; dv in bf16 added 5-11% to dv's and dbeta's error in an
emulation, within the bounds); u stays float32 (in bf16 it added 15% to the outputs' error, and
8-11% to the final state's), and so does T, which the WY backward rounds for its products. Token
and chunk offsets are 64-bit: the per-chunk state buffers pass 2^31 elements at long contexts.

Simple GLA may take a per-token float32 scale vs of v's rows (v_t <- vs_t v_t; Mamba2's dt),
folded into the float32 decay factors, so the scaled v is never rounded to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.ops.linear_attention.triton_layout import (
    Chunks,
    block,
    block_k,
    block_v,
    delta_state_launch,
    launch_options,
    state_tiles,
)


@triton.jit
def _load_rows(ptr, t, mt, cols, mc, stride):
    """Tile [BT, BC] of a packed [tokens, H, C] tensor (ptr already offset to the head)."""
    return tl.load(ptr + t[:, None] * stride + cols[None, :], mask=mt[:, None] & mc[None, :], other=0.0)


@triton.jit
def _load_cols(ptr, t, mt, cols, mc, stride):
    """The transposed tile [BC, BT]."""
    return tl.load(ptr + t[None, :] * stride + cols[:, None], mask=mc[:, None] & mt[None, :], other=0.0)


@triton.jit
def _chunk_gram(a, b, t, mt, D: tl.constexpr, BD: tl.constexpr, stride, BT: tl.constexpr,
                PRECISION: tl.constexpr):
    """[BT, BT] float32 a_i . b_j over the chunk's rows t of two [tokens, D] head slices, D in BD tiles."""
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i_d in range(tl.cdiv(D, BD)):
        rd = i_d * BD + tl.arange(0, BD)
        md = rd < D
        acc += tl.dot(_load_rows(a, t, mt, rd, md, stride), _load_cols(b, t, mt, rd, md, stride),
                      input_precision=PRECISION)
    return acc


@triton.jit
def _decayed(x, keep, g_row, g_col):
    """x * exp(g_row - g_col) where keep, else 0 (the exponent is only formed where kept)."""
    return tl.where(keep, x * tl.exp(tl.where(keep, g_row - g_col, 0.0)), 0.0)


@triton.jit
def _flag_nonfinite(x, bad):
    """bad[0] = 1 when the tile x (as stored; masked-out elements are zeros) holds NaN or inf: the
    finite check's verdict from the kernels that write the results, without a pass over them."""
    count = tl.sum(tl.where(tl.abs(x.to(tl.float32)) < float("inf"), 0, 1))
    tl.store(bad, 1, mask=count > 0)


# ----------------------------------------------------------------------------------- forward


@triton.jit
def _block_ptrs(ptr, t0, t1, stride, r: tl.constexpr, c: tl.constexpr):
    """Pointers and row mask of the [16, 16] block (r, c) of a chunk's [BT, BT] matrix whose rows
    are tokens t0 + ... (ptr already offset to the head, rows `stride` apart)."""
    rc = tl.arange(0, 16)
    t = t0 + r * 16 + rc
    return ptr + t[:, None] * stride + c * 16 + rc[None, :], (t < t1)[:, None]


@triton.jit
def _load_block(ptr, t0, t1, stride, r: tl.constexpr, c: tl.constexpr):
    p, m = _block_ptrs(ptr, t0, t1, stride, r, c)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store_block(ptr, t0, t1, stride, r: tl.constexpr, c: tl.constexpr, x):
    p, m = _block_ptrs(ptr, t0, t1, stride, r, c)
    tl.store(p, x, mask=m)


@triton.jit
def _invert_diagonal_blocks(ptr, t0, t1, stride, NC: tl.constexpr):
    """Replaces the NC strictly lower [16, 16] diagonal blocks A_rr of a chunk's matrix with
    (I + A_rr)^-1, all blocks at once: forward substitution T_i = e_i - sum_{j<i} A_ij T_j, row i
    of every block per step (15 steps, not 15 per block). The blocks are held transposed,
    [NC, column, row], so each step's sum over j runs along the last axis, inside a warp (no
    shared memory or barrier), and reads row i of A straight from memory."""
    rb, rc = tl.arange(0, NC), tl.arange(0, 16)
    blk = rb[:, None, None]
    col, row = rc[None, :, None], rc[None, None, :]
    first = t0 + blk * 16  # [NC, 1, 1] first token of each block
    inv_t = tl.where(col == row, 1.0, 0.0) + tl.zeros([NC, 16, 16], dtype=tl.float32)
    # 3 x 5 steps: the 5 row loads of an unrolled group are issued together (the loop keeps the
    # layout that suits the sums; unrolled whole, the transposed store's layout would win)
    for i0 in range(1, 16, 5):
        for d in tl.static_range(5):
            a_i = tl.load(ptr + (first + i0 + d) * stride + blk * 16 + row, mask=first + i0 + d < t1,
                          other=0.0)  # [NC, 1, 16]
            inv_t = tl.where(row == i0 + d, inv_t - tl.sum(a_i * inv_t, axis=2)[:, :, None], inv_t)
    tl.debug_barrier()  # every row of A is read before T overwrites it
    tl.store(ptr + (first + row) * stride + blk * 16 + col, inv_t, mask=first + row < t1)


@triton.jit
def _dot32(a, b, PRECISION: tl.constexpr):
    """The inverse's float32 block products at the kernel's precision: exact for float32 inputs,
    TF32 for 16-bit ones. Exact products (FMA loops) took the WY forward to 253 registers on sm_90,
    TF32 ones 176; in a bf16 emulation the results moved by about 1% either way (TF32 rounds T's
    off-diagonal blocks to ~5e-4, far below the 16-bit roundings after it). The diagonal blocks'
    substitution stays exact."""
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _wy_inverse(ptr, t0, t1, stride, BT: tl.constexpr, PRECISION: tl.constexpr):
    """Overwrites a chunk's strictly lower [BT, BT] matrix A (BT = 16, 32 or 64; zeros on and above
    the diagonal) with T = (I + A)^-1, blockwise over 16-row blocks: the diagonal blocks by forward
    substitution, then below the diagonal T_rc = -T_rr sum_{c <= m < r} A_rm T_mc. Every block is
    read before any below the diagonal is written; the blocks above the diagonal stay zero."""
    NC: tl.constexpr = BT // 16
    _invert_diagonal_blocks(ptr, t0, t1, stride, NC)
    tl.debug_barrier()
    if NC > 1:
        t00 = _load_block(ptr, t0, t1, stride, 0, 0)
        t11 = _load_block(ptr, t0, t1, stride, 1, 1)
        t10 = -_dot32(t11, _dot32(_load_block(ptr, t0, t1, stride, 1, 0), t00, PRECISION), PRECISION)
        tl.debug_barrier()
        _store_block(ptr, t0, t1, stride, 1, 0, t10)
    if NC > 2:
        t22 = _load_block(ptr, t0, t1, stride, 2, 2)
        t33 = _load_block(ptr, t0, t1, stride, 3, 3)
        a20 = _load_block(ptr, t0, t1, stride, 2, 0)
        a21 = _load_block(ptr, t0, t1, stride, 2, 1)
        a30 = _load_block(ptr, t0, t1, stride, 3, 0)
        a31 = _load_block(ptr, t0, t1, stride, 3, 1)
        a32 = _load_block(ptr, t0, t1, stride, 3, 2)
        t21 = -_dot32(t22, _dot32(a21, t11, PRECISION), PRECISION)
        t20 = -_dot32(t22, _dot32(a20, t00, PRECISION) + _dot32(a21, t10, PRECISION), PRECISION)
        t32 = -_dot32(t33, _dot32(a32, t22, PRECISION), PRECISION)
        t31 = -_dot32(t33, _dot32(a31, t11, PRECISION) + _dot32(a32, t21, PRECISION), PRECISION)
        t30 = -_dot32(t33, _dot32(a30, t00, PRECISION) + _dot32(a31, t10, PRECISION)
                      + _dot32(a32, t20, PRECISION), PRECISION)
        tl.debug_barrier()
        _store_block(ptr, t0, t1, stride, 2, 1, t21)
        _store_block(ptr, t0, t1, stride, 2, 0, t20)
        _store_block(ptr, t0, t1, stride, 3, 2, t32)
        _store_block(ptr, t0, t1, stride, 3, 1, t31)
        _store_block(ptr, t0, t1, stride, 3, 0, t30)


@triton.jit
def _wy_fwd_kernel(k, v, beta, gc, T_out, w, u, start, end,
                   H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, USE_G: tl.constexpr, PRECISION: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    rt = tl.arange(0, BT)
    t = t0 + rt
    mt = t < t1
    b_beta = tl.load(beta + t * H + i_h, mask=mt, other=0.0).to(tl.float32)
    b_kk = _chunk_gram(k + i_h * K, k + i_h * K, t, mt, K, BK, H * K, BT, PRECISION)
    strict = (rt[:, None] > rt[None, :]) & mt[:, None]
    b_scale_k = b_beta
    if USE_G:
        b_g = tl.load(gc + t * H + i_h, mask=mt, other=0.0)
        b_a = _decayed(b_kk, strict, b_g[:, None], b_g[None, :]) * b_beta[:, None]
        b_scale_k = b_beta * tl.exp(b_g)
    else:
        b_a = tl.where(strict, b_kk, 0.0) * b_beta[:, None]
    # A goes through T_out, which _wy_inverse overwrites with (I + A)^-1
    rows = T_out + (t[:, None] * H + i_h) * BT + rt[None, :]
    tl.store(rows, b_a, mask=mt[:, None])
    tl.debug_barrier()
    _wy_inverse(T_out + i_h * BT, t0, t1, H * BT, BT, PRECISION)
    tl.debug_barrier()
    b_t = tl.load(rows, mask=mt[:, None], other=0.0)
    # w is stored in the input dtype (it only meets the state in 16-bit products); its product
    # keeps float32 operands (16-bit ones added 7% to the final state's bf16 error), and u stays
    # float32 (rounding it added 15% to the outputs')
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        mk = rk < K
        b_k = _load_rows(k + i_h * K, t, mt, rk, mk, H * K).to(tl.float32) * b_scale_k[:, None]
        b_w = tl.dot(b_t, b_k, input_precision=PRECISION)
        tl.store(w + (t[:, None] * H + i_h) * K + rk[None, :], b_w.to(w.dtype.element_ty),
                 mask=mt[:, None] & mk[None, :])
    for i_v in range(tl.cdiv(V, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        mv = rv < V
        b_v = _load_rows(v + i_h * V, t, mt, rv, mv, H * V).to(tl.float32) * b_beta[:, None]
        b_u = tl.dot(b_t, b_v, input_precision=PRECISION)
        tl.store(u + (t[:, None] * H + i_h) * V + rv[None, :], b_u, mask=mt[:, None] & mv[None, :])


@triton.jit
def _state_fwd_kernel(k, v, w, gc, vs, h, v_new, h0, ht, bad, cu, first,
                      H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, USE_G: tl.constexpr, DELTA: tl.constexpr, HAS_H0: tl.constexpr,
                      STORE_HT: tl.constexpr, HAS_VS: tl.constexpr,
                      PRECISION: tl.constexpr):
    """BK < K (not the delta rule, whose v - w S reads every row of S): the state's K rows are
    split over programs."""
    i_kv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)
    bos, eos = tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(first + i_n).to(tl.int64)
    rt = tl.arange(0, BT)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    state = rk[:, None] * V + rv[None, :]
    m_state = mk[:, None] & mv[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + (i_n * H + i_h) * K * V + state, mask=m_state, other=0.0)
    dt = k.dtype.element_ty
    for c in range(tl.cdiv(eos - bos, BT)):
        tl.store(h + ((c0 + c) * H + i_h) * K * V + state, b_h.to(h.dtype.element_ty), mask=m_state)
        t = bos + c * BT + rt
        mt = t < eos
        b_kt = _load_cols(k + i_h * K, t, mt, rk, mk, H * K)
        if DELTA:
            b_w = _load_rows(w + i_h * K, t, mt, rk, mk, H * K)
            b_v = _load_rows(v + i_h * V, t, mt, rv, mv, H * V) - tl.dot(b_w, b_h.to(b_w.dtype),
                                                                         input_precision=PRECISION)
            tl.store(v_new + (t[:, None] * H + i_h) * V + rv[None, :], b_v.to(v_new.dtype.element_ty),
                     mask=mt[:, None] & mv[None, :])
        else:
            b_v = _load_rows(v + i_h * V, t, mt, rv, mv, H * V)
        if USE_G:
            g_last = tl.load(gc + (tl.minimum(bos + c * BT + BT, eos) - 1) * H + i_h)
            b_g = tl.load(gc + t * H + i_h, mask=mt, other=0.0)
            b_kt = b_kt.to(tl.float32) * tl.where(mt, tl.exp(g_last - b_g), 0.0)[None, :]
            b_h = b_h * tl.exp(g_last)
        if HAS_VS:
            b_kt = b_kt.to(tl.float32) * tl.load(vs + t * H + i_h, mask=mt, other=0.0)[None, :]
        b_h += tl.dot(b_kt.to(dt), b_v.to(dt), input_precision=PRECISION)
    if STORE_HT:
        tl.store(ht + (i_n * H + i_h) * K * V + state, b_h, mask=m_state)
        _flag_nonfinite(b_h, bad)


@triton.jit
def _output_fwd_kernel(q, k, v, gc, vs, h, o, bad, start, end, scale,
                       H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, USE_G: tl.constexpr, HAS_VS: tl.constexpr,
                PRECISION: tl.constexpr):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    rt = tl.arange(0, BT)
    t = t0 + rt
    mt = t < t1
    rv = i_v * BV + tl.arange(0, BV)
    mv = rv < V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        mk = rk < K
        b_q = _load_rows(q + i_h * K, t, mt, rk, mk, H * K)
        b_kt = _load_cols(k + i_h * K, t, mt, rk, mk, H * K)
        b_h = tl.load(h + ((i_c.to(tl.int64) * H + i_h) * K + rk[:, None]) * V + rv[None, :],
                      mask=mk[:, None] & mv[None, :], other=0.0)
        b_o += tl.dot(b_q, b_h, input_precision=PRECISION)
        b_a += tl.dot(b_q, b_kt, input_precision=PRECISION)
    causal = (rt[:, None] >= rt[None, :]) & mt[:, None]
    if USE_G:
        b_g = tl.load(gc + t * H + i_h, mask=mt, other=0.0)
        b_o = b_o * tl.exp(b_g)[:, None]
        b_a = _decayed(b_a, causal, b_g[:, None], b_g[None, :])
    else:
        b_a = tl.where(causal, b_a, 0.0)
    if HAS_VS:
        b_a = b_a * tl.load(vs + t * H + i_h, mask=mt, other=0.0)[None, :]
    b_v = _load_rows(v + i_h * V, t, mt, rv, mv, H * V)
    b_o = ((b_o + tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PRECISION)) * scale).to(o.dtype.element_ty)
    tl.store(o + (t[:, None] * H + i_h) * V + rv[None, :], b_o, mask=mt[:, None] & mv[None, :])
    _flag_nonfinite(b_o, bad)


# ---------------------------------------------------------------------------------- backward


@triton.jit
def _dv_local_kernel(q, k, do, gc, dh, dv, start, end, scale,
                     H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, USE_G: tl.constexpr, WITH_STATE: tl.constexpr, PRECISION: tl.constexpr):
    """Intra-chunk part of dv: scale (k q^T * decay, anti-causal) do; WITH_STATE adds the state's
    part (k e^{gc_L - gc}) dh_n, which makes it the whole dv (no delta rule)."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    rt = tl.arange(0, BT)
    t = t0 + rt
    mt = t < t1
    rv = i_v * BV + tl.arange(0, BV)
    mv = rv < V
    b_at = tl.zeros([BT, BT], dtype=tl.float32)  # b_at[j, i] = k_j . q_i
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    if USE_G:
        b_g = tl.load(gc + t * H + i_h, mask=mt, other=0.0)
        g_last = tl.load(gc + (t1 - 1) * H + i_h)
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        mk = rk < K
        b_k = _load_rows(k + i_h * K, t, mt, rk, mk, H * K)
        b_at += tl.dot(b_k, _load_cols(q + i_h * K, t, mt, rk, mk, H * K), input_precision=PRECISION)
        if WITH_STATE:
            b_dh = tl.load(dh + ((i_c.to(tl.int64) * H + i_h) * K + rk[:, None]) * V + rv[None, :],
                           mask=mk[:, None] & mv[None, :], other=0.0)
            if USE_G:
                b_k = (b_k.to(tl.float32) * tl.where(mt, tl.exp(g_last - b_g), 0.0)[:, None]).to(b_k.dtype)
            b_dv += tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=PRECISION)
    keep = (rt[None, :] >= rt[:, None]) & mt[None, :]
    if USE_G:
        b_at = _decayed(b_at, keep, b_g[None, :], b_g[:, None])
    else:
        b_at = tl.where(keep, b_at, 0.0)
    b_do = _load_rows(do + i_h * V, t, mt, rv, mv, H * V)
    b_dv += tl.dot((b_at * scale).to(b_do.dtype), b_do, input_precision=PRECISION)
    tl.store(dv + (t[:, None] * H + i_h) * V + rv[None, :], b_dv.to(dv.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])


@triton.jit
def _state_bwd_kernel(q, k, w, gc, do, dv_local, dv, dh, dht, dh0, cu, first, scale,
                      H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, USE_G: tl.constexpr, DELTA: tl.constexpr, INTRA: tl.constexpr,
                      HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PRECISION: tl.constexpr):
    """Reverse pass: stores dh_n (gradient of the state leaving chunk n). The delta rule's dh reads
    dv (dh -= w^T dv), so DELTA also finishes dv here (dv_local + k dh, every K row at once);
    otherwise dv is left to the parallel dv kernel and the state's K rows split over programs.

    INTRA (the ungated delta rule only): the intra-chunk part of dv is formed here too, from the k
    and q tiles the pass loads anyway, instead of being read from dv_local's kernel. With a gate the
    decay's terms took the kernel past 255 registers on sm_90 and it spilled (H200: the gated
    state backward went from 1.36 to 1.86 ms at T = 2k), so there dv_local stays separate."""
    i_kv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)
    bos, eos = tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(first + i_n).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    rt = tl.arange(0, BT)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    state = rk[:, None] * V + rv[None, :]
    m_state = mk[:, None] & mv[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + (i_n * H + i_h) * K * V + state, mask=m_state, other=0.0)
    dt = k.dtype.element_ty
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        tl.store(dh + ((c0 + c) * H + i_h) * K * V + state, b_dh.to(dh.dtype.element_ty), mask=m_state)
        t = bos + c * BT + rt
        mt = t < eos
        if DELTA:
            if USE_G:
                g_last = tl.load(gc + (tl.minimum(bos + c * BT + BT, eos) - 1) * H + i_h)
                b_g = tl.load(gc + t * H + i_h, mask=mt, other=0.0)
            b_k = _load_rows(k + i_h * K, t, mt, rk, mk, H * K)
            if INTRA:  # scale (k q^T, anti-causal) do, in float32
                b_qt = _load_cols(q + i_h * K, t, mt, rk, mk, H * K)
                b_do = _load_rows(do + i_h * V, t, mt, rv, mv, H * V)
                b_at = tl.dot(b_k, b_qt, input_precision=PRECISION)  # b_at[j, i] = k_j . q_i
                b_at = tl.where((rt[None, :] >= rt[:, None]) & mt[None, :], b_at * scale, 0.0)
                b_dv = tl.dot(b_at.to(dt), b_do, input_precision=PRECISION)
                b_dv = tl.dot(b_k, b_dh.to(dt), b_dv, input_precision=PRECISION)
            else:
                # q and do are loaded after dv's product: loaded before it, as the INTRA branch
                # needs, the gated kernel's state backward took 1.88 ms instead of 1.53 at T = 32k
                if USE_G:
                    b_k = b_k.to(tl.float32) * tl.where(mt, tl.exp(g_last - b_g), 0.0)[:, None]
                b_dv = _load_rows(dv_local + i_h * V, t, mt, rv, mv, H * V) + tl.dot(
                    b_k.to(dt), b_dh.to(dt), input_precision=PRECISION)
                b_qt = _load_cols(q + i_h * K, t, mt, rk, mk, H * K)
                b_do = _load_rows(do + i_h * V, t, mt, rv, mv, H * V)
            tl.store(dv + (t[:, None] * H + i_h) * V + rv[None, :], b_dv.to(dv.dtype.element_ty),
                     mask=mt[:, None] & mv[None, :])
            # the scale and e^gc go on do's rows ([BT, BV]), so q^T ([K, BT]) enters as loaded: no
            # float32 copy of it (64 registers a thread at K = 128, 4 warps)
            b_rows = tl.full([BT], scale, dtype=tl.float32)
            if USE_G:
                b_rows = b_rows * tl.exp(b_g)
            b_do = (b_do.to(tl.float32) * b_rows[:, None]).to(dt)
        else:
            b_qt = _load_cols(q + i_h * K, t, mt, rk, mk, H * K).to(tl.float32) * scale
            if USE_G:
                g_last = tl.load(gc + (tl.minimum(bos + c * BT + BT, eos) - 1) * H + i_h)
                b_g = tl.load(gc + t * H + i_h, mask=mt, other=0.0)
                b_qt = b_qt * tl.exp(b_g)[None, :]
        if USE_G:
            b_dh = b_dh * tl.exp(g_last)
        if not DELTA:
            b_qt = b_qt.to(dt)
            b_do = _load_rows(do + i_h * V, t, mt, rv, mv, H * V)
        b_dh += tl.dot(b_qt, b_do, input_precision=PRECISION)
        if DELTA:
            b_dh -= tl.dot(_load_cols(w + i_h * K, t, mt, rk, mk, H * K), b_dv.to(w.dtype.element_ty),
                           input_precision=PRECISION)
    if STORE_DH0:
        tl.store(dh0 + (i_n * H + i_h) * K * V + state, b_dh, mask=m_state)


@triton.jit
def _dqk_kernel(q, k, v, vs, h, dh, do, dv, gc, dq, dk, dw, dg, start, end, scale, total,
                H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, USE_G: tl.constexpr, DELTA: tl.constexpr, HAS_VS: tl.constexpr,
                PRECISION: tl.constexpr):
    """dq, dk (through the outputs and the state), dw (delta) and this K block's share of the
    gradient of the cumulative gate: q.dq - k.dk, plus the chunk-end decay's term on the last row.

    dk is formed transposed, dk^T = dh v^T + q^T ds (stored to transposed addresses): both of its
    products then read ds = do v^T as it is, which spares a second (transposed) score product."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    rt = tl.arange(0, BT)
    t = t0 + rt
    mt = t < t1
    rk = i_k * BK + tl.arange(0, BK)
    mk = rk < K
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)   # do_i . v_j
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkt = tl.zeros([BK, BT], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    chunk_state = (i_c.to(tl.int64) * H + i_h) * K * V
    for i_v in range(tl.cdiv(V, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        mv = rv < V
        b_do = _load_rows(do + i_h * V, t, mt, rv, mv, H * V)
        b_vt = _load_cols(v + i_h * V, t, mt, rv, mv, H * V)
        b_ht = tl.load(h + chunk_state + rk[None, :] * V + rv[:, None], mask=mv[:, None] & mk[None, :], other=0.0)
        state = chunk_state + rk[:, None] * V + rv[None, :]
        m_state = mk[:, None] & mv[None, :]
        b_dh = tl.load(dh + state, mask=m_state, other=0.0)
        b_ds += tl.dot(b_do, b_vt, input_precision=PRECISION)
        b_dq += tl.dot(b_do, b_ht, input_precision=PRECISION)
        b_dkt += tl.dot(b_dh, b_vt.to(b_dh.dtype), input_precision=PRECISION)  # dh may be float32: see state_bwd
        if USE_G:  # <h, dh> in one orientation: h is loaded a second time, untransposed
            b_h = tl.load(h + state, mask=m_state, other=0.0)
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)
        if DELTA:  # 16-bit operands, dv rounded: no gradient's bf16 error moved by over 1%
            b_dw += tl.dot(_load_rows(dv + i_h * V, t, mt, rv, mv, H * V).to(b_ht.dtype), b_ht,
                           input_precision=PRECISION)
    m_out = mt[:, None] & mk[None, :]
    out = (t[:, None] * H + i_h) * K + rk[None, :]
    if DELTA:  # stored now: its accumulator is free for what follows
        tl.store(dw + out, (-b_dw).to(dw.dtype.element_ty), mask=m_out)
    if HAS_VS:  # v_j scaled by vs_j: every product above that read v_j takes the scale in float32
        b_vs = tl.load(vs + t * H + i_h, mask=mt, other=0.0)
        b_ds = b_ds * b_vs[None, :]
        b_dkt = b_dkt * b_vs[None, :]
    causal = (rt[:, None] >= rt[None, :]) & mt[:, None]
    if USE_G:
        b_g = tl.load(gc + t * H + i_h, mask=mt, other=0.0)
        g_last = tl.load(gc + (t1 - 1) * H + i_h)
        b_ds = _decayed(b_ds, causal, b_g[:, None], b_g[None, :])
        b_dq = b_dq * tl.exp(b_g)[:, None]
        b_dkt = b_dkt * tl.where(mt, tl.exp(g_last - b_g), 0.0)[None, :]
        b_kt = _load_cols(k + i_h * K, t, mt, rk, mk, H * K).to(tl.float32)
        dg_last = tl.sum(b_hdh) * tl.exp(g_last) + tl.sum(tl.sum(b_dkt * b_kt, axis=0))
    else:
        b_ds = tl.where(causal, b_ds, 0.0)
    # With a gate, float32 operands (tf32 on the GPU): rounding ds to bf16 here dominated the error
    # of the gate gradient, a difference q.dq - k.dk that cancels (mamba2's dA sums it over all
    # tokens; float16 gated delta: dg's error doubled). Without one (the delta rule) 16-bit: dq's
    # and dk's errors grew by 5-7%. dq, then dk, each stored as soon as it is done.
    ds_dt = k.dtype.element_ty if DELTA and not USE_G else tl.float32
    b_dq = (b_dq + tl.dot(b_ds.to(ds_dt), _load_rows(k + i_h * K, t, mt, rk, mk, H * K).to(ds_dt),
                          input_precision=PRECISION)) * scale
    tl.store(dq + out, b_dq.to(dq.dtype.element_ty), mask=m_out)
    if USE_G:
        b_dg = tl.sum(_load_rows(q + i_h * K, t, mt, rk, mk, H * K).to(tl.float32) * b_dq, axis=1)
    b_dkt += tl.dot(_load_cols(q + i_h * K, t, mt, rk, mk, H * K).to(ds_dt), (b_ds * scale).to(ds_dt),
                    input_precision=PRECISION)
    tl.store(dk + (t[None, :] * H + i_h) * K + rk[:, None], b_dkt.to(dk.dtype.element_ty),
             mask=mk[:, None] & mt[None, :])
    if USE_G:
        b_dg -= tl.sum(b_kt * b_dkt, axis=0)
        b_dg += tl.where(rt == t1 - 1 - t0, dg_last, 0.0)
        tl.store(dg + i_k * total * H + t * H + i_h, b_dg, mask=mt)


@triton.jit
def _wy_bwd_kernel(k, v, beta, gc, T_in, dw, du, dk, dv, dbeta, dg, f_buf, start, end,
                   H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, USE_G: tl.constexpr, PRECISION: tl.constexpr):
    """Back through w = T (beta e^{gc} k), u = T (beta v), T = (I + A)^-1: adds the WY terms into
    dk (summed in float32, rounded once on the way out), writes dv and dbeta, adds into dg.

    dT = dw (beta e^{gc} k)^T + du (beta v)^T, dA = -T^T dT T^T, E = dA e^{gc_i - gc_j} (strictly
    lower). A's gradient reaches dk as F k + F^T k, F = diag(beta) E: F goes out through f_buf and
    comes back transposed (no computed tile is transposed), so S = F + F^T takes one product.

    Every product takes operands in the input dtype, T (stored float32) and dT rounded to it: the
    kernel is bound by its chain of dependent products, and 16-bit ones issue at twice TF32's rate.
    In a bf16 emulation that raised dbeta's error by a quarter and dv's by 15% with correlated keys,
    within the gradient bound. Each K tile of dk is one accumulator through both of its products."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    rt = tl.arange(0, BT)
    t = t0 + rt
    mt = t < t1
    b_beta = tl.load(beta + t * H + i_h, mask=mt, other=0.0).to(tl.float32)
    b_g = tl.zeros([BT], dtype=tl.float32)
    if USE_G:
        b_g = tl.load(gc + t * H + i_h, mask=mt, other=0.0)
    dt = k.dtype.element_ty
    b_tt = tl.load(T_in + (t[None, :] * H + i_h) * BT + rt[:, None], mask=mt[None, :], other=0.0)  # T^T
    b_t16 = b_tt.to(dt)
    # dT = (du v^T + (dw k^T) diag(e^gc)) diag(beta): the column scales go on the sums, so k and v
    # enter the products as loaded (no float32 copy, no rounding of a scaled copy). The diagonal of
    # X = T^T dT before beta's scale is beta's own gradient through u and w, sum_j (T^T du)_ij v_ij
    # + e^gc_i sum_j (T^T dw)_ij k_ij, so no tile of v or k is read again for it (the gate's takes
    # the second term alone: one more product, T^T with dT's K part). The V loop comes first: k k^T
    # (beta's and the gate's gradients through A) is formed in the K loop from the same k^T tiles.
    b_dt = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        mv = rv < V
        b_du = _load_rows(du + i_h * V, t, mt, rv, mv, H * V)
        b_dt += tl.dot(b_du.to(dt), _load_cols(v + i_h * V, t, mt, rv, mv, H * V), input_precision=PRECISION)
        b_dvb = tl.dot(b_t16, b_du.to(dt), input_precision=PRECISION)
        tl.store(dv + (t[:, None] * H + i_h) * V + rv[None, :], (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])
    b_dtk = tl.zeros([BT, BT], dtype=tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        mk = rk < K
        b_kt = _load_cols(k + i_h * K, t, mt, rk, mk, H * K)
        b_dtk += tl.dot(_load_rows(dw + i_h * K, t, mt, rk, mk, H * K), b_kt, input_precision=PRECISION)
        b_kk += tl.dot(_load_rows(k + i_h * K, t, mt, rk, mk, H * K), b_kt, input_precision=PRECISION)
    diag = rt[:, None] == rt[None, :]
    if USE_G:
        b_dtk = b_dtk * tl.exp(b_g)[None, :]
        b_dg = b_beta * tl.sum(tl.where(diag, tl.dot(b_t16, b_dtk.to(dt), input_precision=PRECISION), 0.0), axis=1)
    b_x = tl.dot(b_t16, (b_dt + b_dtk).to(dt), input_precision=PRECISION)
    b_dbeta = tl.sum(tl.where(diag, b_x, 0.0), axis=1)
    b_da = -tl.dot((b_x * b_beta[None, :]).to(dt), b_t16, input_precision=PRECISION)
    strict = (rt[:, None] > rt[None, :]) & mt[:, None]
    if USE_G:
        b_e = _decayed(b_da, strict, b_g[:, None], b_g[None, :])
    else:
        b_e = tl.where(strict, b_da, 0.0)
    b_ekk = b_e * b_kk  # beta's and the gate's gradients through A
    b_dbeta += tl.sum(b_ekk, axis=1)
    if USE_G:
        b_dg += b_beta * tl.sum(b_ekk, axis=1) - tl.sum(b_ekk * b_beta[:, None], axis=0)
    # F is strictly lower, so F and F^T share no element: rounding each to the input dtype is
    # rounding S, and the scratch round trip moves 16-bit values
    b_f = (b_e * b_beta[:, None]).to(dt)
    tl.store(f_buf + (t[:, None] * H + i_h) * BT + rt[None, :], b_f, mask=mt[:, None])
    tl.debug_barrier()
    b_s = b_f + tl.load(f_buf + (t[None, :] * H + i_h) * BT + rt[:, None], mask=mt[None, :], other=0.0)
    # dk += diag(beta e^gc) T^T dw + S k: one accumulator, the row scale on T^T before its rounding
    b_tts = (b_tt * (b_beta * tl.exp(b_g))[:, None]).to(dt)
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        mk = rk < K
        b_dk = tl.dot(b_s, _load_rows(k + i_h * K, t, mt, rk, mk, H * K), input_precision=PRECISION)
        b_dk = tl.dot(b_tts, _load_rows(dw + i_h * K, t, mt, rk, mk, H * K), b_dk, input_precision=PRECISION)
        out = (t[:, None] * H + i_h) * K + rk[None, :]
        m_out = mt[:, None] & mk[None, :]
        tl.store(dk + out, (tl.load(dk + out, mask=m_out, other=0.0) + b_dk).to(dk.dtype.element_ty),
                 mask=m_out)
    tl.store(dbeta + t * H + i_h, b_dbeta, mask=mt)
    if USE_G:
        tl.store(dg + t * H + i_h, tl.load(dg + t * H + i_h, mask=mt, other=0.0) + b_dg, mask=mt)


# ------------------------------------------------------------------------------ host wrappers


def _variant(kernel: str, delta: bool) -> str:
    return kernel + "_delta" if delta else kernel


def wy_fwd(k, v, beta, gc, chunks: Chunks):
    tokens, H, K = k.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=k.device)
    T, u = torch.empty(tokens, H, chunks.size, **f32), torch.empty(tokens, H, V, **f32)
    w = torch.empty(tokens, H, K, dtype=k.dtype, device=k.device)
    _wy_fwd_kernel[(chunks.num_chunks, H)](
        k, v, beta, gc, T, w, u, chunks.start, chunks.end, H=H, K=K, V=V, BT=chunks.size, BK=block(K),
        BV=block(V), USE_G=gc is not None, **launch_options("wy_fwd", k))
    return T, w, u


def state_fwd(k, v, w, gc, h0, chunks: Chunks, store_final: bool, v_dtype, bad, vs=None):
    """Returns (h [NT, H, K, V] in k's dtype, v_new (delta) or None, final state or None); sets
    bad[0] (int32) to 1 when the final state is not finite.

    vs: optional float32 [tokens, H] scale of v's rows (no delta), applied in the kernels
    (see ChunkScalarGate)."""
    tokens, H, K = k.shape
    V = v.shape[-1]
    delta = w is not None
    h = torch.empty(chunks.num_chunks, H, K, V, dtype=k.dtype, device=k.device)
    v_new = torch.empty(tokens, H, V, dtype=v_dtype, device=k.device) if delta else None
    ht = torch.empty(chunks.num_seqs, H, K, V, dtype=torch.float32, device=k.device) if store_final else None
    if delta:
        name, BK, BV = delta_state_launch("state_fwd_delta", K, V, chunks.num_seqs * H, k.device)
    else:
        name = "state_fwd"
        BK, BV = state_tiles(name, K, V, split_k=True)
    _state_fwd_kernel[(triton.cdiv(K, BK) * triton.cdiv(V, BV), chunks.num_seqs, H)](
        k, v, w, gc, vs, h, v_new, h0, ht, bad, chunks.cu, chunks.first, H=H, K=K, V=V, BT=chunks.size,
        BK=BK, BV=BV, USE_G=gc is not None, DELTA=delta, HAS_H0=h0 is not None, STORE_HT=store_final,
        HAS_VS=vs is not None, **launch_options(name, k))
    return h, v_new, ht


def output_fwd(q, k, v, gc, h, chunks: Chunks, scale: float, out_dtype, bad, vs=None):
    """o [tokens, H, V] in ``out_dtype``; sets bad[0] (int32) to 1 when it is not finite."""
    tokens, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty(tokens, H, V, dtype=out_dtype, device=q.device)
    BV = block_v("output_fwd", V)
    _output_fwd_kernel[(triton.cdiv(V, BV), chunks.num_chunks, H)](
        q, k, v, gc, vs, h, o, bad, chunks.start, chunks.end, scale, H=H, K=K, V=V, BT=chunks.size, BK=block(K),
        BV=BV, USE_G=gc is not None, HAS_VS=vs is not None, **launch_options("output_fwd", k))
    return o


def dv_local(q, k, do, gc, chunks: Chunks, scale: float, dh=None, dtype=None):
    """The intra-chunk part of dv, or with dh (no delta rule) the whole dv, in ``dtype`` (default:
    do's dtype)."""
    tokens, H, K = q.shape
    V = do.shape[-1]
    dv = torch.empty(tokens, H, V, dtype=dtype or do.dtype, device=q.device)
    name = _variant("dv_local", delta=dh is None)  # without dh: the delta rule's intra-chunk part
    BV = block_v(name, V)
    _dv_local_kernel[(triton.cdiv(V, BV), chunks.num_chunks, H)](
        q, k, do, gc, dh, dv, chunks.start, chunks.end, scale, H=H, K=K, V=V, BT=chunks.size, BK=block(K), BV=BV,
        USE_G=gc is not None, WITH_STATE=dh is not None, **launch_options(name, k))
    return dv


def state_bwd(q, k, w, gc, do, dv_loc, dht, chunks: Chunks, scale: float, dv_dtype, want_dh0: bool,
              exact_dh: bool = False):
    """Returns (dh [NT, H, K, V], dv or None, dh0 or None). The delta rule (w given) also finishes
    dv = dv_loc + (through the state), or forms all of it where dv_loc is None (see INTRA in the
    kernel); otherwise dv is None (``dv_local`` with dh computes it).

    dh is stored in the input dtype (half the bytes that dv_local and dqk read, and 16-bit dots
    there), or in float32 with ``exact_dh``: for a gate gradient, to which bf16 dh was the largest
    kernel-side error (q.dq - k.dk reads it through dk and <h, dh>, and mamba2's dA sums it over
    all tokens). The delta rule's gradients grew by under 10% in a bf16 emulation."""
    tokens, H, K = q.shape
    V = do.shape[-1]
    delta = w is not None
    dh = torch.empty(chunks.num_chunks, H, K, V, dtype=torch.float32 if exact_dh else q.dtype, device=q.device)
    dv = torch.empty(tokens, H, V, dtype=dv_dtype, device=q.device) if delta else None
    dh0 = torch.empty(chunks.num_seqs, H, K, V, dtype=torch.float32, device=q.device) if want_dh0 else None
    intra = delta and dv_loc is None
    if intra and gc is not None:
        raise ValueError("state_bwd: the gated delta rule takes its intra-chunk dv from dv_local (dv_loc)")
    if delta:  # the ungated kernel (INTRA) has its own entries
        entry = "state_bwd_delta_intra" if intra else "state_bwd_delta"
        name, BK, BV = delta_state_launch(entry, K, V, chunks.num_seqs * H, q.device)
    else:
        name = "state_bwd"
        BK, BV = state_tiles(name, K, V, split_k=True)
    _state_bwd_kernel[(triton.cdiv(K, BK) * triton.cdiv(V, BV), chunks.num_seqs, H)](
        q, k, w, gc, do, dv_loc, dv, dh, dht, dh0, chunks.cu, chunks.first, scale, H=H, K=K, V=V,
        BT=chunks.size, BK=BK, BV=BV, USE_G=gc is not None, DELTA=delta, INTRA=intra,
        HAS_DHT=dht is not None, STORE_DH0=want_dh0, **launch_options(name, k))
    return dh, dv, dh0


def dqk(q, k, v, h, dh, do, dv, gc, chunks: Chunks, scale: float, vs=None):
    """Returns (dq, dk, dw or None, dgc or None); dv is the delta rule's dv_new (else None)."""
    tokens, H, K = q.shape
    V = v.shape[-1]
    delta, use_g = dv is not None, gc is not None
    name = _variant("dqk", delta)
    BK = block_k(name, K)  # one K block recomputes nothing; two halve each program's accumulators
    n_k = triton.cdiv(K, BK)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dw = torch.empty(tokens, H, K, dtype=q.dtype, device=q.device) if delta else None
    dg = torch.empty(n_k, tokens, H, dtype=torch.float32, device=q.device) if use_g else None
    _dqk_kernel[(n_k, chunks.num_chunks, H)](
        q, k, v, vs, h, dh, do, dv, gc, dq, dk, dw, dg, chunks.start, chunks.end, scale, tokens, H=H, K=K, V=V,
        BT=chunks.size, BK=BK, BV=block_v(name, V), USE_G=use_g, DELTA=delta, HAS_VS=vs is not None,
        **launch_options(name, k))
    return dq, dk, dw, (dg.sum(0) if use_g else None)


def wy_bwd(k, v, beta, gc, T, dw, du, dk, dg, chunks: Chunks, v_dtype):
    """Adds the WY terms to dk (in place, k's dtype) and into dg; returns (dv, dbeta).

    dq/dk's dk arrives in k's dtype, not float32: half its bytes, written there and read here; in
    a bf16 emulation dk's error rose 4-10% (two roundings instead of one), within the bounds."""
    tokens, H, K = k.shape
    V = v.shape[-1]
    dv = torch.empty(tokens, H, V, dtype=v_dtype, device=k.device)
    dbeta = torch.empty(tokens, H, dtype=torch.float32, device=k.device)
    f_buf = torch.empty(T.shape, dtype=k.dtype, device=k.device)  # scratch: F, read back transposed
    _wy_bwd_kernel[(chunks.num_chunks, H)](
        k, v, beta, gc, T, dw, du, dk, dv, dbeta, dg, f_buf, chunks.start, chunks.end, H=H, K=K, V=V,
        BT=chunks.size,
        BK=block_k("wy_bwd", K), BV=block_v("wy_bwd", V), USE_G=gc is not None, **launch_options("wy_bwd", k))
    return dv, dbeta
