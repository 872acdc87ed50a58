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
from torch.optim.optimizer import register_optimizer_step_pre_hook


class WeightCache:
    """The quantized forms of a layer's expert weights, kept between calls.

    An entry serves only the same tensor, in the same storage, at the same version counter (every
    in-place update that autograd can see bumps it). Every step of a ``torch.optim`` optimizer
    clears every cache first (a global step pre-hook): fused optimizers update weights without
    bumping the counter, and the step needs the memory. So a step's later gradient-accumulation
    micro-batches, activation-checkpointing recomputes and inference reuse the entries, and the
    first call after an update quantizes again. Weights changed any other way without the counter
    (through ``.data``, by another optimizer library): call ``clear_all()`` after. Between calls a
    cache holds, per weight element and orientation (two in training), one FP8 byte, or two bytes
    where MX operands are held as their bf16 values (``fp8.storage``)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple] = {}
        _start_clearing_at_optimizer_steps()
        _live.add(self)

    def clear(self) -> None:
        self._entries.clear()

    def __getstate__(self) -> dict:
        """A copy (pickled with its model, or deep-copied) starts empty: the entries name this
        cache's tensors, by weak reference, which cannot be pickled."""
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def get(self, name: str, w: torch.Tensor, tag: tuple, make: Callable[[], tuple]) -> tuple:
        stamp = (w.data_ptr(), w._version, tag)
        hit = self._entries.get(name)
        if hit is not None and hit[0]() is w and hit[1] == stamp:
            return hit[2]
        value = make()
        self._entries[name] = (weakref.ref(w), stamp, value)
        return value


_live: weakref.WeakSet[WeightCache] = weakref.WeakSet()
_hook: list = []


def clear_all() -> None:
    """Empty every live cache (what each optimizer step does first)."""
    for cache in list(_live):
        cache.clear()


def _start_clearing_at_optimizer_steps() -> None:
    if not _hook:  # one global hook, registered when the first cache is made
        _hook.append(register_optimizer_step_pre_hook(lambda *_: clear_all()))
