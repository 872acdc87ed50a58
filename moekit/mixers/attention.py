"""Softmax attention: grouped-query heads, RoPE, optional q/k norm, a static KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.mixers.cache import KVCache, SequenceInfo
from moekit.mixers.config import MixerConfig
from moekit.mixers.norm import RMSNorm
from moekit.mixers.rope import RotaryEmbedding


def visible_keys(key_valid: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, S] bool mask: query at slot i sees real keys at slots <= i.

    A query always sees its own slot, so a padding query (no real key before it) attends to
    itself instead of producing NaN, which would leak into real tokens through later layers.
    """
    key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    own = key_slots[None, :] == query_slots[:, None]
    return ((key_valid[:, None, :] & causal) | own)[:, None]


def cached_keys(cache_entry: KVCache, k: torch.Tensor, v: torch.Tensor,
                info: SequenceInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write the call's k, v [B, kv_heads, T, D] into their cache slots; return the keys and
    values the call attends over, in k's dtype, and their mask.

    Those are the first ``info.key_valid.shape[1]`` slots: the filled ones for a prompt chunk,
    the whole buffer for a one-token step (fixed shapes for CUDA-graph replay).
    """
    if info.slots is None or info.key_valid is None:
        raise ValueError("SoftmaxAttention: a KV cache needs SequenceInfo.slots and key_valid")
    cache_entry.key.index_copy_(2, info.slots, k.to(cache_entry.key.dtype))
    cache_entry.value.index_copy_(2, info.slots, v.to(cache_entry.value.dtype))
    seen = info.key_valid.shape[1]
    keys, values = cache_entry.key[:, :, :seen], cache_entry.value[:, :, :seen]
    return keys.to(k.dtype), values.to(k.dtype), visible_keys(info.key_valid, info.slots)


class SoftmaxAttention(nn.Module):
    """Causal multi-head attention through ``F.scaled_dot_product_attention``.

    Without a cache it attends over the call's own tokens. With a ``KVCache`` it writes the
    new keys/values into their slots and attends, under a mask, over the filled slots (a prompt
    chunk) or the whole preallocated buffer (a one-token step: the same shapes at every position).

    With ``attention_output_gate`` (Qwen3-Next) ``q_proj`` yields, per head, the query then a
    gate of the same width ([q_h | gate_h], the checkpoint's layout); the attention output is
    multiplied by sigmoid(gate) before ``o_proj``.
    """

    def __init__(self, config: MixerConfig):
        super().__init__()
        self.config = config
        h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, h * d * (2 if config.attention_output_gate else 1),
                                bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        # qk_norm_scope "all" normalises the whole projection (all heads together), as OLMoE does.
        per_head = config.qk_norm_scope == "head"
        offset = config.norm_unit_offset
        self.q_norm = RMSNorm(d if per_head else h * d, config.norm_eps, offset) if config.qk_norm else None
        self.k_norm = RMSNorm(d if per_head else kv * d, config.norm_eps, offset) if config.qk_norm else None
        self.rotary = RotaryEmbedding(d, config.rope_theta, config.rope_scaling, config.rotary_dim)

    def init_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        cfg = self.config
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cache_entry: KVCache | None = None,
                info: SequenceInfo | None = None) -> torch.Tensor:
        cfg = self.config
        b, t, _ = x.shape
        if info is None:
            info = SequenceInfo.plain(b, t, x.device)
        q, k, gate = self.q_proj(x), self.k_proj(x), None
        if cfg.attention_output_gate:
            q, gate = q.view(b, t, cfg.num_heads, 2 * cfg.head_dim).chunk(2, dim=-1)
            q, gate = q.reshape(b, t, -1), gate.reshape(b, t, -1)
        if self.q_norm is not None and cfg.qk_norm_scope == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, cfg.num_heads, cfg.head_dim)
        k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None and cfg.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.rotary(q, info.positions).transpose(1, 2)
        k = self.rotary(k, info.positions).transpose(1, 2)
        v = v.transpose(1, 2)

        mask = None
        if cache_entry is not None:
            k, v, mask = cached_keys(cache_entry, k, v, info)
        elif info.token_mask is not None:
            mask = visible_keys(info.token_mask, torch.arange(t, device=x.device))

        groups = cfg.num_heads // cfg.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                           scale=cfg.attention_scale)
        o = o.transpose(1, 2).reshape(b, t, cfg.num_heads * cfg.head_dim)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o)
