"""Short causal depthwise convolution with a decoding state (DeltaNet, Gated DeltaNet, Mamba2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConvolution(nn.Module):
    """Causal depthwise conv1d + SiLU over [B, T, C].

    The state is the last ``kernel_size - 1`` inputs, [B, C, kernel_size - 1]. Prepending it
    (zeros at the start of a sequence) makes one code path serve training, prefill and
    one-token decoding, and chunked calls compute exactly what one long call would.
    ``bias`` adds a per-channel bias before the SiLU (Mamba2 checkpoints have one).
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = False):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=bias)

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.conv.in_channels, self.kernel_size - 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (silu(conv(x)) [B, T, C], new state)."""
        xt = x.transpose(1, 2)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        full = torch.cat([state.to(x.dtype), xt], dim=-1)
        y = F.conv1d(full, self.conv.weight, self.conv.bias, groups=xt.shape[1])
        return F.silu(y).transpose(1, 2), full[..., -(self.kernel_size - 1):]
