"""Qwen3-Next: Gated DeltaNet layers (Qwen3-Next's fused layout, grouped value heads) between
gated softmax-attention layers (sigmoid output gate from q_proj, per-head q/k norms, partial
RoPE); zero-centred (1 + w) RMSNorms; softmax top-k MoE with a sigmoid-gated shared expert;
optional dense first layers."""

from __future__ import annotations

from moekit.models.config import ModelConfig
from moekit.models.hf.common import (
    MoENames,
    attention_rules,
    base_config,
    ffn_rules,
    first,
    head_rules,
    layer_types_pattern,
    norm_rules,
)
from moekit.models.hf.qwen3_moe import dense_prefix
from moekit.models.hf.spec import Architecture, Rule, refuse, register, same
from moekit.moe.config import MoEConfig

MODEL_TYPE = "qwen3_next"
LAYER_LETTERS = {"linear_attention": "L", "full_attention": "N"}


def split_partial_rotary(c) -> tuple[dict, float]:
    """The config without its partial_rotary_factor (which ``common.rope`` refuses) and the factor."""
    params = dict(first(c, "rope_parameters", "rope_scaling", default={}))
    factor = float(params.pop("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
    return {**c, "rope_parameters": params, "rope_scaling": None}, factor


def to_config(c) -> ModelConfig:
    shared = c.get("shared_expert_intermediate_size") or 0
    if shared < 1:
        refuse(MODEL_TYPE, "shared_expert_intermediate_size", shared, "the MoE layers are built with a shared expert")
    dk, dv = c["linear_key_head_dim"], c["linear_value_head_dim"]
    if dv % dk:
        refuse(MODEL_TYPE, "linear_value_head_dim", dv, f"moekit's value heads are a multiple of the key heads ({dk})")
    if c["linear_num_value_heads"] % c["linear_num_key_heads"]:
        refuse(MODEL_TYPE, "linear_num_value_heads", c["linear_num_value_heads"],
               f"must be a multiple of linear_num_key_heads ({c['linear_num_key_heads']})")
    moe = MoEConfig(hidden_size=c["hidden_size"], ffn_hidden_size=c["moe_intermediate_size"],
                    num_experts=c["num_experts"], top_k=c["num_experts_per_tok"], score_func="softmax",
                    norm_topk_prob=bool(c.get("norm_topk_prob", True)), num_shared_experts=1,
                    shared_ffn_hidden_size=shared, shared_expert_gate=True)
    plain, partial = split_partial_rotary(c)
    return base_config(
        plain, moe, layer_pattern=layer_types_pattern(MODEL_TYPE, c, LAYER_LETTERS), linear_mixer="qwen3_next_deltanet",
        qk_norm=True, qk_norm_scope="head", first_k_dense=dense_prefix(c), dense_ffn_hidden_size=c["intermediate_size"],
        partial_rotary_factor=partial, attention_output_gate=True, norm_unit_offset=True,
        linear_num_heads=c["linear_num_key_heads"], linear_head_dim=dk, linear_num_v_heads=c["linear_num_value_heads"],
        expand_v=dv // dk, conv_size=c["linear_conv_kernel_dim"], hf_config=c)


def deltanet_rules(i: int) -> list[Rule]:
    ours, hf = f"layers.{i}.mixer.", f"model.layers.{i}.linear_attn."
    rules = [same(ours + name, hf + name) for name in
             ("in_proj_qkvz.weight", "in_proj_ba.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight")]
    return rules + [same(ours + "conv.conv.weight", hf + "conv1d.weight")]


def rules(config: ModelConfig, c) -> list[Rule]:
    out = head_rules(config)
    for i, kind in enumerate(config.layer_pattern):
        out += norm_rules(i)
        out += attention_rules(i, config) if kind == "N" else deltanet_rules(i)
        out += ffn_rules(i, config, MoENames(), shared="mlp.shared_expert.")
        if i >= config.first_k_dense:
            out.append(same(f"layers.{i}.ffn.shared_gate.weight", f"model.layers.{i}.mlp.shared_expert_gate.weight"))
    return out


def is_mtp(name: str, c) -> bool:
    """Multi-token-prediction weights (``mtp.*``), which transformers drops too."""
    return name.startswith("mtp.")


register(Architecture(MODEL_TYPE, "Qwen3NextForCausalLM", to_config, rules, is_mtp))
