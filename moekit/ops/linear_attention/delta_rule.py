"""The (gated) delta rule, reference forms.

    S'_t = exp(g_t) S_{t-1},    S_t = S'_t + beta_t k_t^T (v_t - k_t S'_t),    o_t = scale * q_t S_t

``g=None`` is the plain delta rule (DeltaNet); with g it is Gated DeltaNet. beta [B, T, H] is
the per-step writing strength, normally in (0, 1). Both forms return (o [B, T, H, V],
S [B, H, K, V]) in the working precision (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from moekit.ops.linear_attention._common import (
    compute_dtype,
    heads_first,
    l2norm,
    merge_chunks,
    segsum,
    split_chunks,
    start_state,
)


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale: float, initial_state=None, chunk_size: int = 64,
                           use_qk_l2norm_in_kernel: bool = False):
    """Block-parallel form with the WY / UT representation.

    Within a chunk starting from state S0, with G the in-chunk cumulative log-decay, the
    updates delta_j = beta_j (v_j - k_j S'_j) satisfy the unit lower-triangular system
        (I + A) delta = U0 - W0 S0,   A[i, j] = beta_i exp(G_i - G_j) k_i.k_j  (j < i),
        U0 = beta v,  W0 = beta exp(G) k,
    solved once per chunk for U = (I + A)^-1 U0 and W = (I + A)^-1 W0, all chunks at once. The
    sequential pass then only needs delta = U - W S0 and
        o_i = scale (exp(G_i) q_i S0 + sum_{j <= i} exp(G_i - G_j) (q_i.k_j) delta_j),
        S_end = exp(G_C) S0 + sum_j exp(G_C - G_j) k_j^T delta_j.
    """
    B, T, H, K = q.shape
    dtype = compute_dtype(q, k, v, g, beta, initial_state)
    C = min(chunk_size, T)
    q, k, v = (heads_first(x, dtype) for x in (q, k, v))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v = (split_chunks(x, C) for x in (q, k, v))  # [B, H, N, C, D]
    beta = split_chunks(heads_first(beta, dtype), C)  # [B, H, N, C]
    g = q.new_zeros(beta.shape) if g is None else split_chunks(heads_first(g, dtype), C)
    q = q * scale
    decay = segsum(g).exp()  # decay from step j to step i of a chunk, zero above the diagonal
    from_start = g.cumsum(-1).exp().unsqueeze(-1)  # decay from the chunk start to step i
    k_beta = k * beta.unsqueeze(-1)
    system = torch.eye(C, dtype=dtype, device=q.device) + (k_beta @ k.transpose(-1, -2) * decay).tril(-1)
    u = torch.linalg.solve_triangular(system, v * beta.unsqueeze(-1), upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * from_start, upper=False, unitriangular=True)
    attn = q @ k.transpose(-1, -2) * decay
    q_inter = q * from_start
    k_to_end = k * decay[..., -1, :].unsqueeze(-1)
    chunk_decay = g.sum(-1).exp()[..., None, None]
    S = start_state(initial_state, (B, H, K, v.shape[-1]), dtype, q.device)
    out = []
    for n in range(q.shape[2]):
        delta = u[:, :, n] - w[:, :, n] @ S
        out.append(q_inter[:, :, n] @ S + attn[:, :, n] @ delta)
        S = chunk_decay[:, :, n] * S + k_to_end[:, :, n].transpose(-1, -2) @ delta
    return merge_chunks(torch.stack(out, 2), T), S


def recurrent_gated_delta_rule(q, k, v, g, beta, *, scale: float, initial_state=None,
                               use_qk_l2norm_in_kernel: bool = False):
    """Step-by-step form (decoding)."""
    B, T, H, K = q.shape
    dtype = compute_dtype(q, k, v, g, beta, initial_state)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    g = None if g is None else g.to(dtype)
    S = start_state(initial_state, (B, H, K, v.shape[-1]), dtype, q.device)
    out = []
    for t in range(T):
        if g is not None:
            S = g[:, t].exp()[..., None, None] * S
        error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + (beta[:, t].unsqueeze(-1) * k[:, t]).unsqueeze(-1) * error.unsqueeze(-2)
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S
