"""Routing metadata for the Triton MoE kernels, built on the device without a host sync.

The kernels need only two tensors: ``counts[e]`` (assignments per expert, int32) and
``order`` (the flattened ``t * K + k`` assignment behind each expert-sorted row, int32).
Each kernel derives expert row offsets and its tile's expert from ``counts`` itself, so no
tile table sized by data (or by the autotuned BLOCK_M) is built on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingMeta:
    counts: torch.Tensor  # [E] int32
    order: torch.Tensor  # [T*K] int32; rows past sum(counts) hold the dropped assignments
    num_experts: int
    top_k: int


def routing_meta(topk_idx: torch.Tensor, num_experts: int) -> RoutingMeta:
    """Counting-sort metadata of ``topk_idx`` [T, K]; -1 (no expert) sorts after every expert.
    A decode-sized call on the GPU takes one Triton program (``routing_kernel``), any other the
    torch ops of ``routing_meta_torch`` (its reference)."""
    _check_dtype(topk_idx)
    if topk_idx.is_cuda:
        from moekit.ops.moe import routing_kernel  # imports triton: only where it runs

        if routing_kernel.fits(topk_idx.numel(), num_experts):
            counts, order, ok = routing_kernel.routing_meta_small(topk_idx.reshape(-1), num_experts)
            torch._assert_async(ok, _in_range(num_experts))
            return RoutingMeta(counts, order, num_experts, topk_idx.shape[1])
    return routing_meta_torch(topk_idx, num_experts)


def routing_meta_torch(topk_idx: torch.Tensor, num_experts: int) -> RoutingMeta:
    """``routing_meta`` from torch ops, on any device and at any size."""
    _check_dtype(topk_idx)
    flat = topk_idx.reshape(-1).long()  # int64, what scatter_add_ indexes with (top-k's: no copy)
    # Checked on the device: an out-of-range index would make the kernels read out of bounds.
    torch._assert_async((flat.clamp(-1, num_experts - 1) == flat).all(), _in_range(num_experts))
    key = flat.remainder(num_experts + 1)  # -1 (no expert) -> num_experts: after every expert
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    order = torch.sort(key, stable=True).indices.to(torch.int32)
    return RoutingMeta(counts[:num_experts], order, num_experts, topk_idx.shape[1])


def _check_dtype(topk_idx: torch.Tensor) -> None:
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"routed_experts: topk_idx must be int64 or int32, got {topk_idx.dtype}")


def _in_range(num_experts: int) -> str:
    return f"routed_experts: topk_idx entries must lie in [-1, {num_experts})"


# Debug switch: fill every buffer the kernels write with NaN first, so a test can prove that
# no unwritten element leaks into a result (benchmarks/gpu_check_moe.py and the tests set it).
poison_buffers = False


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if poison_buffers:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
