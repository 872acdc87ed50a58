"""Shapes and knobs a token mixer needs, independent of the model that stacks it."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.mixers.mla_config import MLAConfig
from moekit.mixers.rope_scaling import YarnScaling

QK_NORM_SCOPES = ("head", "all")

# Softmax-attention options that multi-head latent attention does not implement: their neutral
# value, and what MLA offers in their place.
MLA_IGNORES = {
    "qk_norm": (False, ""),
    "attention_output_gate": (False, ""),
    "partial_rotary_factor": (1.0, "; MLAConfig.qk_rope_head_dim sets the rotated width"),
    "attention_bias": (False, "; MLAConfig.bias adds MLA's projection biases"),
    "attention_scale": (None, "; MLAConfig.softmax_scale sets the softmax scale"),
}


@dataclass
class MixerConfig:
    """One mixer layer's configuration (the model builds it from its ``ModelConfig``).

    ``head_dim`` is the query/key width of a head; values are ``expand_v`` times wider (the
    state of a linear head is ``head_dim x value_dim``). ``layer_idx`` / ``num_layers`` are
    needed by lightning attention, whose fixed decay depends on depth.

    Options of the converted architectures: ``num_v_heads`` (Qwen3-Next's Gated DeltaNet: more
    value heads than q/k heads, each q/k head serving a run of consecutive value heads),
    ``partial_rotary_factor`` (RoPE on the first ``int(head_dim * factor)`` channels of a head;
    0 means no positions at all), ``attention_output_gate`` (Qwen3-Next: the query projection
    also yields a per-channel gate, sigmoid(gate) scales the attention output),
    ``attention_scale`` (softmax scale, None means head_dim ** -0.5; GraniteMoeHybrid's
    attention_multiplier), ``norm_unit_offset`` (q/k norms apply 1 + weight), ``ssm_groups``
    (Mamba2's B/C groups) and ``conv_bias`` (a bias in the short convolution: Mamba2, DeltaNet,
    Gated DeltaNet). A linear mixer refuses ``ssm_groups``, ``num_v_heads`` or ``conv_bias`` set
    where it does not implement them (``LinearMixer.refuse_unread``); with ``mla`` set, the
    softmax options MLA does not implement are refused (``MLA_IGNORES``).
    """

    hidden_size: int
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None  # softmax attention only; None means num_heads
    expand_v: int = 1
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None  # softmax attention / MLA: YaRN context extension
    norm_eps: float = 1e-6
    conv_size: int = 4  # short causal convolution (DeltaNet, Gated DeltaNet, Mamba2)
    ssm_state_size: int = 16  # Mamba2's N
    qk_norm: bool = False  # softmax attention: RMSNorm on q and k (Qwen3 style)
    qk_norm_scope: str = "head"  # "head": per head (Qwen3); "all": over all heads at once (OLMoE)
    attention_bias: bool = False  # softmax attention: biases on the q/k/v projections
    layer_idx: int = 0
    num_layers: int = 1
    mla: MLAConfig | None = None  # set: softmax layers use multi-head latent attention (DeepSeek)
    num_v_heads: int | None = None  # linear mixers with grouped value heads; None means num_heads
    partial_rotary_factor: float = 1.0
    attention_output_gate: bool = False
    attention_scale: float | None = None
    norm_unit_offset: bool = False
    ssm_groups: int = 1
    conv_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_v_heads is None:
            self.num_v_heads = self.num_heads
        for name in ("hidden_size", "num_heads", "head_dim", "num_kv_heads", "expand_v",
                     "ssm_state_size", "num_layers", "num_v_heads", "ssm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MixerConfig: {name} must be a positive integer, got {value!r}")
        if self.qk_norm_scope not in QK_NORM_SCOPES:
            raise ValueError(f"MixerConfig: unknown qk_norm_scope {self.qk_norm_scope!r}; choose from {QK_NORM_SCOPES}")
        if self.conv_size < 2:
            raise ValueError(f"MixerConfig: conv_size must be >= 2, got {self.conv_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"MixerConfig: num_heads ({self.num_heads}) must be divisible by "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.num_v_heads % self.num_heads:
            raise ValueError(f"MixerConfig: num_v_heads ({self.num_v_heads}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if not 0 <= self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ValueError(f"MixerConfig: partial_rotary_factor must be in [0, 1] and rotate an even number of "
                             f"channels, got {self.partial_rotary_factor} (rotary_dim {self.rotary_dim})")
        if self.attention_scale is not None and not self.attention_scale > 0:
            raise ValueError(f"MixerConfig: attention_scale must be None or > 0, got {self.attention_scale}")
        if not 0 <= self.layer_idx < self.num_layers:
            raise ValueError(f"MixerConfig: layer_idx {self.layer_idx} outside [0, {self.num_layers})")
        if self.mla is not None:
            self._refuse_options_mla_ignores()

    def _refuse_options_mla_ignores(self) -> None:
        """MLA replaces softmax attention but reads none of these: set, they were silently dropped
        and the model was another one than configured."""
        for name, (neutral, instead) in MLA_IGNORES.items():
            if getattr(self, name) != neutral:
                raise ValueError(f"MixerConfig: {name}={getattr(self, name)!r} is not implemented by multi-head "
                                 f"latent attention (leave it at {neutral!r}{instead})")
        if self.num_kv_heads != self.num_heads:  # every head reads the one shared latent: no KV groups
            raise ValueError(f"MixerConfig: num_kv_heads={self.num_kv_heads} is not implemented by multi-head latent "
                             f"attention (leave it at num_heads={self.num_heads})")

    @property
    def value_dim(self) -> int:
        return self.head_dim * self.expand_v

    @property
    def rotary_dim(self) -> int:
        """Channels of a head that RoPE rotates (truncated as transformers does)."""
        return int(self.head_dim * self.partial_rotary_factor)
