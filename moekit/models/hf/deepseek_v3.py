"""DeepSeek-V3: multi-head latent attention, dense first layers, sigmoid group-limited routing
with an expert bias, shared experts and a routed scaling factor."""

from __future__ import annotations

import re

import torch

from moekit.mixers.mla_config import MLAConfig
from moekit.mixers.rope_scaling import yarn_mscale
from moekit.models.config import ModelConfig
from moekit.models.hf.common import MoENames, base_config, ffn_rules, first, head_rules, norm_rules, rope
from moekit.models.hf.spec import Architecture, Layout, Rule, refuse, register, same
from moekit.moe.config import MoEConfig

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps


def to_config(c) -> ModelConfig:
    heads = c["num_attention_heads"]
    if first(c, "num_key_value_heads", default=heads) != heads:
        refuse("deepseek_v3", "num_key_value_heads", c["num_key_value_heads"],
               "MLA rebuilds keys and values for every query head")
    shared = c.get("n_shared_experts") or 0
    if shared < 1:
        refuse("deepseek_v3", "n_shared_experts", shared, "the model is built with at least one shared expert")
    experts = first(c, "n_routed_experts", "num_local_experts")
    moe = MoEConfig(hidden_size=c["hidden_size"], ffn_hidden_size=c["moe_intermediate_size"], num_experts=experts,
                    top_k=c["num_experts_per_tok"], score_func="sigmoid", num_groups=c.get("n_group") or 1,
                    topk_groups=c.get("topk_group") or 1, norm_topk_prob=bool(c.get("norm_topk_prob", True)),
                    route_scale=float(c.get("routed_scaling_factor", 1.0)), num_shared_experts=shared,
                    shared_ffn_hidden_size=c["moe_intermediate_size"])
    mla = MLAConfig(kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
                    qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
                    q_lora_rank=c.get("q_lora_rank"), norm_eps=LATENT_NORM_EPS, bias=bool(c.get("attention_bias")),
                    softmax_scale=softmax_scale(c))
    # attention_bias means MLA projection biases here, which MLAConfig.bias covers.
    common = {k: v for k, v in c.items() if k != "attention_bias"}
    return base_config(common, moe, mla=mla, head_dim=mla.qk_head_dim,
                       first_k_dense=min(c.get("first_k_dense_replace") or 0, c["num_hidden_layers"]),
                       dense_ffn_hidden_size=c["intermediate_size"], hf_config=c)


def softmax_scale(c) -> float | None:
    """DeepSeek sharpens attention under YaRN by mscale(factor, mscale_all_dim) squared."""
    _, scaling = rope(c)
    if scaling is None or not scaling.mscale_all_dim:
        return None
    qk_head_dim = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    return qk_head_dim ** -0.5 * yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


def deinterleave(offset: int, rope_dim: int) -> list[int]:
    """Rows of an interleaved rope block (pairs 0-1, 2-3, ...) in rotate-half order (evens, odds)."""
    return [offset + j for j in range(0, rope_dim, 2)] + [offset + j for j in range(1, rope_dim, 2)]


def query_perm(mla: MLAConfig, heads: int) -> torch.Tensor:
    rows = []
    for h in range(heads):
        start = h * mla.qk_head_dim
        rows += list(range(start, start + mla.qk_nope_head_dim))
        rows += deinterleave(start + mla.qk_nope_head_dim, mla.qk_rope_head_dim)
    return torch.tensor(rows)


def attention_rules(i: int, config: ModelConfig, interleaved: bool) -> list[Rule]:
    ours, hf, mla = f"layers.{i}.mixer.", f"model.layers.{i}.self_attn.", config.mla
    q_perm = query_perm(mla, config.num_heads) if interleaved else None
    kv_perm = (torch.tensor(list(range(mla.kv_lora_rank)) + deinterleave(mla.kv_lora_rank, mla.qk_rope_head_dim))
               if interleaved else None)
    if mla.q_lora_rank is None:
        rules = [Rule(ours + "q_proj.weight", (Layout((hf + "q_proj.weight",)),), q_perm)]
    else:
        rules = [same(ours + "q_a_proj.weight", hf + "q_a_proj.weight"),
                 same(ours + "q_a_norm.weight", hf + "q_a_layernorm.weight"),
                 Rule(ours + "q_b_proj.weight", (Layout((hf + "q_b_proj.weight",)),), q_perm)]
    rules += [Rule(ours + "kv_a_proj.weight", (Layout((hf + "kv_a_proj_with_mqa.weight",)),), kv_perm),
              same(ours + "kv_a_norm.weight", hf + "kv_a_layernorm.weight"),
              same(ours + "kv_b_proj.weight", hf + "kv_b_proj.weight"),
              same(ours + "o_proj.weight", hf + "o_proj.weight")]
    if mla.bias:
        rules += [Rule(ours + "kv_a_proj.bias", (Layout((hf + "kv_a_proj_with_mqa.bias",)),), kv_perm),
                  same(ours + "o_proj.bias", hf + "o_proj.bias")]
        if mla.q_lora_rank is not None:
            rules.append(same(ours + "q_a_proj.bias", hf + "q_a_proj.bias"))
    return rules


def rules(config: ModelConfig, c) -> list[Rule]:
    interleaved = bool(c.get("rope_interleave", True))
    out = head_rules(config)
    for i in range(config.num_layers):
        out += norm_rules(i) + attention_rules(i, config, interleaved)
        out += ffn_rules(i, config, MoENames(), expert_bias="mlp.gate.e_score_correction_bias",
                         shared="mlp.shared_experts.")
    return out


LAYER = re.compile(r"model\.layers\.(\d+)\.")


def is_mtp_layer(name: str, c) -> bool:
    """Multi-token-prediction modules are stored as ``num_nextn_predict_layers`` extra layers past
    the last one; transformers drops them too. Any other layer past the last is unexpected."""
    match = LAYER.match(name)
    first = c["num_hidden_layers"]
    return match is not None and first <= int(match.group(1)) < first + c.get("num_nextn_predict_layers", 1)


def is_router(name: str) -> bool:
    """transformers keeps ``mlp.gate.weight`` in float32 (``_keep_in_fp32_modules_strict``)."""
    return name.endswith(".ffn.router.weight")


register(Architecture("deepseek_v3", "DeepseekV3ForCausalLM", to_config, rules, is_mtp_layer, is_router))
