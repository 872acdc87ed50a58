"""Per-layer decoding caches and the per-call sequence bookkeeping mixers read.

Every entry is preallocated and updated in place, so a decode step keeps fixed shapes and
fixed tensor addresses (what CUDA-graph capture needs):

- ``RecurrentCache`` (linear mixers): the [B, H, K, V] float32 state plus the short-conv
  state; its size does not depend on the sequence length.
- ``KVCache`` (softmax attention): keys and values for ``max_len`` slots, allocated once
  for the longest sequence the cache will hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class RecurrentCache:
    state: torch.Tensor  # [B, H, K, V] float32
    conv_state: torch.Tensor | None = None  # [B, C, conv_size - 1]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.state, self.conv_state)


@dataclass
class KVCache:
    key: torch.Tensor  # [B, kv_heads, max_len, head_dim]
    value: torch.Tensor

    @property
    def nbytes(self) -> int:
        return _nbytes(self.key, self.value)


@dataclass
class SequenceInfo:
    """What a mixer needs to know about the tokens of one call beyond their hidden states.

    positions:  [B, T] index of each token among its row's real tokens (RoPE angle).
    token_mask: [B, T] bool, False at (left) padding; None means every token is real.
    slots:      [T] KV-cache slots the tokens are written to (None without a cache).
    key_valid:  [B, S] bool, which of the first S cache slots hold real tokens, the slots the
                call attends over: S is the filled length for a multi-token call, max_len
                for a one-token step (None without a cache).
    """

    positions: torch.Tensor
    token_mask: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None

    @classmethod
    def plain(cls, batch_size: int, seq_len: int, device=None) -> SequenceInfo:
        """Unpadded tokens at positions 0..T-1, no cache."""
        positions = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
        return cls(positions=positions)

    @classmethod
    def from_mask(cls, token_mask: torch.Tensor) -> SequenceInfo:
        """Left-padded rows without a cache: positions count real tokens only."""
        token_mask = token_mask.bool()
        positions = (token_mask.long().cumsum(1) - 1).clamp(min=0)
        return cls(positions=positions, token_mask=token_mask)


def zero_padding(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded tokens of [B, T, ...] so they add nothing to a recurrent or conv state."""
    if token_mask is None:
        return x
    mask = token_mask.view(*token_mask.shape, *([1] * (x.dim() - 2)))
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
