"""Tiny random transformers models of every supported architecture (float32, eval mode)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 96
EOS = 3
PAD = 0

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, max_position_embeddings=128,
              eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)

# name -> (config class, options): several shapes per family (experts, top-k, groups, shared
# experts, dense layers, norm_topk_prob, tied embeddings, q LoRA, rope layout, biases).
CONFIGS = {
    "mixtral-e4k2": (transformers.MixtralConfig, dict(
        intermediate_size=48, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2)),
    "mixtral-e6k3-tied": (transformers.MixtralConfig, dict(
        intermediate_size=40, num_hidden_layers=3, num_key_value_heads=1, num_local_experts=6,
        num_experts_per_tok=3, head_dim=12, tie_word_embeddings=True, rope_theta=500.0)),
    "olmoe-e4k2": (transformers.OlmoeConfig, dict(
        intermediate_size=48, num_hidden_layers=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)),
    "olmoe-e8k3-norm": (transformers.OlmoeConfig, dict(
        intermediate_size=24, num_hidden_layers=2, num_key_value_heads=4, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, rms_norm_eps=1e-6)),
    "qwen3_moe-e4k2-dense0": (transformers.Qwen3MoeConfig, dict(
        intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, head_dim=16, mlp_only_layers=[0])),
    "qwen3_moe-e8k3-norm-tied": (transformers.Qwen3MoeConfig, dict(
        intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_key_value_heads=4,
        num_experts=8, num_experts_per_tok=3, head_dim=8, norm_topk_prob=True, tie_word_embeddings=True)),
    "deepseek_v3-qlora-g2": (transformers.DeepseekV3Config, dict(
        intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=4,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=12, routed_scaling_factor=2.5)),
    "deepseek_v3-noqlora-g4-plain-rope": (transformers.DeepseekV3Config, dict(
        intermediate_size=40, moe_intermediate_size=8, num_hidden_layers=2, num_key_value_heads=4,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=2,
        first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=12,
        v_head_dim=8, norm_topk_prob=False, routed_scaling_factor=1.5, rope_interleave=False)),
    "deepseek_v3-bias-dense2": (transformers.DeepseekV3Config, dict(
        intermediate_size=24, moe_intermediate_size=12, num_hidden_layers=3, num_key_value_heads=4,
        n_routed_experts=6, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=2, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=6, qk_nope_head_dim=6,
        v_head_dim=10, attention_bias=True, tie_word_embeddings=True)),
    # YaRN with positions past original_max_position_embeddings (prompts + 16 new tokens > 16).
    "qwen3_moe-yarn": (transformers.Qwen3MoeConfig, dict(
        intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, head_dim=8, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 16})),
    "deepseek_v3-yarn": (transformers.DeepseekV3Config, dict(
        intermediate_size=24, moe_intermediate_size=12, num_hidden_layers=2, num_key_value_heads=4,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=4,
        v_head_dim=8, rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 8.0,
                                       "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2,
                                       "mscale": 0.8, "mscale_all_dim": 1.0})),
}


def hf_config(name: str):
    cls, options = CONFIGS[name]
    options = dict(options)
    theta = options.pop("rope_theta", None)
    if theta is not None:
        options["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return cls(**COMMON, **options)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the tiny default init, so that routing and attention are sharp.
    Norm weights stay positive; DeepSeek's expert bias stays >= 0 (see docs/interop.md)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "norm" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif "e_score_correction_bias" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.2)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.25)


def tiny_hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(name))
    randomize(model, seed)
    return model.float().eval()
