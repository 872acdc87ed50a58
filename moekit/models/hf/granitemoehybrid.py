"""GraniteMoeHybrid (Granite 4.0): Mamba2 layers and GQA softmax attention layers (RoPE or
none), muP multipliers (embeddings, residual branches, softmax scale, logits), softmax top-k
routing and a shared SwiGLU MLP beside the experts in every layer."""

from __future__ import annotations

import math

from moekit.models.config import ModelConfig, ResidualScaling
from moekit.models.hf.common import (
    MoENames,
    attention_rules,
    base_config,
    head_rules,
    layer_types_pattern,
    moe_rules,
    norm_rules,
)
from moekit.models.hf.convert import decode_floats
from moekit.models.hf.spec import Architecture, Rule, refuse, register, same
from moekit.moe.config import MoEConfig

MODEL_TYPE = "granitemoehybrid"
# transformers 5.24 spells the layer kinds linear_attention / full_attention, earlier ones mamba / attention
LAYER_LETTERS = {"linear_attention": "L", "mamba": "L", "full_attention": "N", "attention": "N"}
# Checkpoints keep GraniteMoe's fused expert tensors under their original names.
NAMES = MoENames(router=("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight"),
                 fused_up="block_sparse_moe.experts.gate_up_proj", fused_down="block_sparse_moe.experts.down_proj")
DISK_UP, DISK_DOWN = "block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"


def check_options(c) -> None:
    if not c.get("num_local_experts"):
        refuse(MODEL_TYPE, "num_local_experts", c.get("num_local_experts"), "a model without experts is not an MoE")
    if not c.get("shared_intermediate_size"):
        refuse(MODEL_TYPE, "shared_intermediate_size", c.get("shared_intermediate_size"),
               "every layer is built with a shared MLP")
    if c.get("mamba_proj_bias"):
        refuse(MODEL_TYPE, "mamba_proj_bias", True, "moekit's Mamba2 projections have no bias")
    if c.get("position_embedding_type") not in (None, "rope", "nope"):
        refuse(MODEL_TYPE, "position_embedding_type", c["position_embedding_type"], "moekit has RoPE or none")
    limit = decode_floats(c.get("time_step_limit"))
    if limit is not None and (limit[0] > 0 or not math.isinf(limit[1])):
        refuse(MODEL_TYPE, "time_step_limit", limit, "moekit's Mamba2 does not clamp the time step")


def to_config(c) -> ModelConfig:
    check_options(c)
    moe = MoEConfig(hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
                    num_experts=c["num_local_experts"], top_k=c["num_experts_per_tok"], score_func="softmax",
                    norm_topk_prob=True,  # softmax over the top-k logits
                    num_shared_experts=1, shared_ffn_hidden_size=c["shared_intermediate_size"])
    m = float(c["residual_multiplier"])
    residual = None if m == 1.0 else ResidualScaling(attention_beta=m, linear_beta=m, ffn_beta=m)
    return base_config(
        c, moe, layer_pattern=layer_types_pattern(MODEL_TYPE, c, LAYER_LETTERS), linear_mixer="mamba2",
        partial_rotary_factor=1.0 if c.get("position_embedding_type") == "rope" else 0.0,
        attention_scale=float(c["attention_multiplier"]), embedding_multiplier=float(c["embedding_multiplier"]),
        logits_scaling=float(c["logits_scaling"]), residual=residual, linear_num_heads=c["mamba_n_heads"],
        linear_head_dim=c["mamba_d_head"], ssm_state_size=c["mamba_d_state"], ssm_groups=c["mamba_n_groups"],
        conv_size=c["mamba_d_conv"], conv_bias=bool(c["mamba_conv_bias"]))


def mamba_rules(i: int, config: ModelConfig) -> list[Rule]:
    ours, hf = f"layers.{i}.mixer.", f"model.layers.{i}.mamba."
    rules = [same(ours + name, hf + name) for name in
             ("in_proj.weight", "A_log", "dt_bias", "D", "norm.weight", "out_proj.weight")]
    rules.append(same(ours + "conv.conv.weight", hf + "conv1d.weight"))
    if config.conv_bias:
        rules.append(same(ours + "conv.conv.bias", hf + "conv1d.bias"))
    return rules


def ffn_rules(i: int, config: ModelConfig) -> list[Rule]:
    ours, hf = f"layers.{i}.ffn.", f"model.layers.{i}."
    rules = [r for r in moe_rules(i, config, NAMES) if not r.target.startswith(ours + "experts.")]
    rules += [same(ours + "experts.w_up", hf + NAMES.fused_up, hf + DISK_UP),
              same(ours + "experts.w_down", hf + NAMES.fused_down, hf + DISK_DOWN),
              same(ours + "shared.up.weight", hf + "shared_mlp.input_linear.weight"),  # [gate | up], as ours
              same(ours + "shared.down.weight", hf + "shared_mlp.output_linear.weight")]
    return rules


def rules(config: ModelConfig, c) -> list[Rule]:
    out = head_rules(config)
    for i, kind in enumerate(config.layer_pattern):
        out += norm_rules(i) + (attention_rules(i, config) if kind == "N" else mamba_rules(i, config))
        out += ffn_rules(i, config)
    return out


register(Architecture(MODEL_TYPE, "GraniteMoeHybridForCausalLM", to_config, rules))
