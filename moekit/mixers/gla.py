"""Gated linear attention (Yang et al. 2023): a data-dependent decay per key channel,
low-rank gate projection, swish output gate and per-head RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.mixers.cache import RecurrentCache, SequenceInfo, zero_padding
from moekit.mixers.config import MixerConfig
from moekit.mixers.linear_base import LinearMixer
from moekit.mixers.norm import GatedRMSNorm
from moekit.mixers.precision import at_least_float32
from moekit.mixers.simple_gla import GATE_LOGIT_NORMALIZER
from moekit.ops import linear_attention as la

GATE_LOW_RANK = 16


class GLA(LinearMixer):
    def __init__(self, config: MixerConfig):
        super().__init__()
        h, dk, dv = self.project_qkv(config)
        self.g_proj = nn.Linear(config.hidden_size, h * dv, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(config.hidden_size, GATE_LOW_RANK, bias=False),
                                     nn.Linear(GATE_LOW_RANK, h * dk, bias=True))
        self.o_norm = GatedRMSNorm(dv, config.norm_eps, activation="swish")
        self.o_proj = nn.Linear(h * dv, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache_entry: RecurrentCache | None = None,
                info: SequenceInfo | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, dk, dv = self.state_dims
        mask = info.token_mask if info is not None else None
        q = self.q_proj(x).view(b, t, h, dk)
        k = zero_padding(self.k_proj(x).view(b, t, h, dk), mask)
        v = self.v_proj(x).view(b, t, h, dv)
        # zero log-gates at padding: it must not decay a cached state
        gk = zero_padding(F.logsigmoid(at_least_float32(self.gk_proj(x))).view(b, t, h, dk) / GATE_LOGIT_NORMALIZER,
                          mask)
        o = self.run_op(la.gla, q, k, v, gk, cache_entry=cache_entry)
        o = self.o_norm(o, self.g_proj(x).view(b, t, h, dv))
        return self.o_proj(o.reshape(b, t, h * dv))
