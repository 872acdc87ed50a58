"""Shape of multi-head latent attention (DeepSeek-V2/V3), kept apart so configs import it cheaply."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moekit.validation import check_known_keys, is_int, is_number


@dataclass
class MLAConfig:
    """Multi-head latent attention: keys and values are rebuilt from a shared ``kv_lora_rank``
    latent, plus one ``qk_rope_head_dim`` rotary key shared by all heads (the decoupled RoPE).

    A query head is ``qk_nope_head_dim + qk_rope_head_dim`` wide, a value head
    ``v_head_dim``. ``q_lora_rank=None`` projects queries directly, otherwise through a
    normalised ``q_lora_rank`` bottleneck. ``norm_eps`` is the latent RMSNorms' epsilon
    (DeepSeek fixes it at 1e-6 whatever the model's). ``bias`` adds biases to the q-down,
    kv-down and output projections (DeepSeek's ``attention_bias``). ``softmax_scale=None``
    means ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``.
    """

    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    q_lora_rank: int | None = None
    norm_eps: float = 1e-6
    bias: bool = False
    softmax_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"MLAConfig: {name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and (not is_int(self.q_lora_rank) or self.q_lora_rank <= 0):
            raise ValueError(f"MLAConfig: q_lora_rank must be None or a positive integer, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig: qk_rope_head_dim must be even (RoPE pairs), got {self.qk_rope_head_dim}")
        if self.softmax_scale is not None and not (is_number(self.softmax_scale) and self.softmax_scale > 0):
            raise ValueError(f"MLAConfig: softmax_scale must be None or a number > 0, got {self.softmax_scale!r}")
        if not (is_number(self.norm_eps) and 0 <= self.norm_eps < math.inf):
            raise ValueError(f"MLAConfig: norm_eps must be a finite number >= 0, got {self.norm_eps!r}")
        if not isinstance(self.bias, bool):  # a quoted YAML "false" would be true
            raise TypeError(f"MLAConfig: bias must be true or false, got {self.bias!r}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MLAConfig:
        check_known_keys(cls, values)
        return cls(**values)
