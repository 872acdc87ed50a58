"""Per-expert counts without a host sync (``torch.bincount`` on CUDA reads its input's max)."""

from __future__ import annotations

import torch


def count_per_bin(keys: torch.Tensor, num_bins: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """counts[b] = number (or summed ``weights``) of entries of ``keys`` equal to b; keys in [0, num_bins)."""
    keys = keys.reshape(-1).long()
    if weights is None:
        weights = torch.ones_like(keys)
    counts = torch.zeros(num_bins, dtype=weights.dtype, device=keys.device)
    return counts.scatter_add_(0, keys, weights.reshape(-1))
