"""Gated DeltaNet as Qwen3-Next lays it out (its Hugging Face checkpoints' tensors, as they are).

Against moekit's ``GatedDeltaNet``: one fused input projection holding, for each q/k head, its
[q | k | v | z] rows (z the output gate), and one holding [beta | a] per q/k head; grouped
value heads (``num_v_heads`` a multiple of ``num_heads``, each q/k head serving that many
consecutive value heads); q and k L2-normalised inside the op as x / sqrt(sum x^2 + 1e-6).
The rest is the same: short causal conv + SiLU over [q | k | v], beta = sigmoid(b),
g = -exp(A_log) * softplus(a + dt_bias), a swish-gated RMSNorm per value head.
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


class Qwen3NextGatedDeltaNet(LinearMixer):
    reads = ("conv_bias", "num_v_heads")

    def __init__(self, config: MixerConfig):
        super().__init__()
        self.refuse_unread(config)
        self.config = config
        nk, nv, dk, dv = config.num_heads, config.num_v_heads, config.head_dim, config.value_dim
        self.group = nv // nk  # value heads per q/k head
        self.state_dims = (nv, dk, dv)
        self.in_proj_qkvz = nn.Linear(config.hidden_size, nk * (2 * dk + 2 * self.group * dv), bias=False)
        self.in_proj_ba = nn.Linear(config.hidden_size, 2 * nv, bias=False)
        self.conv = ShortConvolution(2 * nk * dk + nv * dv, config.conv_size, bias=config.conv_bias)
        self.A_log = nn.Parameter(init_log_decay_rate(nv))
        self.dt_bias = nn.Parameter(init_dt_bias(nv))
        self.norm = GatedRMSNorm(dv, config.norm_eps, activation="swish")
        self.out_proj = nn.Linear(nv * dv, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache_entry: RecurrentCache | None = None,
                info: SequenceInfo | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        nk, dk, r = self.config.num_heads, self.config.head_dim, self.group
        nv, _, dv = self.state_dims
        mask = info.token_mask if info is not None else None
        q, k, v, z = self.in_proj_qkvz(x).view(b, t, nk, -1).split([dk, dk, r * dv, r * dv], dim=-1)
        beta, a = self.in_proj_ba(x).view(b, t, nk, 2 * r).split([r, r], dim=-1)
        qkv = self.short_conv(torch.cat([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], dim=-1),
                              cache_entry, mask)
        q, k, v = qkv.split([nk * dk, nk * dk, nv * dv], dim=-1)
        q = q.view(b, t, nk, dk).repeat_interleave(r, dim=2)
        k = zero_padding(k.view(b, t, nk, dk).repeat_interleave(r, dim=2), mask)
        beta = torch.sigmoid(at_least_float32(beta.reshape(b, t, nv)))
        g = -at_least_float32(self.A_log).exp() * F.softplus(at_least_float32(a.reshape(b, t, nv)) + self.dt_bias)
        g = zero_padding(g, mask)  # padding must not decay a cached state
        o = self.run_op(la.gated_delta_rule, q, k, v.view(b, t, nv, dv), g, beta, cache_entry=cache_entry,
                        use_qk_l2norm_in_kernel=True)
        o = self.norm(o, z.reshape(b, t, nv, dv))
        return self.out_proj(o.reshape(b, t, nv * dv))
