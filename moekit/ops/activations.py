"""Expert FFN activations. Gated ones take the up-projection output as [gate | up] halves.

SwiGLU is silu(gate) * up (Shazeer, 2020; Llama, Mixtral, DeepSeek, Qwen). GeGLU and "gelu" use the
exact erf GELU; checkpoints trained with the tanh approximation (T5 v1.1 "gated-gelu", Gemma's
"gelu_pytorch_tanh") differ from it by up to ~1e-3 per activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GATED = {"swiglu": F.silu, "geglu": F.gelu}


def is_gated(activation: str) -> bool:
    if activation in GATED:
        return True
    if activation == "gelu":
        return False
    raise ValueError(f"unknown activation {activation!r}; choose from swiglu, geglu, gelu")


def up_width(activation: str, ffn_hidden_size: int) -> int:
    """Rows of the up-projection: gated activations need a gate and an up half."""
    return 2 * ffn_hidden_size if is_gated(activation) else ffn_hidden_size


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """[..., up_width] -> [..., ffn_hidden_size]."""
    if is_gated(activation):
        if h.shape[-1] % 2:  # chunk would give unequal halves, and the product would broadcast them
            raise ValueError(f"{activation}: the up-projection output [..., gate | up] needs an even width, "
                             f"got {h.shape[-1]}")
        gate, up = h.chunk(2, dim=-1)
        return GATED[activation](gate) * up
    return F.gelu(h)
