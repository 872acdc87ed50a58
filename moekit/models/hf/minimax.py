"""MiniMax-Text-01: lightning attention layers (MiniMax's fused layout) and GQA softmax attention
layers, per ``layer_types``; softmax top-k routing renormalised over the chosen experts; residual
sums weighted by the alpha / beta factors, the residual being the normalised input."""

from __future__ import annotations

import re

from moekit.models.config import ModelConfig, ResidualScaling
from moekit.models.hf.common import (
    attention_rules,
    base_config,
    first,
    head_rules,
    layer_types_pattern,
    moe_rules,
    norm_rules,
)
from moekit.models.hf.mixtral import NAMES as MIXTRAL_NAMES
from moekit.models.hf.spec import Architecture, Rule, refuse, register, same
from moekit.moe.config import MoEConfig

MODEL_TYPE = "minimax"
LAYER_LETTERS = {"linear_attention": "L", "full_attention": "N"}
ORIGINAL_TYPES = {0: "linear_attention", 1: "full_attention"}  # the original remote code's attn_type_list


def layer_pattern(c) -> str:
    pattern, kinds = layer_types_pattern(MODEL_TYPE, c, LAYER_LETTERS), c["layer_types"]
    original = c.get("attn_type_list")
    if original is not None and [ORIGINAL_TYPES.get(a) for a in original] != list(kinds):
        refuse(MODEL_TYPE, "attn_type_list", original, f"it disagrees with layer_types {kinds}, which transformers "
               "builds the model from")
    return pattern


def to_config(c) -> ModelConfig:
    moe = MoEConfig(hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
                    num_experts=first(c, "num_local_experts", "num_experts"), top_k=c["num_experts_per_tok"],
                    score_func="softmax", norm_topk_prob=True,
                    router_jitter=c.get("router_jitter_noise") or 0.0)  # training only, Mixtral's formula
    residual = ResidualScaling(
        from_norm=True, attention_alpha=float(c["full_attn_alpha_factor"]),
        attention_beta=float(c["full_attn_beta_factor"]), linear_alpha=float(c["linear_attn_alpha_factor"]),
        linear_beta=float(c["linear_attn_beta_factor"]), ffn_alpha=float(c["mlp_alpha_factor"]),
        ffn_beta=float(c["mlp_beta_factor"]))
    return base_config(c, moe, layer_pattern=layer_pattern(c), linear_mixer="minimax_lightning", residual=residual)


def lightning_rules(i: int) -> list[Rule]:
    ours, hf = f"layers.{i}.mixer.", f"model.layers.{i}.self_attn."
    return [same(ours + name, hf + name) for name in
            ("qkv_proj.weight", "output_gate.weight", "norm.weight", "out_proj.weight")]


def rules(config: ModelConfig, c) -> list[Rule]:
    out = head_rules(config)
    for i, kind in enumerate(config.layer_pattern):
        out += norm_rules(i) + (attention_rules(i, config) if kind == "N" else lightning_rules(i))
        out += moe_rules(i, config, MIXTRAL_NAMES)
    return out


DECAY_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$")


def is_decay_buffer(name: str, c) -> bool:
    """Lightning attention's decay tables: constants of the architecture, which moekit rebuilds
    from the layer index (``la.lightning_decay``) and transformers from its config."""
    return DECAY_BUFFER.match(name) is not None


register(Architecture(MODEL_TYPE, "MiniMaxForCausalLM", to_config, rules, is_decay_buffer))
