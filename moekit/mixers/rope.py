"""Rotary position embedding (the rotate-half layout of Llama / Qwen)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, T, heads, head_dim] by the angles of ``positions`` [B, T] (float32 math)."""
        angles = positions.float()[..., None] * self.inv_freq  # [B, T, head_dim / 2]
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * angles.cos() + rotated * angles.sin()).to(x.dtype)
