"""DeltaNet (Schlag et al. 2021; Yang et al. 2024) and Gated DeltaNet (Yang et al. 2025).

Both: q, k, v through one short causal conv + SiLU, L2-normalised q and k per head,
beta = sigmoid(W_b x) the write strength. DeltaNet ends in a per-head RMSNorm; Gated DeltaNet
adds the Mamba2-style decay g = -exp(A_log) * softplus(W_a x + dt_bias) and a swish-gated
RMSNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.mixers.cache import RecurrentCache, SequenceInfo, zero_padding
from moekit.mixers.config import MixerConfig
from moekit.mixers.conv import ShortConvolution
from moekit.mixers.linear_base import LinearMixer, init_dt_bias, init_log_decay_rate
from moekit.mixers.norm import GatedRMSNorm, RMSNorm
from moekit.mixers.precision import at_least_float32
from moekit.ops import linear_attention as la


class DeltaNet(LinearMixer):
    reads = ("conv_bias",)

    def __init__(self, config: MixerConfig):
        super().__init__()
        h, dk, dv = self.project_qkv(config)
        self.b_proj = nn.Linear(config.hidden_size, h, bias=False)
        # One depthwise conv over [q | k | v] is the same function as three separate ones.
        self.conv = ShortConvolution(h * (2 * dk + dv), config.conv_size, bias=config.conv_bias)
        self.o_proj = nn.Linear(h * dv, config.hidden_size, bias=False)
        self.o_norm = self.make_output_norm()

    def make_output_norm(self) -> nn.Module:
        return RMSNorm(self.config.value_dim, self.config.norm_eps)

    def qkv_beta(self, x: torch.Tensor, cache_entry: RecurrentCache | None, info: SequenceInfo | None):
        b, t, _ = x.shape
        h, dk, dv = self.state_dims
        mask = info.token_mask if info is not None else None
        qkv = self.short_conv(torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1),
                              cache_entry, mask)
        q, k, v = qkv.split([h * dk, h * dk, h * dv], dim=-1)
        # Back to v's dtype, not x's: under autocast the projections (and so v) are bf16 while x is float32.
        q = F.normalize(at_least_float32(q.view(b, t, h, dk)), dim=-1).to(v.dtype)
        k = F.normalize(at_least_float32(k.view(b, t, h, dk)), dim=-1).to(v.dtype)
        beta = torch.sigmoid(at_least_float32(self.b_proj(x)))
        return q, zero_padding(k, mask), v.view(b, t, h, dv), beta

    def forward(self, x: torch.Tensor, cache_entry: RecurrentCache | None = None,
                info: SequenceInfo | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, _, dv = self.state_dims
        q, k, v, beta = self.qkv_beta(x, cache_entry, info)
        o = self.run_op(la.delta_rule, q, k, v, beta, cache_entry=cache_entry)
        return self.o_proj(self.o_norm(o).reshape(b, t, h * dv))


class GatedDeltaNet(DeltaNet):
    def __init__(self, config: MixerConfig):
        super().__init__(config)
        h = config.num_heads
        self.a_proj = nn.Linear(config.hidden_size, h, bias=False)
        self.A_log = nn.Parameter(init_log_decay_rate(h))
        self.dt_bias = nn.Parameter(init_dt_bias(h))
        self.g_proj = nn.Linear(config.hidden_size, h * config.value_dim, bias=False)

    def make_output_norm(self) -> nn.Module:
        return GatedRMSNorm(self.config.value_dim, self.config.norm_eps, activation="swish")

    def forward(self, x: torch.Tensor, cache_entry: RecurrentCache | None = None,
                info: SequenceInfo | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, _, dv = self.state_dims
        q, k, v, beta = self.qkv_beta(x, cache_entry, info)
        g = -at_least_float32(self.A_log).exp() * F.softplus(at_least_float32(self.a_proj(x)) + self.dt_bias)
        g = zero_padding(g, info.token_mask if info is not None else None)  # padding must not decay a cached state
        o = self.run_op(la.gated_delta_rule, q, k, v, g, beta, cache_entry=cache_entry)
        o = self.o_norm(o, self.g_proj(x).view(b, t, h, dv))
        return self.o_proj(o.reshape(b, t, h * dv))
