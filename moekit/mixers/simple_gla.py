"""Linear mixers whose state decays by one scalar per head and step (the ``simple_gla`` op):

- ``SimpleGLA``: a data-dependent decay, logsigmoid(W_g x) / 16 (flash-linear-attention's
  SimpleGLA), swish output gate.
- ``LightningAttention`` (TransNormerLLM / MiniMax-01): a fixed per-head decay that depends on
  depth (``la.lightning_decay``), SiLU on q, k, v, no 1/sqrt(K) scale, sigmoid output gate.
- ``Retention`` (RetNet): a fixed per-head decay (``la.retention_decay``), rotary positions on
  q and k (RetNet's relative-position rotation, over the whole head at ``rope_theta``: the
  ``partial_rotary_factor`` and ``rope_scaling`` of a ``MixerConfig`` configure the model's
  softmax layers, not this rotation), swish output gate.

All three end in a per-head RMSNorm times the output gate.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from moekit.mixers.cache import RecurrentCache, SequenceInfo, zero_padding
from moekit.mixers.config import MixerConfig
from moekit.mixers.linear_base import LinearMixer
from moekit.mixers.norm import GatedRMSNorm
from moekit.mixers.precision import at_least_float32
from moekit.mixers.rope import RotaryEmbedding
from moekit.ops import linear_attention as la

GATE_LOGIT_NORMALIZER = 16  # keeps learned decays close to 1 at init (GLA paper)


class DecayedLinearAttention(LinearMixer, abc.ABC):
    """q/k/v/gate projections around ``la.simple_gla``; subclasses say how q, k, v and the log
    decay g [B, T, H] are formed."""

    gate_activation = "swish"
    scale: float | None = None  # None: K ** -0.5
    uses_positions = False

    def __init__(self, config: MixerConfig):
        super().__init__()
        h, dk, dv = self.project_qkv(config)
        self.g_proj = nn.Linear(config.hidden_size, h * dv, bias=False)
        self.o_norm = GatedRMSNorm(dv, config.norm_eps, activation=self.gate_activation)
        self.o_proj = nn.Linear(h * dv, config.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, info: SequenceInfo | None):
        b, t, _ = x.shape
        h, dk, dv = self.state_dims
        return (self.q_proj(x).view(b, t, h, dk), self.k_proj(x).view(b, t, h, dk),
                self.v_proj(x).view(b, t, h, dv))

    @abc.abstractmethod
    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H] float32 log decay of each step."""

    def forward(self, x: torch.Tensor, cache_entry: RecurrentCache | None = None,
                info: SequenceInfo | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, _, dv = self.state_dims
        if self.uses_positions and cache_entry is not None and info is None:
            raise ValueError(f"{type(self).__name__}: decoding with a cache needs SequenceInfo positions")
        mask = info.token_mask if info is not None else None
        q, k, v = self.qkv(x, info)
        # padding writes nothing (zero keys) and decays nothing (zero log-gates): a padded call that
        # continues a cached state leaves it as the row alone would
        k, g = zero_padding(k, mask), zero_padding(self.log_decay(x), mask)
        o = self.run_op(la.simple_gla, q, k, v, g, cache_entry=cache_entry, scale=self.scale)
        o = self.o_norm(o, self.g_proj(x).view(b, t, h, dv))
        return self.o_proj(o.reshape(b, t, h * dv))


class SimpleGLA(DecayedLinearAttention):
    def __init__(self, config: MixerConfig):
        super().__init__(config)
        self.gk_proj = nn.Linear(config.hidden_size, config.num_heads, bias=True)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(at_least_float32(self.gk_proj(x))) / GATE_LOGIT_NORMALIZER


class FixedDecayAttention(DecayedLinearAttention):
    """A per-head decay that is a constant of the architecture, not learned. It is rebuilt
    on each call (H numbers) rather than kept as a buffer that ``model.to(bfloat16)`` would round."""

    @abc.abstractmethod
    def head_log_decay(self, device: torch.device) -> torch.Tensor:
        """[H] float32 log decays."""

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_log_decay(x.device).expand(*x.shape[:2], -1)


class LightningAttention(FixedDecayAttention):
    gate_activation = "sigmoid"
    scale = 1.0  # MiniMax-01 does not scale q k^T

    def head_log_decay(self, device: torch.device) -> torch.Tensor:
        cfg = self.config
        return la.lightning_decay(cfg.num_heads, cfg.layer_idx, cfg.num_layers, device=device)

    def qkv(self, x: torch.Tensor, info: SequenceInfo | None):
        return tuple(F.silu(t) for t in super().qkv(x, info))


class Retention(FixedDecayAttention):
    uses_positions = True
    def __init__(self, config: MixerConfig):
        super().__init__(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def head_log_decay(self, device: torch.device) -> torch.Tensor:
        return la.retention_decay(self.config.num_heads, device=device)

    def qkv(self, x: torch.Tensor, info: SequenceInfo | None):
        q, k, v = super().qkv(x, info)
        if info is None:
            info = SequenceInfo.plain(x.shape[0], x.shape[1], x.device)
        return self.rotary(q, info.positions), self.rotary(k, info.positions), v
