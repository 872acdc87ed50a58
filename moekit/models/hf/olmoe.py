"""OLMoE: q/k RMSNorm over the whole projection (all heads at once), softmax top-k routing."""

from __future__ import annotations

from moekit.models.hf.common import base_config, first, llama_rules
from moekit.models.hf.spec import Architecture, refuse, register
from moekit.moe.config import MoEConfig


def to_config(c):
    if c.get("clip_qkv") is not None:
        refuse("olmoe", "clip_qkv", c["clip_qkv"], "moekit attention does not clamp q/k/v")
    moe = MoEConfig(hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
                    num_experts=first(c, "num_experts", "num_local_experts"), top_k=c["num_experts_per_tok"],
                    score_func="softmax", norm_topk_prob=bool(c.get("norm_topk_prob", False)))
    return base_config(c, moe, qk_norm=True, qk_norm_scope="all")


register(Architecture("olmoe", "OlmoeForCausalLM", to_config, lambda config, c: llama_rules(config)))
