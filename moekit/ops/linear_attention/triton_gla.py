"""Chunked Triton kernels for GLA (a log-decay per key channel), forward and backward.

gc [tokens, H, K] is the chunk-local cumulative gate. Per chunk, with S_n the state entering it:
    scores   A_ij = sum_k q_ik k_jk e^{gc_ik - gc_jk}  (j <= i), built one key position j at a
             time so each exponent is a difference of cumulative gates (never e^{+|gc|}: steep
             gates cannot overflow); stored [tokens, H, BT] in float32 so A^T is a plain load
    state    S_{n+1} = diag(e^{gc_L}) S_n + (k e^{gc_L - gc})^T v
    output   o = scale ((q e^{gc}) S_n + A v)
The backward mirrors it; the gate gradient per channel is q.dq - k.dk plus the chunk-end term,
reverse-summed over the chunk. Same layout, masking and no-transpose rules as ``triton_chunk``.

Tensor-core scores (the default; ``MOEKIT_GLA_TC=0``, read at import, keeps the per-position
kernels above; both checked against the reference on an H200 with Triton 3.6, which has
miscompiled other gated chunk kernels there): the chunk is split into sub-chunks of BC = 16
rows. An off-diagonal block (rows r, columns c < r) is one dot per K block,
    A_rc = (q_r e^{gc_r - g_ref}) (k_c e^{g_ref - gc_c})^T,   g_ref = gc at the last row of c,
where both exponents are <= 0 (gc is non-increasing), so steep gates cannot overflow; the
diagonal blocks keep the exact per-position form over 16 positions. The backward's intra-chunk
dq, dk take the same split, from dA = scale (do v^T) stored like A.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moekit.ops.first_order import refuse_create_graph
from moekit.ops.linear_attention.triton_chunk import _chunk_gram, _decayed, _load_cols, _load_rows
from moekit.ops.linear_attention.triton_layout import Chunks, block, chunk_cumsum, launch_options, state_tiles

GLA_TC = os.environ.get("MOEKIT_GLA_TC", "1") != "0"
SUB_CHUNK = 16  # rows of a tensor-core sub-chunk: tl.dot's minimum tile


@triton.jit
def _scores_kernel(q, k, gc, A, start, end,
                   H, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    rt = tl.arange(0, BT)
    t = t0 + rt
    mt = t < t1
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        mk = rk < K
        b_q = _load_rows(q + i_h * K, t, mt, rk, mk, H * K).to(tl.float32)
        b_g = _load_rows(gc + i_h * K, t, mt, rk, mk, H * K)
        for j in range(0, tl.minimum(BT, t1 - t0)):
            row = (t0 + j) * H * K + i_h * K + rk
            b_kj = tl.load(k + row, mask=mk, other=0.0).to(tl.float32)
            b_gj = tl.load(gc + row, mask=mk, other=0.0)
            keep = (rt >= j)[:, None] & mt[:, None]
            col = tl.sum(tl.where(keep, b_q * b_kj[None, :] * tl.exp(tl.where(keep, b_g - b_gj[None, :], 0.0)),
                                  0.0), axis=1)
            b_a += tl.where(rt[None, :] == j, col[:, None], 0.0)
    tl.store(A + (t[:, None] * H + i_h) * BT + rt[None, :], b_a, mask=mt[:, None])


@triton.jit
def _sub_chunk(start, end, NC: tl.constexpr, BC: tl.constexpr):
    """Chunk bounds, and the rows (t, mask) of row sub-chunk r and column sub-chunk c of this
    program's block (axis 1 enumerates the NC x NC blocks of the chunk)."""
    i_c, i_b = tl.program_id(1), tl.program_id(0)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    i_r, i_s = i_b // NC, i_b % NC
    rc = tl.arange(0, BC)
    t, s = t0 + i_r * BC + rc, t0 + i_s * BC + rc
    return t0, t1, i_r, i_s, t, t < t1, s, s < t1


