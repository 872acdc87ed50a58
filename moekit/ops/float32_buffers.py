"""Buffers that stay float32 when their module is cast (``.bfloat16()``, ``.double()``, ``.to(dtype)``).

Balancing biases, normalisers and similar statistics move by small steps or feed comparisons that
bf16 would round away. ``nn.Module._apply`` casts every floating buffer, so a module keeps these by
saving them before the cast and putting the float32 values back after, on the new device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def kept_in_float32(module: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Around ``super()._apply(...)``: the float32 buffers ``names`` keep their dtype and values."""
    before = {name: getattr(module, name) for name in names}
    yield
    for name, value in before.items():
        after = getattr(module, name)
        if value.dtype == torch.float32 and after.dtype != torch.float32:
            setattr(module, name, value.to(after.device))
