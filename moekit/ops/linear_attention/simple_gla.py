"""Linear attention with a scalar (per head, per step) decay: simple GLA, reference forms.

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t

``g=None`` is plain linear attention. Lightning attention (MiniMax-01, Lightning Attention-2)
and retention (RetNet) are this op with a fixed per-head decay from ``decay.py``.
Inputs are [B, T, H, D], g is [B, T, H]; both forms return (o [B, T, H, V], S [B, H, K, V]) in
the working precision (float32, or float64 for float64 inputs).
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
from moekit.ops.linear_attention.gla import recurrent_gla


def chunk_simple_gla(q, k, v, g, *, scale: float, initial_state=None, chunk_size: int = 64):
    """Block-parallel form: the intra-chunk attention matrices of all chunks at once, then a
    sequential pass that carries the state from chunk to chunk."""
    B, T, H, K = q.shape
    dtype = compute_dtype(q, k, v, g, initial_state)
    C = min(chunk_size, T)
    q, k, v = (split_chunks(heads_first(x, dtype), C) for x in (q, k, v))  # [B, H, N, C, D]
    if g is None:
        g = q.new_zeros(q.shape[:-1])
    else:
        g = split_chunks(heads_first(g, dtype), C)  # [B, H, N, C]
    q = q * scale
    decay = segsum(g).exp()  # decay from step j to step i of a chunk, zero above the diagonal
    o_intra = (q @ k.transpose(-1, -2) * decay) @ v
    q_inter = q * g.cumsum(-1).exp().unsqueeze(-1)  # queries see the carried state decayed to step i
    k_to_end = k * decay[..., -1, :].unsqueeze(-1)  # keys decayed to the chunk end
    chunk_decay = g.sum(-1).exp()[..., None, None]
    S = start_state(initial_state, (B, H, K, v.shape[-1]), dtype, q.device)
    out = []
    for n in range(q.shape[2]):
        out.append(o_intra[:, :, n] + q_inter[:, :, n] @ S)
        S = chunk_decay[:, :, n] * S + k_to_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
    return merge_chunks(torch.stack(out, 2), T), S


def recurrent_simple_gla(q, k, v, g, *, scale: float, initial_state=None):
    """Step-by-step form (decoding): a scalar decay is a per-key decay equal across keys."""
    gk = None if g is None else g.unsqueeze(-1).expand(q.shape)
    return recurrent_gla(q, k, v, gk, scale=scale, initial_state=initial_state)