@triton.jit
def _scores_tc_kernel(q, k, gc, A, start, end,
                      H, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                      PRECISION: tl.constexpr):
    """One [BC, BC] block of A: a dot below the diagonal, the exact form on it, zeros above."""
    i_h = tl.program_id(2)
    t0, t1, i_r, i_s, t, mt, s, ms = _sub_chunk(start, end, BT // BC, BC)
    rc = tl.arange(0, BC)
    b_a = tl.zeros([BC, BC], dtype=tl.float32)
    if i_r > i_s:
        ref = tl.minimum(t0 + i_s * BC + BC, t1) - 1  # in the chunk even when rows r are past its end
        for i_k in range(tl.cdiv(K, BK)):
            rk = i_k * BK + tl.arange(0, BK)
            mk = rk < K
            g_ref = tl.load(gc + (ref * H + i_h) * K + rk, mask=mk, other=0.0)
            b_q = _load_rows(q + i_h * K, t, mt, rk, mk, H * K).to(tl.float32)
            b_g = _load_rows(gc + i_h * K, t, mt, rk, mk, H * K)
            b_q = b_q * tl.exp(tl.where(mt[:, None], b_g - g_ref[None, :], 0.0))
            b_kt = _load_cols(k + i_h * K, s, ms, rk, mk, H * K).to(tl.float32)
            b_gt = _load_cols(gc + i_h * K, s, ms, rk, mk, H * K)
            b_kt = b_kt * tl.exp(tl.where(ms[None, :], g_ref[:, None] - b_gt, 0.0))
            b_a += tl.dot(b_q.to(q.dtype.element_ty), b_kt.to(k.dtype.element_ty), input_precision=PRECISION)
    elif i_r == i_s:
        for i_k in range(tl.cdiv(K, BK)):
            rk = i_k * BK + tl.arange(0, BK)
            mk = rk < K
            b_q = _load_rows(q + i_h * K, t, mt, rk, mk, H * K).to(tl.float32)
            b_g = _load_rows(gc + i_h * K, t, mt, rk, mk, H * K)
            for j in range(0, tl.minimum(BC, t1 - t0 - i_s * BC)):
                row = (t0 + i_s * BC + j) * H * K + i_h * K + rk
                b_kj = tl.load(k + row, mask=mk, other=0.0).to(tl.float32)
                b_gj = tl.load(gc + row, mask=mk, other=0.0)
                keep = (rc >= j)[:, None] & mt[:, None]
                col = tl.sum(_decayed(b_q * b_kj[None, :], keep, b_g, b_gj[None, :]), axis=1)
                b_a += tl.where(rc[None, :] == j, col[:, None], 0.0)
    tl.store(A + (t[:, None] * H + i_h) * BT + i_s * BC + rc[None, :], b_a, mask=mt[:, None])


@triton.jit
def _state_fwd_kernel(k, v, gc, h, h0, ht, cu, first,
                      H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PRECISION: tl.constexpr):
    i_kv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)  # the state's rows are independent: K splits
    bos, eos = tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(first + i_n).to(tl.int64)
    rt, rk = tl.arange(0, BT), i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    state = rk[:, None] * V + rv[None, :]
    m_state = mk[:, None] & mv[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + (i_n * H + i_h) * K * V + state, mask=m_state, other=0.0)
    for c in range(tl.cdiv(eos - bos, BT)):
        tl.store(h + ((c0 + c) * H + i_h) * K * V + state, b_h.to(h.dtype.element_ty), mask=m_state)
        t = bos + c * BT + rt
        mt = t < eos
        last = tl.minimum(bos + c * BT + BT, eos) - 1
        g_last = tl.load(gc + (last * H + i_h) * K + rk, mask=mk, other=0.0)
        b_gt = _load_cols(gc + i_h * K, t, mt, rk, mk, H * K)
        b_kt = _load_cols(k + i_h * K, t, mt, rk, mk, H * K).to(tl.float32)
        b_kt = b_kt * tl.where(mt[None, :], tl.exp(g_last[:, None] - b_gt), 0.0)
        b_v = _load_rows(v + i_h * V, t, mt, rv, mv, H * V)
        b_h = b_h * tl.exp(g_last)[:, None] + tl.dot(b_kt.to(b_v.dtype), b_v, input_precision=PRECISION)
    if STORE_HT:
        tl.store(ht + (i_n * H + i_h) * K * V + state, b_h, mask=m_state)


