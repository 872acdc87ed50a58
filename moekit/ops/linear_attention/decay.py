"""Fixed per-head log-decays that turn ``simple_gla`` into lightning attention or retention.

Broadcast one over the sequence: ``g = decay.expand(B, T, H)`` (log space, all negative).
"""

from __future__ import annotations

import torch


def lightning_decay(num_heads: int, layer_idx: int, num_layers: int, *, dtype: torch.dtype = torch.float32,
                    device=None) -> torch.Tensor:
    """Log-decay [H] of lightning attention (MiniMax-01, as in its Hugging Face model).

    Head h decays by exp(-s_h) per step with the ALiBi-style slope s_h = 2^(-8 (h + 1) / H)
    (for H a power of two, exactly ALiBi's slopes, used by Lightning Attention-2), scaled down
    with depth by 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5 so later layers forget less.
    MiniMax applies no 1/sqrt(K) scaling: call ``simple_gla`` with ``scale=1.0`` to match it.
    """
    if num_heads < 1 or num_layers < 1 or not 0 <= layer_idx < num_layers:
        raise ValueError(f"lightning_decay: need num_heads >= 1 and 0 <= layer_idx < num_layers, got "
                         f"num_heads={num_heads}, layer_idx={layer_idx}, num_layers={num_layers}")
    exponent = torch.arange(1, num_heads + 1, dtype=dtype, device=device)
    slope = 2.0 ** (-8.0 / num_heads * exponent)
    depth = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return -slope * depth


def retention_decay(num_heads: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Log-decay [H] of retention (RetNet): log(1 - 2^(-5 - h)) for head h."""
    if num_heads < 1:
        raise ValueError(f"retention_decay: need num_heads >= 1, got {num_heads}")
    h = torch.arange(num_heads, dtype=dtype, device=device)
    return torch.log1p(-(2.0 ** (-5.0 - h)))
