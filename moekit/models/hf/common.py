"""Pieces shared by the Llama-like MoE families: config reading, refusals, tensor-name rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moekit.mixers.rope_scaling import YarnScaling
from moekit.models.config import ModelConfig
from moekit.models.hf.spec import Layout, Rule, moekit_only, refuse, same
from moekit.moe.config import MoEConfig


def first(c: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of ``keys`` the HF config has (names moved between transformers versions)."""
    for key in keys:
        if c.get(key) is not None:
            return c[key]
    return default


def layer_types_pattern(model_type: str, c: dict[str, Any], letters: dict[str, str]) -> str:
    """A hybrid config's ``layer_types`` as a layer pattern, each kind by ``letters``; other kinds are refused."""
    kinds = c["layer_types"]
    unknown = sorted(set(kinds) - set(letters))
    if unknown:
        refuse(model_type, "layer_types", unknown, f"moekit maps only {sorted(letters)}")
    return "".join(letters[kind] for kind in kinds)


def rope(c: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    """The RoPE base and YaRN scaling if any; other scaled RoPE kinds are refused."""
    model_type = c.get("model_type")
    params = first(c, "rope_parameters", "rope_scaling", default={})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "yarn"):
        refuse(model_type, "rope type", kind, "moekit implements plain RoPE and YaRN")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(model_type, "partial_rotary_factor", params["partial_rotary_factor"],
               "moekit rotates the whole head")
    theta = float(first(params, "rope_theta", default=first(c, "rope_theta", default=10000.0)))
    if kind == "default":
        return theta, None
    original = params["original_max_position_embeddings"]
    return theta, YarnScaling(
        factor=float(params.get("factor") or c["max_position_embeddings"] / original), original_max_len=original,
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)))


def check_common(c: dict[str, Any]) -> None:
    """Options every family here shares. Attention dropout is ignored: it only acts in training."""
    model_type = c.get("model_type")
    if c.get("quantization_config"):
        refuse(model_type, "quantization_config", c["quantization_config"].get("quant_method", "?"),
               "quantized checkpoints must be dequantized first")
    if c.get("attention_bias"):
        refuse(model_type, "attention_bias", True, "moekit attention has no output-projection bias")
    if c.get("hidden_act", "silu") != "silu":
        refuse(model_type, "hidden_act", c["hidden_act"], "the experts and dense FFNs are SwiGLU")
    if c.get("sliding_window") is not None:
        refuse(model_type, "sliding_window", c["sliding_window"], "moekit attention has no sliding window")


def base_config(c: dict[str, Any], moe: MoEConfig, **fields: Any) -> ModelConfig:
    """A ``ModelConfig`` of softmax-attention layers from the fields every family shares."""
    check_common(c)
    heads = c["num_attention_heads"]
    theta, scaling = rope(c)
    values = dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], layer_pattern="N" * c["num_hidden_layers"],
        num_heads=heads, num_kv_heads=first(c, "num_key_value_heads", default=heads),
        head_dim=first(c, "head_dim", default=c["hidden_size"] // heads), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=c["max_position_embeddings"], norm_eps=c["rms_norm_eps"],
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        init_std=c.get("initializer_range", 0.02), moe=moe, hf_config=c,
    )
    values.update(fields)
    return ModelConfig(**values)


@dataclass(frozen=True)
class MoENames:
    """Where a family keeps one MoE layer, relative to ``model.layers.{i}.``: router weight
    (alternatives), fused experts (transformers 5 in memory), per-expert gate / up / down
    (checkpoints on disk; ``{e}`` is the expert)."""

    router: tuple[str, ...] = ("mlp.gate.weight",)
    fused_up: str = "mlp.experts.gate_up_proj"
    fused_down: str = "mlp.experts.down_proj"
    expert_gate: str = "mlp.experts.{e}.gate_proj.weight"
    expert_up: str = "mlp.experts.{e}.up_proj.weight"
    expert_down: str = "mlp.experts.{e}.down_proj.weight"


def head_rules(config: ModelConfig) -> list[Rule]:
    rules = [same("embed_tokens.weight", "model.embed_tokens.weight"), same("norm.weight", "model.norm.weight")]
    if not config.tie_word_embeddings:  # a tied head is the embedding: nothing to read
        rules.append(same("lm_head.weight", "lm_head.weight"))
    return rules


def norm_rules(i: int) -> list[Rule]:
    hf = f"model.layers.{i}."
    return [same(f"layers.{i}.mixer_norm.weight", hf + "input_layernorm.weight"),
            same(f"layers.{i}.ffn_norm.weight", hf + "post_attention_layernorm.weight")]


def attention_rules(i: int, config: ModelConfig) -> list[Rule]:
    ours, hf = f"layers.{i}.mixer.", f"model.layers.{i}.self_attn."
    rules = [same(ours + f"{p}.weight", hf + f"{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if config.qk_norm:
        rules += [same(ours + f"{p}.weight", hf + f"{p}.weight") for p in ("q_norm", "k_norm")]
    return rules


def gated_mlp_rules(ours: str, hf: str) -> list[Rule]:
    """Our fused [gate | up] projection and down projection from HF's gate_proj / up_proj / down_proj."""
    return [Rule(ours + "up.weight", (Layout((hf + "gate_proj.weight", hf + "up_proj.weight")),)),
            same(ours + "down.weight", hf + "down_proj.weight")]


def moe_rules(i: int, config: ModelConfig, names: MoENames, expert_bias: str | None = None,
              shared: str | None = None) -> list[Rule]:
    """Router, routed experts (fused or per expert), expert bias and shared experts of layer i."""
    ours, hf, e = f"layers.{i}.ffn.", f"model.layers.{i}.", config.moe.num_experts
    rules = [
        same(ours + "router.weight", *(hf + n for n in names.router)),
        Rule(ours + "experts.w_up", (Layout((hf + names.fused_up,)),
                                      Layout((hf + names.expert_gate, hf + names.expert_up), e))),
        Rule(ours + "experts.w_down", (Layout((hf + names.fused_down,)), Layout((hf + names.expert_down,), e))),
        moekit_only(ours + "router.load_since_update"),
        (same(ours + "router.expert_bias", hf + expert_bias) if expert_bias
         else moekit_only(ours + "router.expert_bias", zero_on_export=True)),
    ]
    if shared is not None:
        rules += gated_mlp_rules(ours + "shared.", hf + shared)
    return rules


def ffn_rules(i: int, config: ModelConfig, names: MoENames, **moe_options: str) -> list[Rule]:
    """Layer i's FFN: dense (the first ``first_k_dense`` layers) or MoE."""
    if i < config.first_k_dense:
        return gated_mlp_rules(f"layers.{i}.ffn.", f"model.layers.{i}.mlp.")
    return moe_rules(i, config, names, **moe_options)


def llama_rules(config: ModelConfig, names: MoENames = MoENames()) -> list[Rule]:
    """Every tensor of a Llama-style MoE model (GQA attention, pre-norm, MoE FFNs)."""
    rules = head_rules(config)
    for i in range(config.num_layers):
        rules += norm_rules(i) + attention_rules(i, config) + ffn_rules(i, config, names)
    return rules