@triton.jit
def _output_kernel(q, v, gc, h, A, o, start, end, scale,
                   H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, PRECISION: tl.constexpr):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    rt = tl.arange(0, BT)
    t = t0 + rt
    mt = t < t1
    rv = i_v * BV + tl.arange(0, BV)
    mv = rv < V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        mk = rk < K
        b_q = _load_rows(q + i_h * K, t, mt, rk, mk, H * K).to(tl.float32)
        b_q = b_q * tl.exp(_load_rows(gc + i_h * K, t, mt, rk, mk, H * K))
        b_h = tl.load(h + ((i_c.to(tl.int64) * H + i_h) * K + rk[:, None]) * V + rv[None, :],
                      mask=mk[:, None] & mv[None, :], other=0.0)
        b_o += tl.dot(b_q.to(b_h.dtype), b_h, input_precision=PRECISION)
    b_a = tl.load(A + (t[:, None] * H + i_h) * BT + rt[None, :], mask=mt[:, None], other=0.0)
    b_v = _load_rows(v + i_h * V, t, mt, rv, mv, H * V)
    b_o = (b_o + tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PRECISION)) * scale
    tl.store(o + (t[:, None] * H + i_h) * V + rv[None, :], b_o.to(o.dtype.element_ty), mask=mt[:, None] & mv[None, :])


