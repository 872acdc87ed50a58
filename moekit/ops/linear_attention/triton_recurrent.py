"""Fused recurrent Triton kernel for decoding (forward only): one program per (sequence, head,
V tile) keeps its [K, BV] slice of the state in float32 registers and walks the tokens.

Covers every op: ``USE_G`` scalar log-decay, ``USE_GK`` per-key log-decay (GLA), ``DELTA``
the delta rule (each V column's error only needs its own column of the state, so V tiles
stay independent).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.ops.linear_attention.triton_layout import Chunks, block, padded


@triton.jit
def _recurrent_kernel(q, k, v, g, gk, beta, o, h0, ht, cu, scale,
                      H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      USE_G: tl.constexpr, USE_GK: tl.constexpr, DELTA: tl.constexpr, HAS_H0: tl.constexpr,
                      STORE_HT: tl.constexpr):
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    state = rk[:, None] * V + rv[None, :]
    m_state = mk[:, None] & mv[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + (i_n * H + i_h) * K * V + state, mask=m_state, other=0.0)
    for t in range(bos, eos):
        row_k = (t * H + i_h) * K + rk
        row_v = (t * H + i_h) * V + rv
        b_q = tl.load(q + row_k, mask=mk, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + row_k, mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(v + row_v, mask=mv, other=0.0).to(tl.float32)
        if USE_G:
            b_h = b_h * tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
        if USE_GK:
            b_h = b_h * tl.exp(tl.load(gk + row_k, mask=mk, other=0.0).to(tl.float32))[:, None]
        if DELTA:
            b_beta = tl.load(beta + t * H + i_h).to(tl.float32)
            b_v = b_beta * (b_v - tl.sum(b_k[:, None] * b_h, axis=0))
        b_h += b_k[:, None] * b_v[None, :]
        tl.store(o + row_v, tl.sum(b_q[:, None] * b_h, axis=0).to(o.dtype.element_ty), mask=mv)
    if STORE_HT:
        tl.store(ht + (i_n * H + i_h) * K * V + state, b_h, mask=m_state)


def recurrent_fwd(q, k, v, chunks: Chunks, *, scale: float, g=None, gk=None, beta=None, h0=None,
                  store_final: bool = True):
    """Packed [tokens, H, D] inputs -> (o in v's dtype, final state [N, H, K, V] float32 or None)."""
    tokens, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty(tokens, H, V, dtype=v.dtype, device=q.device)
    ht = torch.empty(chunks.num_seqs, H, K, V, dtype=torch.float32, device=q.device) if store_final else None
    BV = block(V, 64 if padded(K) <= 128 else 32)
    _recurrent_kernel[(triton.cdiv(V, BV), chunks.num_seqs, H)](
        q, k, v, g, gk, beta, o, h0, ht, chunks.cu, scale, H=H, K=K, V=V, BK=padded(K), BV=BV,
        USE_G=g is not None, USE_GK=gk is not None, DELTA=beta is not None, HAS_H0=h0 is not None,
        STORE_HT=store_final, num_warps=4)
    return o, ht
