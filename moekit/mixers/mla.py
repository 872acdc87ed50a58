"""Multi-head latent attention (DeepSeek-V2/V3): low-rank queries and a cached latent for keys/values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.mixers.attention import visible_keys
from moekit.mixers.cache import SequenceInfo
from moekit.mixers.config import MixerConfig
from moekit.mixers.norm import RMSNorm
from moekit.mixers.rope import RotaryEmbedding


@dataclass
class LatentCache:
    """What MLA caches per token: the normalised kv latent and the shared rotary key (already
    rotated), [B, max_len, kv_lora_rank] and [B, max_len, qk_rope_head_dim]; per-head keys and
    values are rebuilt from them at each call."""

    latent: torch.Tensor
    rotary_key: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.latent, self.rotary_key))


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA over [B, T, hidden], configured by ``config.mla`` (an ``MLAConfig``).

    Per head, the query is [nope | rope] (``q_proj``, or ``q_a_proj`` -> norm -> ``q_b_proj``);
    ``kv_a_proj`` gives the latent and one rotary key for all heads; ``kv_b_proj`` expands the
    normalised latent into each head's [k_nope | v]. RoPE uses the rotate-half layout (an
    interleaved checkpoint is converted by permuting the rope rows of its projections).
    """

    def __init__(self, config: MixerConfig):
        super().__init__()
        if config.mla is None:
            raise ValueError("MultiHeadLatentAttention: MixerConfig.mla is not set")
        self.config = config
        mla = config.mla
        h, hidden = config.num_heads, config.hidden_size
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, h * mla.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, mla.q_lora_rank, bias=mla.bias)
            self.q_a_norm = RMSNorm(mla.q_lora_rank, mla.norm_eps)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, h * mla.qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(hidden, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=mla.bias)
        self.kv_a_norm = RMSNorm(mla.kv_lora_rank, mla.norm_eps)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, h * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * mla.v_head_dim, hidden, bias=mla.bias)
        self.rotary = RotaryEmbedding(mla.qk_rope_head_dim, config.rope_theta, config.rope_scaling)

    def init_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> LatentCache:
        mla = self.config.mla
        return LatentCache(torch.zeros(batch_size, max_len, mla.kv_lora_rank, device=device, dtype=dtype),
                           torch.zeros(batch_size, max_len, mla.qk_rope_head_dim, device=device, dtype=dtype))

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.mla.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, cache_entry: LatentCache | None = None,
                info: SequenceInfo | None = None) -> torch.Tensor:
        mla, h = self.config.mla, self.config.num_heads
        b, t, _ = x.shape
        if info is None:
            info = SequenceInfo.plain(b, t, x.device)
        q = self._query(x).view(b, t, h, mla.qk_head_dim)
        q_nope, q_rope = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, self.rotary(q_rope, info.positions)], dim=-1)

        latent, k_rope = self.kv_a_proj(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_norm(latent)
        k_rope = self.rotary(k_rope[:, :, None, :], info.positions)[:, :, 0]

        mask = None
        if cache_entry is not None:
            if info.slots is None or info.key_valid is None:
                raise ValueError("MultiHeadLatentAttention: a cache needs SequenceInfo.slots and key_valid")
            cache_entry.latent.index_copy_(1, info.slots, latent.to(cache_entry.latent.dtype))
            cache_entry.rotary_key.index_copy_(1, info.slots, k_rope.to(cache_entry.rotary_key.dtype))
            seen = info.key_valid.shape[1]  # the filled slots for a prompt chunk, all of them for one token
            latent = cache_entry.latent[:, :seen].to(x.dtype)
            k_rope = cache_entry.rotary_key[:, :seen].to(x.dtype)
            mask = visible_keys(info.key_valid, info.slots)
        elif info.token_mask is not None:
            mask = visible_keys(info.token_mask, torch.arange(t, device=x.device))

        s = latent.shape[1]
        kv = self.kv_b_proj(latent).view(b, s, h, mla.qk_nope_head_dim + mla.v_head_dim)
        k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(b, s, h, mla.qk_rope_head_dim)], dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=mask is None and t > 1,
                                           scale=mla.softmax_scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, h * mla.v_head_dim))