@triton.jit
def _dv_kernel(k, gc, A, do, dh, dv, start, end, scale,
               H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, PRECISION: tl.constexpr):
    """dv = scale A^T do + (k e^{gc_L - gc}) dh_n, with A^T loaded transposed."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    rt = tl.arange(0, BT)
    t = t0 + rt
    mt = t < t1
    rv = i_v * BV + tl.arange(0, BV)
    mv = rv < V
    b_do = _load_rows(do + i_h * V, t, mt, rv, mv, H * V)
    b_at = tl.load(A + (t[None, :] * H + i_h) * BT + rt[:, None], mask=mt[None, :], other=0.0)
    b_dv = tl.dot((b_at * scale).to(b_do.dtype), b_do, input_precision=PRECISION)
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        mk = rk < K
        g_last = tl.load(gc + ((t1 - 1) * H + i_h) * K + rk, mask=mk, other=0.0)
        b_k = _load_rows(k + i_h * K, t, mt, rk, mk, H * K).to(tl.float32)
        b_k = b_k * tl.where(mt[:, None], tl.exp(g_last[None, :] - _load_rows(gc + i_h * K, t, mt, rk, mk, H * K)), 0.0)
        b_dh = tl.load(dh + ((i_c.to(tl.int64) * H + i_h) * K + rk[:, None]) * V + rv[None, :],
                       mask=mk[:, None] & mv[None, :], other=0.0)
        b_dv += tl.dot(b_k.to(b_dh.dtype), b_dh, input_precision=PRECISION)
    tl.store(dv + (t[:, None] * H + i_h) * V + rv[None, :], b_dv.to(dv.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])


@triton.jit
def _state_bwd_kernel(q, gc, do, dh, dht, dh0, cu, first, scale,
                      H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PRECISION: tl.constexpr):
    """Reverse pass: dh_n (gradient of the state leaving chunk n)."""
    i_kv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)  # the state's rows are independent: K splits
    bos, eos = tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(first + i_n).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    rt, rk = tl.arange(0, BT), i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    state = rk[:, None] * V + rv[None, :]
    m_state = mk[:, None] & mv[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + (i_n * H + i_h) * K * V + state, mask=m_state, other=0.0)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        tl.store(dh + ((c0 + c) * H + i_h) * K * V + state, b_dh.to(dh.dtype.element_ty), mask=m_state)
        t = bos + c * BT + rt
        mt = t < eos
        last = tl.minimum(bos + c * BT + BT, eos) - 1
        g_last = tl.load(gc + (last * H + i_h) * K + rk, mask=mk, other=0.0)
        b_qt = _load_cols(q + i_h * K, t, mt, rk, mk, H * K).to(tl.float32)
        b_qt = b_qt * tl.exp(_load_cols(gc + i_h * K, t, mt, rk, mk, H * K)) * scale
        b_do = _load_rows(do + i_h * V, t, mt, rv, mv, H * V)
        b_dh = b_dh * tl.exp(g_last)[:, None] + tl.dot(b_qt.to(b_do.dtype), b_do, input_precision=PRECISION)
    if STORE_DH0:
        tl.store(dh0 + (i_n * H + i_h) * K * V + state, b_dh, mask=m_state)


@triton.jit
def _dqk_kernel(q, k, v, gc, h, dh, do, dq, dk, dg, dq_intra, dk_intra, start, end, scale,
                H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, INTRA_TC: tl.constexpr, PRECISION: tl.constexpr):
    """dq, dk and the per-channel gradient of the cumulative gate for one K block. INTRA_TC: the
    intra-chunk terms come from ``_dqk_intra_tc_kernel`` (dq_intra, dk_intra) instead of the
    per-position loop here."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    rt = tl.arange(0, BT)
    t = t0 + rt
    mt = t < t1
    rk = i_k * BK + tl.arange(0, BK)
    mk = rk < K
    if not INTRA_TC:
        b_da = tl.zeros([BT, BT], dtype=tl.float32)  # do_i . v_j
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    chunk_state = (i_c.to(tl.int64) * H + i_h) * K * V
    for i_v in range(tl.cdiv(V, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        mv = rv < V
        b_do = _load_rows(do + i_h * V, t, mt, rv, mv, H * V)
        m_state = mv[:, None] & mk[None, :]
        b_ht = tl.load(h + chunk_state + rk[None, :] * V + rv[:, None], mask=m_state, other=0.0)
        b_dht = tl.load(dh + chunk_state + rk[None, :] * V + rv[:, None], mask=m_state, other=0.0)
        if not INTRA_TC:
            b_da += tl.dot(b_do, _load_cols(v + i_h * V, t, mt, rv, mv, H * V), input_precision=PRECISION)
        b_dq += tl.dot(b_do, b_ht, input_precision=PRECISION)
        b_dk += tl.dot(_load_rows(v + i_h * V, t, mt, rv, mv, H * V), b_dht, input_precision=PRECISION)
        b_hdh += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), axis=0)
    b_g = _load_rows(gc + i_h * K, t, mt, rk, mk, H * K)
    g_last = tl.load(gc + ((t1 - 1) * H + i_h) * K + rk, mask=mk, other=0.0)
    b_q = _load_rows(q + i_h * K, t, mt, rk, mk, H * K).to(tl.float32)
    b_k = _load_rows(k + i_h * K, t, mt, rk, mk, H * K).to(tl.float32)
    b_dq = b_dq * tl.exp(b_g) * scale
    b_dk = b_dk * tl.where(mt[:, None], tl.exp(g_last[None, :] - b_g), 0.0)
    dg_last = b_hdh * tl.exp(g_last) + tl.sum(b_dk * b_k, axis=0)
    out = (t[:, None] * H + i_h) * K + rk[None, :]
    m_out = mt[:, None] & mk[None, :]
    if INTRA_TC:
        b_dq += tl.load(dq_intra + out, mask=m_out, other=0.0)
        b_dk += tl.load(dk_intra + out, mask=m_out, other=0.0)
    else:
        b_da = tl.where((rt[:, None] >= rt[None, :]) & mt[:, None], b_da * scale, 0.0)
        # Intra-chunk, one key position j at a time (the exact decays of the forward scores).
        for j in range(0, tl.minimum(BT, t1 - t0)):
            row = (t0 + j) * H * K + i_h * K + rk
            b_kj = tl.load(k + row, mask=mk, other=0.0).to(tl.float32)
            b_gj = tl.load(gc + row, mask=mk, other=0.0)
            keep = (rt >= j)[:, None] & mt[:, None]
            da_j = tl.sum(tl.where(rt[None, :] == j, b_da, 0.0), axis=1)  # dA[i, j] over i
            dec = tl.where(keep, tl.exp(tl.where(keep, b_g - b_gj[None, :], 0.0)), 0.0)  # e^{gc_i - gc_j}, i >= j
            b_dq += da_j[:, None] * dec * b_kj[None, :]
            # dk_j = sum_{i >= j} dA_ij q_i e^{gc_i - gc_j}
            dk_j = tl.sum(da_j[:, None] * dec * b_q, axis=0)
            b_dk += tl.where(rt[:, None] == j, dk_j[None, :], 0.0)
    b_dg = b_q * b_dq - b_k * b_dk
    b_dg += tl.where(rt[:, None] == t1 - 1 - t0, dg_last[None, :], 0.0)
    tl.store(dq + out, b_dq.to(dq.dtype.element_ty), mask=m_out)
    tl.store(dk + out, b_dk.to(dk.dtype.element_ty), mask=m_out)
    tl.store(dg + out, b_dg, mask=m_out)


