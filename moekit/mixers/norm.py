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
    """RMSNorm over the last dim, computed in (at least) float32, cast back to the input dtype.

    ``unit_offset`` stores the weight zero-centred and applies ``1 + weight`` (Qwen3-Next's
    norms), so weight decay pulls the scale towards 1 rather than 0.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def scale(self) -> torch.Tensor:
        # 1 + weight in (at least) float32: in bf16 the sum would round; a float64 weight stays float64
        return 1.0 + at_least_float32(self.weight) if self.unit_offset else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale(), self.eps).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """``norm(x) * act(gate)``, or ``norm(x * act(gate))`` with ``norm_before_gate=False``
    (Mamba2's order). Applied per head: the caller reshapes to [..., heads, dim].

    ``group_size`` (Mamba2 with several B/C groups) takes the RMS over consecutive groups of
    that many channels while the weight still spans all ``dim``; None means one group."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "swish", norm_before_gate: bool = True,
                 group_size: int | None = None):
        super().__init__(dim, eps)
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"unknown gate activation {activation!r}; choose from {sorted(GATE_ACTIVATIONS)}")
        if group_size is not None and (group_size <= 0 or dim % group_size):
            raise ValueError(f"GatedRMSNorm: group_size {group_size} must divide dim {dim}")
        self.act = GATE_ACTIVATIONS[activation]
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size or dim

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size == x.shape[-1]:
            return rms_norm(x, self.weight, self.eps)
        groups = at_least_float32(x).unflatten(-1, (-1, self.group_size))
        normed = F.rms_norm(groups, (self.group_size,), None, self.eps).flatten(-2)
        return normed * self.weight.to(normed.dtype)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        gate = self.act(at_least_float32(gate))
        if self.norm_before_gate:
            return (self._norm(x) * gate).to(x.dtype)
        return self._norm(at_least_float32(x) * gate).to(x.dtype)
