"""Routed experts as sort-by-expert + ``torch._grouped_mm`` (the torchtitan recipe).

Every (token, slot) assignment is sorted by expert; the two grouped GEMMs then run over
contiguous per-expert row blocks. Assignments with index -1 (dropped or padding) sort to the
end, past the last group: ``_grouped_mm`` leaves those rows unwritten (and their input
gradient too), so they are masked with ``torch.where`` on the way in and out.
"""

from __future__ import annotations

import torch

from moekit.ops.activations import apply_activation
from moekit.ops.moe.checks import check_expert_indices
from moekit.ops.moe.counts import count_per_bin

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reason(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> str | None:
    """Why ``_grouped_mm`` cannot run these operands here, or None if it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if not x.is_cuda and torch.torch_version.TorchVersion(torch.__version__) < (2, 13):
        return f"torch._grouped_mm runs on the CPU from torch 2.13 (this is {torch.__version__})"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"torch._grouped_mm does not support {x.dtype}"
    if not (x.dtype == w_up.dtype == w_down.dtype):
        # Mixed dtypes pass the operand checks under autocast only; _grouped_mm does not autocast.
        return f"torch._grouped_mm needs one dtype; x is {x.dtype}, the weights {w_up.dtype} / {w_down.dtype}"
    if x.is_cuda and x.dtype != torch.bfloat16:
        # Other dtypes take ATen's per-group fallback, which copies the offsets to the host on
        # every call: a sync per layer, and nothing a CUDA graph can capture.
        return f"torch._grouped_mm on CUDA has a grouped kernel for bfloat16 only, not {x.dtype}"
    row_bytes = x.element_size()
    for name, size in (("hidden", x.shape[-1]), ("up", w_up.shape[1]), ("ffn", w_down.shape[-1])):
        if (size * row_bytes) % 16:
            return f"torch._grouped_mm needs 16-byte aligned rows; {name} size {size} is not"
    return None


def sort_by_expert(topk_idx: torch.Tensor, num_experts: int):
    """Order assignments by expert without a host sync.

    Returns (order, sorted_expert, offsets): ``order`` indexes flattened [T*K] assignments,
    ``offsets[e]`` is the end row of expert e's block (int32, as _grouped_mm wants).
    Dropped assignments (-1) are given key ``num_experts`` so they land after every block.
    """
    flat = topk_idx.reshape(-1)
    key = torch.where(flat < 0, num_experts, flat)
    sorted_key, order = torch.sort(key, stable=True)
    counts = count_per_bin(key, num_experts + 1)[:num_experts]
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return order, sorted_key, offsets


def routed_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    num_experts = w_up.shape[0]
    check_expert_indices(topk_idx, num_experts)  # the sort would file an index out of range with the dropped
    top_k = topk_idx.shape[1]
    order, sorted_key, offsets = sort_by_expert(topk_idx, num_experts)
    valid = (sorted_key < num_experts)[:, None]
    token = order // top_k
    xs = torch.where(valid, x[token], 0)
    h = apply_activation(torch._grouped_mm(xs, w_up.transpose(1, 2), offs=offsets), activation)
    y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offsets)
    weight = topk_weight.reshape(-1)[order, None]
    # Mask y before the product: rows past the last offset are unwritten memory, and the weight's
    # gradient (dout * y) must not see them (0 * NaN is NaN).
    y = (torch.where(valid, y.float(), 0) * weight).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, y)
