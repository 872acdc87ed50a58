"""YaRN context extension for RoPE (Peng et al., 2023), as DeepSeek-V3 and long-context Qwen use it.

Each rotary frequency is blended between its original value (high frequencies, many turns
within the original context: extrapolated) and the value divided by ``factor`` (low
frequencies: interpolated), with a linear ramp between the dimensions that make
``beta_fast`` and ``beta_slow`` turns over ``original_max_len`` positions. cos and sin are
then multiplied by ``attention_factor``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from moekit.validation import check_known_keys, is_int, is_number


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term, 0.1 * mscale * ln(factor) + 1 (1 without extension)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass
class YarnScaling:
    """``factor``: context extension ratio; ``original_max_len``: the pretraining context.
    ``attention_factor=None`` derives it: mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    when both are given (DeepSeek), else mscale(factor). ``truncate`` rounds the ramp's ends
    outwards to whole dimensions."""

    factor: float
    original_max_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        if not self.factor >= 1:
            raise ValueError(f"YarnScaling: factor must be >= 1, got {self.factor}")
        if not is_int(self.original_max_len) or self.original_max_len <= 0:
            raise ValueError(f"YarnScaling: original_max_len must be a positive integer, got {self.original_max_len!r}")
        if self.beta_fast <= self.beta_slow or self.beta_slow <= 0:
            raise ValueError(f"YarnScaling: need beta_fast > beta_slow > 0, got {self.beta_fast}, {self.beta_slow}")
        if self.attention_factor is not None and not self.attention_factor > 0:  # 0 flattens every score
            raise ValueError(f"YarnScaling: attention_factor must be None or > 0, got {self.attention_factor}")

    def _check_types(self) -> None:
        """A quoted YAML value is an error naming its key, not another model (the string "false" is true)."""
        for name, optional in (("factor", False), ("beta_fast", False), ("beta_slow", False), ("mscale", True),
                               ("mscale_all_dim", True), ("attention_factor", True)):
            value = getattr(self, name)
            if not (is_number(value) or optional and value is None):
                raise TypeError(f"YarnScaling: {name} must be a number{' or None' if optional else ''}, got {value!r}")
        if not isinstance(self.truncate, bool):
            raise TypeError(f"YarnScaling: truncate must be true or false, got {self.truncate!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> YarnScaling:
        check_known_keys(cls, values)
        return cls(**values)

    def cos_sin_scale(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def inv_freq(self, head_dim: int, theta: float, device=None) -> torch.Tensor:
        """The blended inverse frequencies [head_dim / 2], float64."""
        half = head_dim // 2
        base = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)

        def dim_of(turns: float) -> float:  # the dimension whose frequency makes `turns` turns
            return head_dim * math.log(self.original_max_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(self.beta_fast), dim_of(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # a zero-width ramp would divide by zero
        ramp = ((torch.arange(half, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
        return base / self.factor * (1 - keep) + base * keep
