"""Expert weights: the routed experts as stacked tensors, and a plain FFN for shared/dense use."""

from __future__ import annotations

import torch
from torch import nn

from moekit.ops.activations import apply_activation, up_width
from moekit.ops.moe.weight_cache import WeightCache


class RoutedExperts(nn.Module):
    """E experts stored as ``w_up`` [E, U, H] and ``w_down`` [E, H, F] (per-expert nn.Linear layout;
    U = 2F for gated activations, gate rows first). ``fp8_weights``: their quantized forms kept
    between calls (``MoEConfig.cache_fp8_weights``), or None."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str,
                 init_std: float = 0.02):
        super().__init__()
        self.activation = activation
        self.fp8_weights: WeightCache | None = None
        self.w_up = nn.Parameter(torch.empty(num_experts, up_width(activation, ffn_hidden_size), hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        nn.init.normal_(self.w_up, std=init_std)
        nn.init.normal_(self.w_down, std=init_std)

    @property
    def num_experts(self) -> int:
        return self.w_up.shape[0]

    def _apply(self, fn, recurse=True):
        # A cast or move (.to, .half, .cuda) gives the weights new storage, which can land at the old
        # address with the old version counter: the cache would then match an entry of other values.
        out = super()._apply(fn, recurse)
        if self.fp8_weights is not None:
            self.fp8_weights.clear()
        return out


class FeedForward(nn.Module):
    """A dense (gated) MLP: the shared experts fused into one, or a dense layer of the model."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu",
                 init_std: float = 0.02):
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(hidden_size, up_width(activation, ffn_hidden_size), bias=False)
        self.down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)
        nn.init.normal_(self.up.weight, std=init_std)
        nn.init.normal_(self.down.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(apply_activation(self.up(x), self.activation))
