"""Qwen3-Next <-> moekit: logits, padded logits, greedy generation and exact round trips on tiny
random configurations; folder errors; refused options."""

from __future__ import annotations

import pytest
import torch
import transformers
from hybrid_checks import (
    build,
    check_greedy_generation,
    check_logits,
    check_missing_and_misshaped,
    check_padded_logits,
    check_refusal,
    check_round_trip,
    check_sharded_folder,
    rewrite,
)

from moekit.mixers.qwen3_next_deltanet import Qwen3NextGatedDeltaNet
from moekit.models.hf import from_hf

CONFIG = transformers.Qwen3NextConfig
# Gated DeltaNet with 2 q/k heads serving 4 value heads, quarter-width RoPE, 4 experts top-2.
GROUPED = dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
               num_hidden_layers=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
               linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
CONFIGS = {
    "gva-e4k2": GROUPED,
    # A dense first layer, attention in the middle, value heads twice as wide as keys, half-width
    # RoPE, 8 experts top-3 without renormalisation, tied embeddings, 1 kv head.
    "dense0-e8k3-tied": dict(
        intermediate_size=40, moe_intermediate_size=12, shared_expert_intermediate_size=20, num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"], mlp_only_layers=[0],
        num_key_value_heads=1, head_dim=8, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False,
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=16,
        linear_conv_kernel_dim=3, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}),
}
NAMES = sorted(CONFIGS)


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    hf = build(CONFIG, CONFIGS[request.param], seed=NAMES.index(request.param))
    return hf, from_hf(hf)


def test_layout(pair):
    hf, ours = pair
    kinds = hf.config.layer_types
    assert ours.config.layer_pattern == "".join("L" if k == "linear_attention" else "N" for k in kinds)
    assert isinstance(ours.layers[0].mixer, Qwen3NextGatedDeltaNet)
    moe = ours.layers[-1].ffn
    assert moe.shared_gate is not None and moe.shared.down.in_features == hf.config.shared_expert_intermediate_size


def test_logits_match(pair):
    check_logits(*pair)


def test_padded_logits_match(pair):
    check_padded_logits(*pair)


def test_greedy_generation_matches(pair):
    check_greedy_generation(*pair)


def test_round_trip_is_exact(pair):
    check_round_trip(*pair)


def test_sharded_folder(tmp_path):
    check_sharded_folder(build(CONFIG, GROUPED, seed=4), tmp_path / "sharded")


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    check_missing_and_misshaped(build(CONFIG, GROUPED, seed=5), tmp_path / "bad",
                                missing="model.layers.1.linear_attn.in_proj_qkvz.weight",
                                widened="model.layers.3.mlp.shared_expert_gate.weight")


def test_mtp_weights_are_ignored_but_others_are_not(tmp_path):
    hf = build(CONFIG, GROUPED, seed=6)
    hf.save_pretrained(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"mtp.fc.weight": torch.randn(4, 4)}))
    from_hf(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.layers.0.linear_attn.stray": torch.randn(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): model\.layers\.0\.linear_attn\.stray"):
        from_hf(tmp_path)


@pytest.mark.parametrize("changes, message", [
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_only_layers": [2]}, r"qwen3_next: dense layers=\[2\]"),
    ({"linear_value_head_dim": 12}, "linear_value_head_dim=12"),
    ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope type='linear'"),
])
def test_unsupported_options_are_refused(changes, message):
    check_refusal(CONFIG, GROUPED, changes, message)
