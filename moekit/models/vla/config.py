"""``VLAConfig``: the trajectory head's shape and training objective."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from moekit.models.config import ModelConfig
from moekit.models.vla.scene import NUM_FEATURES
from moekit.validation import check_known_keys, is_int

OBJECTIVES = ("flow", "regression")
PRIORS = ("gaussian", "anchors")


def tiny_backbone() -> ModelConfig:
    """A small hybrid Linear-MoE backbone (a simple-GLA layer, then softmax attention; MoE
    FFNs) that trains on a CPU in minutes. Its vocabulary is unused (scene tokens enter as
    embeddings), hence tiny."""
    return ModelConfig(vocab_size=8, hidden_size=64, layer_pattern="LN", linear_mixer="simple_gla", num_heads=4,
                       num_kv_heads=2, head_dim=16, max_seq_len=64, tie_word_embeddings=True,
                       moe={"ffn_hidden_size": 128, "num_experts": 4, "top_k": 2, "num_shared_experts": 1,
                            "aux_loss_coef": 0.01})


@dataclass
class VLAConfig:
    """Scene tokens ([1 + num_neighbors, num_features]) are projected to the backbone's hidden
    size and followed by ``num_queries`` learned action queries; the backbone's final hidden
    states condition a transformer decoder over the ``horizon`` future (x, y) points.

    ``objective`` "flow" trains the decoder as a flow-matching velocity field (sampled with
    ``moekit.models.vla.samplers``); "regression" trains the same decoder to output the
    trajectory in one pass with an L2 loss (the baseline). ``prior`` is where flow samples
    start: N(0, I) ("gaussian") or a K-means anchor plus ``anchor_std`` noise ("anchors"),
    both in the normalised trajectory space."""

    backbone: ModelConfig = field(default_factory=tiny_backbone)
    num_features: int = NUM_FEATURES
    num_neighbors: int = 8
    horizon: int = 8
    num_queries: int = 4
    decoder_dim: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 4
    objective: str = "flow"
    prior: str = "gaussian"
    num_anchors: int = 16
    anchor_std: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = ModelConfig.from_dict(self.backbone)
        if not isinstance(self.backbone, ModelConfig):
            raise ValueError("VLAConfig: backbone must be a ModelConfig or a mapping, "
                             f"got {type(self.backbone).__name__}")
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"VLAConfig: {msg}")

        for name in ("num_features", "horizon", "num_queries", "decoder_dim", "decoder_layers", "decoder_heads",
                     "num_anchors"):
            value = getattr(self, name)
            need(is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(is_int(self.num_neighbors) and self.num_neighbors >= 0,
             f"num_neighbors must be a non-negative integer, got {self.num_neighbors!r}")
        need(self.decoder_dim % self.decoder_heads == 0,
             f"decoder_dim {self.decoder_dim} must be divisible by decoder_heads {self.decoder_heads}")
        need(self.decoder_dim % 2 == 0,  # the time embedding is sin and cos halves
             f"decoder_dim must be even, got {self.decoder_dim}")
        need(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        need(self.prior in PRIORS, f"prior must be one of {PRIORS}, got {self.prior!r}")
        # an infinite scale makes every anchor-prior sample inf
        need(isinstance(self.anchor_std, (int, float)) and not isinstance(self.anchor_std, bool)
             and math.isfinite(self.anchor_std) and self.anchor_std > 0,
             f"anchor_std must be a finite number > 0, got {self.anchor_std!r}")
        need(self.num_tokens <= self.backbone.max_seq_len,
             f"{self.num_tokens} tokens per scene exceed backbone.max_seq_len {self.backbone.max_seq_len}")

    @property
    def num_tokens(self) -> int:
        return 1 + self.num_neighbors + self.num_queries

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VLAConfig:
        check_known_keys(cls, values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
