"""Quantized forms of expert weights kept between calls while the weights do not change.

The FP8 / MXFP8 routed experts (``fp8.py``) quantize both expert weights on every call. With
gradient accumulation, every micro-batch after a step's first would quantize the same weights
again, and so would every inference call; a ``WeightCache`` per layer
(``MoEConfig(cache_fp8_weights=True)``) keeps what the first call made. No Triton here: the
model holds the cache whatever its device.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


class WeightCache:
    """The quantized forms of a layer's expert weights, kept between calls.

    An entry serves only the same tensor, in the same storage, at the same version counter: every
    in-place update that autograd can see bumps it, the optimizers' included, so a step's later
    gradient-accumulation micro-batches, activation-checkpointing recomputes and inference reuse
    it, and the first call after an update quantizes again. An update through ``.data`` bypasses
    the counter: ``clear()`` after it (the trainer clears at every optimizer step). Between
    calls the cache holds one FP8 byte per weight element per orientation (two in training)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple] = {}

    def clear(self) -> None:
        self._entries.clear()

    def __getstate__(self) -> dict:
        """A copy (pickled with its model, or deep-copied) starts empty: the entries name this
        cache's tensors, by weak reference, which cannot be pickled."""
        return {"_entries": {}}

    def get(self, name: str, w: torch.Tensor, tag: tuple, make: Callable[[], tuple]) -> tuple:
        stamp = (w.data_ptr(), w._version, tag)
        hit = self._entries.get(name)
        if hit is not None and hit[0]() is w and hit[1] == stamp:
            return hit[2]
        value = make()
        self._entries[name] = (weakref.ref(w), stamp, value)
        return value
