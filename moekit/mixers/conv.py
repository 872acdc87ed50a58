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

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (silu(conv(x)) [B, T, C], new state). ``token_mask`` [B, T] (False at padding):
        each row's real tokens are convolved right after the state, as if its padding were absent
        (a padded call that continues a state must not put padding into the window); the outputs at
        padding are zero."""
        xt = x.transpose(1, 2)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        full = torch.cat([state.to(x.dtype), xt], dim=-1)
        order = None
        if token_mask is not None:  # move each row's padding to its front, the rest keeping its order
            keep = F.pad(token_mask.bool(), (full.shape[-1] - xt.shape[-1], 0), value=True)
            order = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices.unsqueeze(1).expand_as(full)
            full = full.gather(-1, order)
        y = F.silu(F.conv1d(full, self.conv.weight, self.conv.bias, groups=xt.shape[1]))
        if order is not None:  # each output back to its token's place (outputs that ended at the state drop out)
            y = torch.zeros_like(full).scatter(-1, order[..., -y.shape[-1]:], y)[..., -y.shape[-1]:]
        return y.transpose(1, 2), full[..., -(self.kernel_size - 1):]
