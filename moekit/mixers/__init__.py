"""Token mixers: softmax attention and the linear family, each ``forward(x, cache_entry=None,
info=None)`` on [B, T, hidden], with ``init_cache(batch_size, max_len)`` for decoding."""

from moekit.mixers.attention import SoftmaxAttention
from moekit.mixers.cache import KVCache, RecurrentCache, SequenceInfo
from moekit.mixers.config import MixerConfig
from moekit.mixers.delta_net import DeltaNet, GatedDeltaNet
from moekit.mixers.gla import GLA
from moekit.mixers.linear_attention import LinearAttention
from moekit.mixers.mamba2 import Mamba2
from moekit.mixers.norm import GatedRMSNorm, RMSNorm
from moekit.mixers.registry import LINEAR_MIXERS, build_mixer
from moekit.mixers.simple_gla import LightningAttention, Retention, SimpleGLA

__all__ = [
    "GLA", "LINEAR_MIXERS", "DeltaNet", "GatedDeltaNet", "GatedRMSNorm", "KVCache", "LightningAttention",
    "LinearAttention", "Mamba2", "MixerConfig", "RMSNorm", "RecurrentCache", "Retention", "SequenceInfo",
    "SimpleGLA", "SoftmaxAttention", "build_mixer",
]
