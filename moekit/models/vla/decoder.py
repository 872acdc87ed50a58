"""The trajectory decoder: a small transformer over the H future points that attends to the
scene context. Given a noisy trajectory x_t and the flow time t it outputs a velocity (flow
objective); the regression baseline calls it with x = 0, t = 0 and reads a trajectory."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.mixers.norm import RMSNorm


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.kv(source).view(b, source.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, t, d))


class DecoderLayer(nn.Module):
    """Pre-norm: self-attention over the points, cross-attention to the scene, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_norm, self.cross_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.self_norm(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.cross_norm(x), context)
        return x + self.mlp(self.mlp_norm(x))


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features [B, dim] of flow times t [B] in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TrajectoryDecoder(nn.Module):
    def __init__(self, context_dim: int, dim: int, layers: int, heads: int, horizon: int):
        super().__init__()
        self.horizon = horizon
        self.context_proj = nn.Linear(context_dim, dim)
        self.point_in = nn.Linear(2, dim)
        self.position = nn.Parameter(torch.randn(horizon, dim) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList(DecoderLayer(dim, heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.point_out = nn.Linear(dim, 2)

    def project_context(self, context: torch.Tensor) -> torch.Tensor:
        """Encoder states [B, C, context_dim] -> decoder memory [B, C, dim]; done once per scene."""
        return self.context_proj(context)

    def forward(self, x: torch.Tensor, t: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x [B, H, 2], t [B], memory [B, C, dim] (from ``project_context``) -> [B, H, 2]."""
        time = time_features(t, self.position.shape[1]).to(self.position.dtype)
        h = self.point_in(x) + self.position + self.time_mlp(time)[:, None]
        for layer in self.layers:
            h = layer(h, memory)
        return self.point_out(self.norm(h))
