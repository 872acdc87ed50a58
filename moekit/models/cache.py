"""The whole model's decoding cache: one entry per layer plus the slot / position bookkeeping."""

from __future__ import annotations

import dataclasses

import torch

from moekit.mixers.cache import KVCache, RecurrentCache, SequenceInfo


class ModelCache:
    """Per-layer entries (``RecurrentCache`` for linear layers, ``KVCache`` for softmax ones),
    all preallocated for ``batch_size`` rows and ``max_len`` token slots.

    ``advance(token_mask)`` claims the slots of the next call's tokens and returns the
    ``SequenceInfo`` the mixers read; its ``key_valid`` covers the slots filled so far for a
    multi-token call and the whole buffer for a one-token step. Slot counters and masks are device tensors updated in
    place (the decode step stays capturable); ``length`` mirrors the slot counter on the host
    only to refuse overflows with a clear error.
    """

    def __init__(self, entries: list[RecurrentCache | KVCache], batch_size: int, max_len: int,
                 device=None):
        self.entries = entries
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.real_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.next_slot = torch.zeros(1, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, layer_idx: int) -> RecurrentCache | KVCache:
        return self.entries[layer_idx]

    def advance(self, token_mask: torch.Tensor, padded: bool) -> SequenceInfo:
        """Book ``token_mask`` [B, T] (True for real tokens) into the next T slots.

        ``padded=False`` tells mixers every token is real, sparing them the masking."""
        b, t = token_mask.shape
        if b != self.batch_size:
            raise ValueError(f"ModelCache: built for batch size {self.batch_size}, got {b} rows")
        if self.length + t > self.max_len:
            raise ValueError(f"ModelCache: {self.length} + {t} tokens exceed the cache's max_len "
                             f"{self.max_len}; allocate a longer cache")
        token_mask = token_mask.bool()
        slots = self.next_slot + torch.arange(t, device=self.next_slot.device)
        positions = (self.real_tokens[:, None] + token_mask.long().cumsum(1) - 1).clamp(min=0)
        self.key_valid.index_copy_(1, slots, token_mask)
        self.real_tokens += token_mask.sum(1)
        self.next_slot += t
        self.length += t
        # A prompt chunk sees only the filled slots (the rest are masked out anyway, and attending
        # over them would make a long prefill cost max_len per query); a one-token step keeps the
        # whole buffer so its shapes never change (what CUDA-graph replay needs).
        visible = self.key_valid if t == 1 else self.key_valid[:, :self.length]
        return SequenceInfo(positions=positions, token_mask=token_mask if padded else None, slots=slots,
                            key_valid=visible)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the cache for new sequences, in place: every tensor keeps its address (a
        captured CUDA graph keeps reading and writing the same buffers)."""
        for entry in self.entries:
            for f in dataclasses.fields(entry):
                value = getattr(entry, f.name)
                if isinstance(value, torch.Tensor):
                    value.zero_()
        for buffer in (self.key_valid, self.real_tokens, self.next_slot):
            buffer.zero_()
        self.length = 0

    def nbytes(self, layer_idx: int | None = None) -> int:
        """Bytes held by one layer's entry, or by all of them."""
        if layer_idx is not None:
            return self.entries[layer_idx].nbytes
        return sum(e.nbytes for e in self.entries)