@triton.jit
def _dA_kernel(v, do, dA, start, end, scale,
               H, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """dA = scale do v^T on and below the diagonal (zeros above), stored like A."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    rt = tl.arange(0, BT)
    t = t0 + rt
    mt = t < t1
    b_da = _chunk_gram(do + i_h * V, v + i_h * V, t, mt, V, BV, H * V, BT, PRECISION)
    b_da = tl.where(rt[:, None] >= rt[None, :], b_da * scale, 0.0)
    tl.store(dA + (t[:, None] * H + i_h) * BT + rt[None, :], b_da, mask=mt[:, None])


@triton.jit
def _dqk_intra_tc_kernel(q, k, gc, dA, dq, dk, start, end,
                         H, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Intra-chunk dq, dk (float32) of row sub-chunk r, split like the tensor-core scores:
        dq_i = sum_{j <= i} dA_ij e^{gc_i - gc_j} k_j    (dots over earlier sub-chunks c)
        dk_j = sum_{i >= j} dA_ij e^{gc_i - gc_j} q_i    (dots over later sub-chunks)
    each dot against the gate at the last row of the earlier sub-chunk; the diagonal is exact.
    Axis 0 enumerates (sub-chunk r, K block): the K blocks are independent."""
    i_rk, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_r, i_k = i_rk // tl.cdiv(K, BK), i_rk % tl.cdiv(K, BK)
    NC: tl.constexpr = BT // BC
    t0, t1 = tl.load(start + i_c).to(tl.int64), tl.load(end + i_c).to(tl.int64)
    rc = tl.arange(0, BC)
    t = t0 + i_r * BC + rc
    mt = t < t1
    last_r = tl.minimum(t0 + i_r * BC + BC, t1) - 1
    rk = i_k * BK + tl.arange(0, BK)
    mk = rk < K
    b_g = _load_rows(gc + i_h * K, t, mt, rk, mk, H * K)
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    for i_s in range(0, i_r):  # earlier sub-chunks: keys decayed to their last row
        s = t0 + i_s * BC + rc
        ms = s < t1
        ref = tl.minimum(t0 + i_s * BC + BC, t1) - 1  # in the chunk even when rows r are past its end
        g_ref = tl.load(gc + (ref * H + i_h) * K + rk, mask=mk, other=0.0)
        b_ks = _load_rows(k + i_h * K, s, ms, rk, mk, H * K).to(tl.float32)
        b_ks = b_ks * tl.exp(tl.where(ms[:, None], g_ref[None, :] - _load_rows(gc + i_h * K, s, ms, rk, mk, H * K),
                                      0.0))
        b_da = tl.load(dA + (t[:, None] * H + i_h) * BT + i_s * BC + rc[None, :], mask=mt[:, None], other=0.0)
        b_dq += tl.exp(tl.where(mt[:, None], b_g - g_ref[None, :], 0.0)) * tl.dot(
            b_da.to(k.dtype.element_ty), b_ks.to(k.dtype.element_ty), input_precision=PRECISION)
    g_ref = tl.load(gc + (last_r * H + i_h) * K + rk, mask=mk, other=0.0)
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    for i_s in range(i_r + 1, NC):  # later sub-chunks: queries decayed from this one's last row
        s = t0 + i_s * BC + rc
        ms = s < t1
        b_qs = _load_rows(q + i_h * K, s, ms, rk, mk, H * K).to(tl.float32)
        b_qs = b_qs * tl.exp(tl.where(ms[:, None], _load_rows(gc + i_h * K, s, ms, rk, mk, H * K) - g_ref[None, :],
                                      0.0))
        b_dat = tl.load(dA + (s[None, :] * H + i_h) * BT + i_r * BC + rc[:, None], mask=ms[None, :], other=0.0)
        b_dk += tl.dot(b_dat.to(q.dtype.element_ty), b_qs.to(q.dtype.element_ty), input_precision=PRECISION)
    b_dk *= tl.exp(tl.where(mt[:, None], g_ref[None, :] - b_g, 0.0))
    # The diagonal block, exact, one position p per step and no reduction across threads:
    # dq_i += dA_ip e^{gc_i - gc_p} k_p (rows i >= p), dk_j += dA_pj e^{gc_p - gc_j} q_p (rows j <= p).
    for p in range(0, tl.minimum(BC, t1 - t0 - i_r * BC)):
        row = (t0 + i_r * BC + p) * H * K + i_h * K + rk
        b_kp = tl.load(k + row, mask=mk, other=0.0).to(tl.float32)
        b_qp = tl.load(q + row, mask=mk, other=0.0).to(tl.float32)
        b_gp = tl.load(gc + row, mask=mk, other=0.0)
        da_col = tl.load(dA + (t * H + i_h) * BT + i_r * BC + p, mask=mt, other=0.0)  # dA[i, p] over i
        da_row = tl.load(dA + ((t0 + i_r * BC + p) * H + i_h) * BT + i_r * BC + rc)  # dA[p, j] over j
        b_dq += _decayed(da_col[:, None] * b_kp[None, :], (rc >= p)[:, None] & mt[:, None], b_g, b_gp[None, :])
        b_dk += _decayed(da_row[:, None] * b_qp[None, :], (rc <= p)[:, None] & mt[:, None], b_gp[None, :], b_g)
    out = (t[:, None] * H + i_h) * K + rk[None, :]
    tl.store(dq + out, b_dq, mask=mt[:, None] & mk[None, :])
    tl.store(dk + out, b_dk, mask=mt[:, None] & mk[None, :])


class ChunkGLA(torch.autograd.Function):
    """Chunked GLA on packed [tokens, H, D] inputs; gk [tokens, H, K] log-decays."""

    @staticmethod
    def forward(ctx, q, k, v, gk, h0, scale, chunks: Chunks):
        tokens, H, K = q.shape
        V = v.shape[-1]
        BT = chunks.size
        gc = chunk_cumsum(gk.reshape(tokens, H * K), chunks).view(tokens, H, K)
        A = torch.empty(tokens, H, BT, dtype=torch.float32, device=q.device)
        tc = GLA_TC
        if tc:
            NC = BT // SUB_CHUNK
            _scores_tc_kernel[(NC * NC, chunks.num_chunks, H)](q, k, gc, A, chunks.start, chunks.end, H=H, K=K,
                                                               BT=BT, BC=SUB_CHUNK, BK=block(K),
                                                               **launch_options("gla_scores_tc", k))
        else:
            _scores_kernel[(chunks.num_chunks, H)](q, k, gc, A, chunks.start, chunks.end, H=H, K=K, BT=BT,
                                                    BK=block(K), num_warps=launch_options("gla_scores", k)["num_warps"])
        h = torch.empty(chunks.num_chunks, H, K, V, dtype=k.dtype, device=q.device)
        ht = torch.empty(chunks.num_seqs, H, K, V, dtype=torch.float32, device=q.device)
        BK, BV = state_tiles("gla_state_fwd", K, V, split_k=True)
        _state_fwd_kernel[(triton.cdiv(K, BK) * triton.cdiv(V, BV), chunks.num_seqs, H)](
            k, v, gc, h, h0, ht, chunks.cu, chunks.first, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
            HAS_H0=h0 is not None, STORE_HT=True, **launch_options("gla_state_fwd", k))
        o = torch.empty(tokens, H, V, dtype=v.dtype, device=q.device)
        _output_kernel[(triton.cdiv(V, block(V)), chunks.num_chunks, H)](
            q, v, gc, h, A, o, chunks.start, chunks.end, scale, H=H, K=K, V=V, BT=BT, BK=block(K), BV=block(V),
            **launch_options("gla_output", k))
        ctx.save_for_backward(q, k, v, gc, A, h, h0)
        ctx.scale, ctx.chunks, ctx.gk_dtype, ctx.tc = scale, chunks, gk.dtype, tc
        ctx.set_materialize_grads(False)  # an unused final state's gradient stays None, not a zero tensor
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        refuse_create_graph("gla (triton)", "backend='reference'")  # kernels: no graph to differentiate
        q, k, v, gc, A, h, h0 = ctx.saved_tensors
        chunks, scale = ctx.chunks, ctx.scale
        tokens, H, K = q.shape
        V = v.shape[-1]
        BT = chunks.size
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        dh = torch.empty(chunks.num_chunks, H, K, V, dtype=q.dtype, device=q.device)
        dh0 = torch.empty(chunks.num_seqs, H, K, V, dtype=torch.float32, device=q.device) if h0 is not None else None
        BK, BV = state_tiles("gla_state_bwd", K, V, split_k=True)
        _state_bwd_kernel[(triton.cdiv(K, BK) * triton.cdiv(V, BV), chunks.num_seqs, H)](
            q, gc, do, dh, dht, dh0, chunks.cu, chunks.first, scale, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
            HAS_DHT=dht is not None, STORE_DH0=h0 is not None, **launch_options("gla_state_bwd", k))
        dv = torch.empty_like(v)
        _dv_kernel[(triton.cdiv(V, block(V)), chunks.num_chunks, H)](
            k, gc, A, do, dh, dv, chunks.start, chunks.end, scale, H=H, K=K, V=V, BT=BT, BK=block(K),
            BV=block(V), **launch_options("gla_dv", k))
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dgc = torch.empty(tokens, H, K, dtype=torch.float32, device=q.device)
        dq_intra = dk_intra = None
        if ctx.tc:
            dA = torch.empty(tokens, H, BT, dtype=torch.float32, device=q.device)
            _dA_kernel[(chunks.num_chunks, H)](v, do, dA, chunks.start, chunks.end, scale, H=H, V=V, BT=BT,
                                               BV=block(V), **launch_options("gla_dA", k))
            dq_intra, dk_intra = torch.empty_like(dgc), torch.empty_like(dgc)
            _dqk_intra_tc_kernel[(BT // SUB_CHUNK * triton.cdiv(K, block(K)), chunks.num_chunks, H)](
                q, k, gc, dA, dq_intra, dk_intra, chunks.start, chunks.end, H=H, K=K, BT=BT, BC=SUB_CHUNK,
                BK=block(K), **launch_options("gla_dqk_intra_tc", k))
        _dqk_kernel[(triton.cdiv(K, block(K)), chunks.num_chunks, H)](
            q, k, v, gc, h, dh, do, dq, dk, dgc, dq_intra, dk_intra, chunks.start, chunks.end, scale, H=H, K=K,
            V=V, BT=BT, BK=block(K), BV=block(V), INTRA_TC=ctx.tc, **launch_options("gla_dqk", k))
        dg = chunk_cumsum(dgc.view(tokens, H * K), chunks, reverse=True).view(tokens, H, K).to(ctx.gk_dtype)
        return dq, dk, dv, dg, dh0, None, None
