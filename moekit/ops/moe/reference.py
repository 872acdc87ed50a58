"""Routed experts in plain PyTorch: the definition every backend must match.

A loop over experts (what Hugging Face implementations do). Works in any dtype, float64
included, and on any device.
"""

from __future__ import annotations

import torch

from moekit.ops.activations import apply_activation
from moekit.ops.moe.checks import check_expert_indices


def routed_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    """out[t] = sum_k topk_weight[t, k] * FFN_{topk_idx[t, k]}(x[t]); index -1 means no expert."""
    num_experts = w_up.shape[0]
    check_expert_indices(topk_idx, num_experts)  # the loop below would skip an index out of range
    out = torch.zeros_like(x)
    for e in range(num_experts):
        # An expert with no tokens still runs (on zero rows): the output stays connected to the
        # inputs, so autograd (and a backward all-to-all under expert parallelism) sees it.
        token, slot = torch.where(topk_idx == e)
        h = apply_activation(x[token] @ w_up[e].t(), activation)
        y = h @ w_down[e].t()
        out.index_add_(0, token, (y * topk_weight[token, slot, None]).to(x.dtype))
    return out
