"""Basic linear attention (Katharopoulos et al. 2020): phi(q) phi(k)^T v with phi = elu + 1,
no decay; the unnormalised sum is tamed by a per-head RMSNorm on the output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.mixers.cache import RecurrentCache, SequenceInfo, zero_padding
from moekit.mixers.config import MixerConfig
from moekit.mixers.linear_base import LinearMixer
from moekit.mixers.norm import RMSNorm
from moekit.ops import linear_attention as la


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


class LinearAttention(LinearMixer):
    def __init__(self, config: MixerConfig):
        super().__init__()
        h, dk, dv = self.project_qkv(config)
        self.o_norm = RMSNorm(dv, config.norm_eps)
        self.o_proj = nn.Linear(h * dv, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache_entry: RecurrentCache | None = None,
                info: SequenceInfo | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, dk, dv = self.state_dims
        mask = info.token_mask if info is not None else None
        q = elu_feature_map(self.q_proj(x).view(b, t, h, dk))
        k = zero_padding(elu_feature_map(self.k_proj(x).view(b, t, h, dk)), mask)
        v = self.v_proj(x).view(b, t, h, dv)
        o = self.run_op(la.linear_attn, q, k, v, cache_entry=cache_entry)
        return self.o_proj(self.o_norm(o).reshape(b, t, h * dv))
