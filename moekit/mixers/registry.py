"""Which module implements each layer letter and linear-mixer name."""

from __future__ import annotations

from torch import nn

from moekit.mixers.attention import SoftmaxAttention
from moekit.mixers.config import MixerConfig
from moekit.mixers.delta_net import DeltaNet, GatedDeltaNet
from moekit.mixers.gla import GLA
from moekit.mixers.linear_attention import LinearAttention
from moekit.mixers.mamba2 import Mamba2
from moekit.mixers.minimax_lightning import MiniMaxLightningAttention
from moekit.mixers.mla import MultiHeadLatentAttention
from moekit.mixers.qwen3_next_deltanet import Qwen3NextGatedDeltaNet
from moekit.mixers.simple_gla import LightningAttention, Retention, SimpleGLA

LINEAR_MIXERS: dict[str, type[nn.Module]] = {
    "linear_attention": LinearAttention,
    "lightning_attention": LightningAttention,
    "retention": Retention,
    "simple_gla": SimpleGLA,
    "gla": GLA,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "mamba2": Mamba2,
    # The layouts of converted checkpoints (moekit.models.hf), usable for training too.
    "minimax_lightning": MiniMaxLightningAttention,
    "qwen3_next_deltanet": Qwen3NextGatedDeltaNet,
}

LAYER_LETTERS = {"L": "linear sequence-modeling layer (kind set by linear_mixer)", "N": "softmax attention"}


def check_linear_mixer(name: str) -> None:
    if name not in LINEAR_MIXERS:
        raise ValueError(f"unknown linear_mixer {name!r}; choose from {sorted(LINEAR_MIXERS)}")


def linear_mixers_reading(option: str) -> list[str]:
    """The linear mixers that implement a linear-only ``MixerConfig`` option (``LinearMixer.reads``)."""
    return sorted(name for name, cls in LINEAR_MIXERS.items() if option in getattr(cls, "reads", ()))


def build_mixer(letter: str, linear_mixer: str, config: MixerConfig) -> nn.Module:
    """The mixer of one layer: ``N`` softmax attention (multi-head latent attention when
    ``config.mla`` is set), ``L`` the ``linear_mixer`` kind."""
    if letter == "N":
        return SoftmaxAttention(config) if config.mla is None else MultiHeadLatentAttention(config)
    if letter == "L":
        check_linear_mixer(linear_mixer)
        return LINEAR_MIXERS[linear_mixer](config)
    raise ValueError(f"unknown layer letter {letter!r}; choose from {LAYER_LETTERS}")
