"""Rotary position embedding (the rotate-half layout of Llama / Qwen)."""

from __future__ import annotations

import torch
from torch import nn

from moekit.mixers.precision import at_least_float32
from moekit.mixers.rope_scaling import YarnScaling


class RotaryEmbedding(nn.Module):
    """Angles are formed in float64 on each call: no buffer for ``model.to(bfloat16)`` to
    round, and exact positions however long the sequence. ``scaling`` (a ``YarnScaling``)
    extends the context with YaRN: blended frequencies, cos / sin scaled.

    ``rotary_dim`` (partial RoPE, e.g. Qwen3-Next) rotates only the first ``rotary_dim`` channels
    of each head, with the frequencies of a ``rotary_dim``-wide head, and passes the rest through;
    0 rotates nothing (NoPE)."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: YarnScaling | None = None,
                 rotary_dim: int | None = None):
        super().__init__()
        if rotary_dim is None:
            if head_dim % 2:
                raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
            rotary_dim = head_dim
        if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
            raise ValueError(f"RoPE needs an even rotary_dim in [0, head_dim={head_dim}], got {rotary_dim}")
        self.head_dim = rotary_dim
        self.theta = theta
        self.scaling = scaling

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, T, heads, head_dim] by the angles of ``positions`` [B, T]."""
        if self.head_dim < x.shape[-1]:
            if self.head_dim == 0:
                return x
            rot, rest = x.split([self.head_dim, x.shape[-1] - self.head_dim], dim=-1)
            return torch.cat([self(rot, positions), rest], dim=-1)
        if self.scaling is None:
            inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64,
                                                    device=x.device) / self.head_dim)
        else:
            inv_freq = self.scaling.inv_freq(self.head_dim, self.theta, x.device)
        angles = positions.to(torch.float64)[..., None] * inv_freq  # [B, T, head_dim / 2]
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
        xf = at_least_float32(x)
        cos, sin = angles.cos(), angles.sin()
        if self.scaling is not None:
            cos, sin = cos * self.scaling.cos_sin_scale(), sin * self.scaling.cos_sin_scale()
        cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
