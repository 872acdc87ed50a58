"""Operand checks shared by the routed-expert backends (reference, grouped_mm, Triton bf16 and FP8)."""

from __future__ import annotations

import torch

from moekit.ops.activations import is_gated

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_operands(x, topk_idx, topk_weight, w_up, w_down, activation: str) -> None:
    """Shape and dtype errors naming the problem, for every backend: a wrong shape must not broadcast
    (an odd up width splits into unequal gate / up halves), nor be read out of bounds by a kernel."""
    gated = is_gated(activation)  # raises on an unknown activation
    if x.dim() != 2:
        raise ValueError(f"routed_experts: x must be [tokens, hidden], got shape {tuple(x.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape != topk_weight.shape or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"routed_experts: topk_idx {tuple(topk_idx.shape)} and topk_weight "
                         f"{tuple(topk_weight.shape)} must both be [tokens={x.shape[0]}, k]")
    if topk_idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"routed_experts: topk_idx must be int64 or int32, got {topk_idx.dtype}")
    if not topk_weight.is_floating_point():
        raise TypeError(f"routed_experts: topk_weight must be floating point, got {topk_weight.dtype}")
    if w_up.dim() != 3 or w_down.dim() != 3 or w_up.shape[0] != w_down.shape[0]:
        raise ValueError(f"routed_experts: w_up {tuple(w_up.shape)} / w_down {tuple(w_down.shape)} "
                         "must be [experts, up, hidden] / [experts, hidden, ffn]")
    if w_up.shape[2] != x.shape[1] or w_down.shape[1] != x.shape[1]:
        raise ValueError(f"routed_experts: expert weights expect hidden {w_up.shape[2]} / {w_down.shape[1]}, "
                         f"x has {x.shape[1]}")
    ffn = w_down.shape[2]
    if w_up.shape[1] != (2 * ffn if gated else ffn):
        raise ValueError(f"routed_experts: w_up has {w_up.shape[1]} rows but {activation!r} with ffn size "
                         f"{ffn} needs {2 * ffn if gated else ffn}")
    # Under autocast the matmuls cast their operands (the reference's do); outside it they would not.
    if not (x.dtype == w_up.dtype == w_down.dtype) and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"routed_experts: x, w_up, w_down must share a dtype, got "
                        f"{x.dtype}, {w_up.dtype}, {w_down.dtype}")


def check_expert_indices(topk_idx: torch.Tensor, num_experts: int) -> None:
    """Every index in [-1, num_experts): the backends that loop or sort by expert would otherwise treat
    an index >= num_experts or < -1 as a dropped assignment, silently. Checked on the device (no host
    sync on CUDA; on the CPU it raises at once)."""
    flat = topk_idx.reshape(-1)
    torch._assert_async((flat.clamp(-1, num_experts - 1) == flat).all(),
                        f"routed_experts: topk_idx entries must lie in [-1, {num_experts})")


def check_fused_operands(backend: str, x, topk_idx, topk_weight, w_up, w_down, activation: str) -> None:
    """Errors naming the problem for operands a fused kernel cannot take."""
    check_operands(x, topk_idx, topk_weight, w_up, w_down, activation)
    for name, t in (("x", x), ("w_up", w_up), ("w_down", w_down)):
        if t.dtype not in FUSED_DTYPES:
            raise TypeError(f"routed_experts ({backend}): {name} has dtype {t.dtype}; supported: {FUSED_DTYPES}")
    if not (x.dtype == w_up.dtype == w_down.dtype):
        raise TypeError(f"routed_experts ({backend}): x, w_up, w_down must share a dtype, got "
                        f"{x.dtype}, {w_up.dtype}, {w_down.dtype}")
