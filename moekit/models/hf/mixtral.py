"""Mixtral: GQA attention, softmax top-k routing renormalised over the chosen experts."""

from __future__ import annotations

from moekit.models.hf.common import MoENames, base_config, first, llama_rules
from moekit.models.hf.spec import Architecture, register
from moekit.moe.config import MoEConfig

# Checkpoints keep Mixtral's original names (w1 = gate, w3 = up, w2 = down).
NAMES = MoENames(router=("mlp.gate.weight", "block_sparse_moe.gate.weight"),
                 expert_gate="block_sparse_moe.experts.{e}.w1.weight",
                 expert_up="block_sparse_moe.experts.{e}.w3.weight",
                 expert_down="block_sparse_moe.experts.{e}.w2.weight")


def to_config(c):
    moe = MoEConfig(hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
                    num_experts=first(c, "num_local_experts", "num_experts"), top_k=c["num_experts_per_tok"],
                    score_func="softmax", norm_topk_prob=True,
                    router_jitter=c.get("router_jitter_noise") or 0.0)  # training only, same formula
    return base_config(c, moe)


register(Architecture("mixtral", "MixtralForCausalLM", to_config, lambda config, c: llama_rules(config, NAMES)))
