"""Mamba2's state-space duality (SSD) scan, reference forms, in the usual Mamba2 layout.

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t^T x_t,    y_t = C_t h_t + D x_t

x [B, T, H, P], dt [B, T, H], A [H], B and C [B, T, G, N] with head h reading group
h // (H / G), D [H] or [H, P]. The state h is [B, H, N, P]: the [B, H, K, V] layout of the
other ops with K = N and V = P (Mamba2 / Hugging Face caches store its transpose, [B, H, P, N]).

SSD is scalar-decay linear attention: q = C, k = B, v = dt x, log-gate g = dt A, scale 1.
Both forms map to ``simple_gla`` and return (y [B, T, H, P], h [B, H, N, P]) in the working
precision. They take the per-token tensors positionally (so packed sequences can be sliced)
and the per-head ones (A, D, dt_bias) by keyword.
"""

from __future__ import annotations

import torch.nn.functional as F

from moekit.ops.linear_attention._common import compute_dtype
from moekit.ops.linear_attention.simple_gla import chunk_simple_gla, recurrent_simple_gla


def ssd_terms(x, dt, A, B, C, dt_bias=None, dt_softplus: bool = False, qk_dtype=None):
    """(q, k, dt, g) of the equivalent simple_gla call, whose v is x * dt[..., None], in the
    working precision (q and k in ``qk_dtype`` when given: the kernels read them in x's dtype,
    so they are repeated per head without a float32 copy). dt is used as given unless dt_bias
    (added first) or dt_softplus (applied after the bias) ask otherwise."""
    dtype = compute_dtype(x, dt, A, B, C, dt_bias)
    qk_dtype = qk_dtype or dtype
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    heads_per_group = x.shape[2] // B.shape[2]
    q = C.to(qk_dtype).repeat_interleave(heads_per_group, dim=2)
    k = B.to(qk_dtype).repeat_interleave(heads_per_group, dim=2)
    return q, k, dt, dt * A.to(dtype)


def as_simple_gla(x, dt, A, B, C, dt_bias=None, dt_softplus: bool = False):
    """(q, k, v, g) of the equivalent simple_gla call (see ``ssd_terms``)."""
    q, k, dt, g = ssd_terms(x, dt, A, B, C, dt_bias, dt_softplus)
    return q, k, x.to(dt.dtype) * dt.unsqueeze(-1), g


def with_skip(y, x, D):
    """y + D x, in the working precision of y and D (y as it is when D is None)."""
    if D is None:
        return y
    dtype = compute_dtype(y, D)
    D = D.to(dtype)
    return y.to(dtype) + x.to(dtype) * (D.unsqueeze(-1) if D.dim() == 1 else D)


def chunk_ssd(x, dt, B, C, *, A, D=None, dt_bias=None, dt_softplus: bool = False, initial_state=None,
              chunk_size: int = 64):
    q, k, v, g = as_simple_gla(x, dt, A, B, C, dt_bias, dt_softplus)
    y, h = chunk_simple_gla(q, k, v, g, scale=1.0, initial_state=initial_state, chunk_size=chunk_size)
    return with_skip(y, x, D), h


def recurrent_ssd(x, dt, B, C, *, A, D=None, dt_bias=None, dt_softplus: bool = False, initial_state=None):
    q, k, v, g = as_simple_gla(x, dt, A, B, C, dt_bias, dt_softplus)
    y, h = recurrent_simple_gla(q, k, v, g, scale=1.0, initial_state=initial_state)
    return with_skip(y, x, D), h
