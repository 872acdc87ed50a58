"""Qwen3-MoE: per-head q/k RMSNorm, softmax top-k routing, optional dense layers."""

from __future__ import annotations

from moekit.models.hf.common import base_config, first, llama_rules
from moekit.models.hf.spec import Architecture, refuse, register
from moekit.moe.config import MoEConfig


def dense_prefix(c) -> int:
    """How many leading layers are dense; moekit's dense layers must come first (Qwen3-MoE and
    Qwen3-Next share the rule)."""
    model_type = c.get("model_type")
    experts = first(c, "num_local_experts", "num_experts", default=0)
    if not experts:
        refuse(model_type, "num_experts", experts, "a model without experts is not an MoE")
    step = c.get("decoder_sparse_step") or 1
    only = set(c.get("mlp_only_layers") or [])
    dense = [i for i in range(c["num_hidden_layers"]) if i in only or (i + 1) % step != 0]
    if dense != list(range(len(dense))):
        refuse(model_type, "dense layers", dense, "moekit's dense FFN layers must be the first ones")
    return len(dense)


def to_config(c):
    if c.get("use_sliding_window"):
        refuse("qwen3_moe", "use_sliding_window", True, "moekit attention has no sliding window")
    first_k_dense = dense_prefix(c)
    moe = MoEConfig(hidden_size=c["hidden_size"], ffn_hidden_size=c["moe_intermediate_size"],
                    num_experts=first(c, "num_local_experts", "num_experts"), top_k=c["num_experts_per_tok"],
                    score_func="softmax", norm_topk_prob=bool(c.get("norm_topk_prob", False)))
    return base_config(c, moe, qk_norm=True, qk_norm_scope="head", first_k_dense=first_k_dense,
                       dense_ffn_hidden_size=c["intermediate_size"])


register(Architecture("qwen3_moe", "Qwen3MoeForCausalLM", to_config, lambda config, c: llama_rules(config)))
