"""Plain-PyTorch counterparts of the launchers in ``triton_kernels`` and ``triton_vendor``.

Same arguments, same results on the rows a kernel defines (the first ``sum(counts)``
expert-sorted rows, or the valid (token, slot) rows of a scatter buffer), computed in the
inputs' dtype or, for tests, in float64. Slow and simple on purpose: they are the definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.ops.activations import GATED, apply_activation, is_gated
from moekit.ops.moe.triton_meta import RoutingMeta


def sorted_rows(meta: RoutingMeta):
    """(expert, token, assignment) of each valid expert-sorted row."""
    counts = meta.counts.long()
    valid = int(counts.sum())
    expert = torch.repeat_interleave(torch.arange(meta.num_experts, device=counts.device), counts)
    assignment = meta.order[:valid].long()
    return expert, assignment // meta.top_k, assignment


def gather_up(x, w_up, meta, activation):
    expert, token, _ = sorted_rows(meta)
    h = torch.einsum("rh,ruh->ru", x[token], w_up[expert])
    return h, apply_activation(h, activation)


def _activation_grad(g, activation):
    with torch.enable_grad():
        g = g.detach().requires_grad_(True)
        fn = GATED.get(activation, F.gelu)
        (grad,) = torch.autograd.grad(fn(g).sum(), g)
    return grad


def _activation_backward(da, h, activation):
    """Gradient of the activation's input h given the gradient ``da`` of its output."""
    if not is_gated(activation):
        return da * _activation_grad(h, activation)
    gate, up = h.chunk(2, -1)
    return torch.cat([da * up * _activation_grad(gate, activation), da * GATED[activation](gate)], -1)


def gather_down_dgrad(dout, w_down, h, weight, meta, activation):
    """(dh rows, dweight [T*K]): dweight by its definition <dout[t], y[t*K+k]>, y = act(h) @ W_down^T."""
    expert, token, assignment = sorted_rows(meta)
    h = h[: len(expert)]
    y = torch.einsum("rf,rhf->rh", apply_activation(h, activation), w_down[expert])
    dweight = torch.zeros(meta.order.numel(), dtype=y.dtype, device=y.device)
    dweight[assignment] = (dout[token] * y).sum(-1)
    da = torch.einsum("rh,rhf->rf", dout[token], w_down[expert]) * weight.reshape(-1)[assignment, None]
    return _activation_backward(da, h, activation), dweight


def scatter_gemm(src, w, meta, transpose_w):
    """Rows of the [T*K, N] buffer at valid assignments (others are undefined); returns (buf rows, ids)."""
    expert, _, assignment = sorted_rows(meta)
    w_e = w[expert].transpose(1, 2) if transpose_w else w[expert]
    rows = torch.einsum("rk,rkn->rn", src[: len(expert)], w_e)
    return rows, assignment


def grouped_wgrad(a, b, meta, gather_a, gather_b, weight=None):
    expert, token, assignment = sorted_rows(meta)
    a_rows = a[token] if gather_a else a[: len(expert)]
    b_rows = b[token] if gather_b else b[: len(expert)]
    if weight is not None:
        a_rows = a_rows * weight.reshape(-1)[assignment, None].to(a_rows.dtype)
    dw = torch.zeros(meta.num_experts, a.shape[1], b.shape[1], dtype=a.dtype, device=a.device)
    return dw.index_add_(0, expert, a_rows[:, :, None] * b_rows[:, None, :])


def combine(buf, topk_idx, weight, dtype):
    valid = (topk_idx >= 0)[..., None]
    rows = torch.where(valid, buf.reshape(*topk_idx.shape, -1), 0)
    if weight is not None:
        rows = rows * weight[..., None].to(rows.dtype)
    return rows.sum(1).to(dtype)


# ----------------------------------------------------------------------------- triton_vendor's glue

def gather_rows(src, meta, weight=None):
    _, token, assignment = sorted_rows(meta)
    rows = src[token]
    return rows if weight is None else rows * weight.reshape(-1)[assignment, None].to(rows.dtype)


def act_rows(h, meta, activation):
    return apply_activation(h[: int(meta.counts.sum())], activation)


def act_rows_backward(da, h, weight, meta, activation):
    """(dh rows, dweight [T*K]) from the unweighted gradient ``da`` of the activation's output."""
    expert, _, assignment = sorted_rows(meta)
    da, h = da[: len(expert)], h[: len(expert)]
    dweight = torch.zeros(meta.order.numel(), dtype=da.dtype, device=da.device)
    dweight[assignment] = (da * apply_activation(h, activation)).sum(-1)
    return _activation_backward(da * weight.reshape(-1)[assignment, None], h, activation), dweight
