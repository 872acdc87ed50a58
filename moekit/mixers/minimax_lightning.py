"""Lightning attention as MiniMax-Text-01 lays it out (its Hugging Face checkpoints' tensors).

Against moekit's ``LightningAttention``: one fused projection holding, per head, its [q | k | v]
rows; the output RMSNorm spans all heads at once (epsilon fixed at 1e-6, whatever the model's);
the sigmoid output gate comes from its own projection and multiplies the normalised output.
Same recurrence: SiLU on q, k, v, the fixed depth-dependent per-head decay
(``la.lightning_decay``), no 1/sqrt(K) scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.mixers.cache import RecurrentCache, SequenceInfo, zero_padding
from moekit.mixers.config import MixerConfig
from moekit.mixers.linear_base import LinearMixer
from moekit.mixers.norm import RMSNorm
from moekit.ops import linear_attention as la

NORM_EPS = 1e-6  # transformers builds this norm with the default epsilon, not rms_norm_eps


class MiniMaxLightningAttention(LinearMixer):
    def __init__(self, config: MixerConfig):
        super().__init__()
        self.refuse_unread(config)
        self.config = config
        h, dk, dv = config.num_heads, config.head_dim, config.value_dim
        self.state_dims = (h, dk, dv)
        self.qkv_proj = nn.Linear(config.hidden_size, h * (2 * dk + dv), bias=False)
        self.output_gate = nn.Linear(config.hidden_size, h * dv, bias=False)
        self.norm = RMSNorm(h * dv, NORM_EPS)
        self.out_proj = nn.Linear(h * dv, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache_entry: RecurrentCache | None = None,
                info: SequenceInfo | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, dk, dv = self.state_dims
        cfg = self.config
        q, k, v = F.silu(self.qkv_proj(x)).view(b, t, h, -1).split([dk, dk, dv], dim=-1)
        mask = info.token_mask if info is not None else None
        k = zero_padding(k, mask)
        g = zero_padding(la.lightning_decay(h, cfg.layer_idx, cfg.num_layers, device=x.device).expand(b, t, h), mask)
        o = self.run_op(la.simple_gla, q, k, v, g, cache_entry=cache_entry, scale=1.0)
        o = self.norm(o.reshape(b, t, h * dv)) * torch.sigmoid(self.output_gate(x))
        return self.out_proj(o)
