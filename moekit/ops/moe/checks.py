"""Operand checks shared by the fused routed-expert backends (Triton bf16 and FP8)."""

from __future__ import annotations

import torch

from moekit.ops.activations import is_gated

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_fused_operands(backend: str, x, topk_weight, w_up, w_down, activation: str) -> None:
    """Errors naming the problem for operands a fused kernel cannot take."""
    gated = is_gated(activation)  # raises on an unknown activation
    for name, t in (("x", x), ("w_up", w_up), ("w_down", w_down)):
        if t.dtype not in FUSED_DTYPES:
            raise TypeError(f"routed_experts ({backend}): {name} has dtype {t.dtype}; supported: {FUSED_DTYPES}")
    if not (x.dtype == w_up.dtype == w_down.dtype):
        raise TypeError(f"routed_experts ({backend}): x, w_up, w_down must share a dtype, got "
                        f"{x.dtype}, {w_up.dtype}, {w_down.dtype}")
    if not topk_weight.is_floating_point():
        raise TypeError(f"routed_experts: topk_weight must be floating point, got {topk_weight.dtype}")
    ffn = w_down.shape[2]
    if w_up.shape[1] != (2 * ffn if gated else ffn):
        raise ValueError(f"routed_experts: w_up has {w_up.shape[1]} rows but {activation!r} with ffn size "
                         f"{ffn} needs {2 * ffn if gated else ffn}")
