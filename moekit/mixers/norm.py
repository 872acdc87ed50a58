"""RMSNorm and the gated RMSNorm used on the output of linear mixers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.mixers.precision import at_least_float32

GATE_ACTIVATIONS = {"swish": F.silu, "sigmoid": torch.sigmoid}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in (at least) float32; returns that precision."""
    x = at_least_float32(x)
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in (at least) float32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """``norm(x) * act(gate)``, or ``norm(x * act(gate))`` with ``norm_before_gate=False``
    (Mamba2's order). Applied per head: the caller reshapes to [..., heads, dim]."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "swish", norm_before_gate: bool = True):
        super().__init__(dim, eps)
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"unknown gate activation {activation!r}; choose from {sorted(GATE_ACTIVATIONS)}")
        self.act = GATE_ACTIVATIONS[activation]
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        gate = self.act(at_least_float32(gate))
        if self.norm_before_gate:
            return (rms_norm(x, self.weight, self.eps) * gate).to(x.dtype)
        return rms_norm(at_least_float32(x) * gate, self.weight, self.eps).to(x.dtype)
