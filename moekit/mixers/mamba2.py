"""Mamba2 (Dao & Gu 2024): one input projection to [gate z | conv input xBC | dt], a short
causal conv over xBC, the SSD scan, a gated RMSNorm (gate first, then norm: Mamba2's order)
and the output projection. Heads of width ``value_dim``, state size ``ssm_state_size``,
``ssm_groups`` B/C groups (head h reads group h // (heads / groups); the gated norm then takes
its RMS per group of channels, as Mamba2 does), optional conv bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.mixers.cache import RecurrentCache, SequenceInfo, zero_padding
from moekit.mixers.config import MixerConfig
from moekit.mixers.conv import ShortConvolution
from moekit.mixers.linear_base import LinearMixer, init_dt_bias, init_log_decay_rate
from moekit.mixers.norm import GatedRMSNorm
from moekit.mixers.precision import at_least_float32
from moekit.ops import linear_attention as la


class Mamba2(LinearMixer):
    reads = ("conv_bias", "ssm_groups")

    def __init__(self, config: MixerConfig):
        super().__init__()
        self.refuse_unread(config)
        self.config = config
        h, p, n, g = config.num_heads, config.value_dim, config.ssm_state_size, config.ssm_groups
        if h % g:
            raise ValueError(f"Mamba2: num_heads ({h}) must be a multiple of ssm_groups ({g})")
        self.inner = h * p
        self.state_dims = (h, n, p)  # the op's [B, H, N, P] state
        self.in_proj = nn.Linear(config.hidden_size, 2 * self.inner + 2 * g * n + h, bias=False)
        self.conv = ShortConvolution(self.inner + 2 * g * n, config.conv_size, bias=config.conv_bias)
        self.A_log = nn.Parameter(init_log_decay_rate(h))
        self.dt_bias = nn.Parameter(init_dt_bias(h))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(self.inner, config.norm_eps, activation="swish", norm_before_gate=False,
                                 group_size=self.inner // g)
        self.out_proj = nn.Linear(self.inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache_entry: RecurrentCache | None = None,
                info: SequenceInfo | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, n, p = self.state_dims
        g = self.config.ssm_groups
        mask = info.token_mask if info is not None else None
        z, xbc, dt = self.in_proj(x).split([self.inner, self.inner + 2 * g * n, h], dim=-1)
        xs, B, C = self.short_conv(xbc, cache_entry, mask).split([self.inner, g * n, g * n], dim=-1)
        xs = zero_padding(xs.reshape(b, t, h, p), mask)
        dt = zero_padding(F.softplus(at_least_float32(dt) + self.dt_bias), mask)  # no decay at padding
        A = -at_least_float32(self.A_log).exp()
        y = self.run_op(la.mamba2_ssd, xs, dt, A, B.view(b, t, g, n), C.view(b, t, g, n), self.D,
                        cache_entry=cache_entry)
        return self.out_proj(self.norm(y.reshape(b, t, self.inner), z))
