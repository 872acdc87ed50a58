"""Helpers shared by the reference forms: working precision, chunk layout, decay masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (so references are testable to 1e-10), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, T, ...] in the working precision."""
    return x.transpose(1, 2).to(dtype)


def split_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, H, T, ...] -> [B, H, N, C, ...], zero-padding T up to a multiple of C.

    Zero padding changes nothing that is kept: a zero key writes nothing into the state, a zero
    log-gate decays nothing and a zero beta makes no delta-rule update.
    """
    B, H, T = x.shape[:3]
    pad = -T % chunk_size
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(B, H, (T + pad) // chunk_size, chunk_size, *x.shape[3:])


def merge_chunks(o: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, H, N, C, V] -> [B, T, H, V], dropping the padding."""
    B, H, N, C, V = o.shape
    return o.reshape(B, H, N * C, V)[:, :, :seq_len].transpose(1, 2)


def segsum(g: torch.Tensor) -> torch.Tensor:
    """Pairwise log-decays within a chunk: [..., C] -> [..., C, C].

    out[..., i, j] = g[j+1] + ... + g[i] for i >= j (0 on the diagonal) and -inf above it, so
    exp(out) is the decay from step j to step i with the causal mask built in. Summing the
    masked gates directly, rather than subtracting two cumulative sums, never forms a large
    cumulative log-decay: no cancellation error, and every exponent is <= 0 for log-gates <= 0.
    """
    C = g.shape[-1]
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    terms = g.unsqueeze(-1).expand(*g.shape, C).masked_fill(~strictly_lower, 0.0)  # terms[i, j] = g_i if i > j
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    return terms.cumsum(-2).masked_fill(~causal, float("-inf"))


def start_state(initial_state: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """The recurrent state before the first step, [B, H, K, V], in the working precision."""
    if initial_state is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return initial_state.to(dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the normalisation fla's delta-rule kernels use)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)
