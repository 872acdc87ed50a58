"""Gated linear attention with a per-key decay (GLA), reference forms.

    S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t

Inputs are [B, T, H, D] (gk like q); both forms return (o [B, T, H, V], S [B, H, K, V]) in the
working precision (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from moekit.ops.linear_attention._common import (
    compute_dtype,
    heads_first,
    merge_chunks,
    segsum,
    split_chunks,
    start_state,
)


def chunk_gla(q, k, v, gk, *, scale: float, initial_state=None, chunk_size: int = 64):
    """Block-parallel form: per chunk, intra-chunk attention with per-key decay masks, plus the
    contribution of the state carried in from earlier chunks."""
    B, T, H, K = q.shape
    dtype = compute_dtype(q, k, v, gk, initial_state)
    C = min(chunk_size, T)
    q, k, v, gk = (split_chunks(heads_first(x, dtype), C) for x in (q, k, v, gk))  # [B, H, N, C, D]
    q = q * scale
    S = start_state(initial_state, (B, H, K, v.shape[-1]), dtype, q.device)
    out = []
    for n in range(q.shape[2]):
        qn, kn, vn, gn = q[:, :, n], k[:, :, n], v[:, :, n], gk[:, :, n]
        # Per-key decay from step j to step i, [B, H, K, C, C]. Built one chunk at a time: the
        # key axis makes it C times larger than the attention matrix.
        decay = segsum(gn.transpose(-1, -2)).exp()
        attn = torch.einsum("bhik,bhjk,bhkij->bhij", qn, kn, decay)
        out.append(attn @ vn + (qn * gn.cumsum(-2).exp()) @ S)
        to_end = decay[..., -1, :] * kn.transpose(-1, -2)  # keys decayed to the chunk end, [B, H, K, C]
        S = gn.sum(-2).exp().unsqueeze(-1) * S + to_end @ vn
    return merge_chunks(torch.stack(out, 2), T), S


def recurrent_gla(q, k, v, gk, *, scale: float, initial_state=None):
    """Step-by-step form (decoding). ``gk=None`` means no decay (plain linear attention)."""
    B, T, H, K = q.shape
    dtype = compute_dtype(q, k, v, gk, initial_state)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    q = q * scale
    gk = None if gk is None else gk.to(dtype)
    S = start_state(initial_state, (B, H, K, v.shape[-1]), dtype, q.device)
    out = []
    for t in range(T):
        if gk is not None:
            S = gk[:, t].exp().unsqueeze(-1) * S
        S = S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S
