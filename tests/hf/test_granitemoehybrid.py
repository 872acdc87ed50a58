"""GraniteMoeHybrid <-> moekit: logits, padded logits, greedy generation and exact round trips on
tiny random configurations; folder errors; refused options."""

from __future__ import annotations

import pytest
import torch
import transformers
from hf_tiny import VOCAB
from hybrid_checks import (
    build,
    check_greedy_generation,
    check_logits,
    check_missing_and_misshaped,
    check_padded_logits,
    check_refusal,
    check_round_trip,
    check_sharded_folder,
    logits,
)

from moekit.mixers.mamba2 import Mamba2
from moekit.models.hf import from_hf, to_hf
from moekit.models.model import MoEForCausalLM

CONFIG = transformers.GraniteMoeHybridConfig
# Mamba2 (2 B/C groups, conv bias) and attention without positions, every muP multiplier set.
NOPE = dict(intermediate_size=24, shared_intermediate_size=32, num_hidden_layers=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=4, mamba_d_state=8, mamba_d_head=16,
            mamba_n_groups=2, mamba_expand=2, layer_types=["mamba", "attention", "mamba", "attention"],
            embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=3.0, attention_multiplier=0.3)
CONFIGS = {
    "nope-g2-e4k2": NOPE,
    # Attention first with RoPE, one B/C group, no conv bias, 8 experts top-3, residual multiplier 1,
    # 4 kv heads, tied embeddings.
    "rope-g1-e8k3-tied": dict(
        intermediate_size=16, shared_intermediate_size=24, num_hidden_layers=3, num_key_value_heads=4,
        num_local_experts=8, num_experts_per_tok=3, mamba_n_heads=2, mamba_d_state=4, mamba_d_head=16,
        mamba_n_groups=1, mamba_expand=1, mamba_d_conv=3, mamba_conv_bias=False, position_embedding_type="rope",
        layer_types=["attention", "mamba", "mamba"], embedding_multiplier=1.5, logits_scaling=0.5,
        attention_multiplier=0.25, tie_word_embeddings=True),
}
NAMES = sorted(CONFIGS)


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    hf = build(CONFIG, CONFIGS[request.param], seed=NAMES.index(request.param))
    return hf, from_hf(hf)


def test_layout(pair):
    hf, ours = pair
    mamba = ours.layers[ours.config.layer_pattern.index("L")].mixer
    assert isinstance(mamba, Mamba2) and mamba.config.ssm_groups == hf.config.mamba_n_groups
    assert ours.config.partial_rotary_factor == (1.0 if hf.config.position_embedding_type == "rope" else 0.0)
    assert ours.config.attention_scale == hf.config.attention_multiplier


def test_logits_match(pair):
    check_logits(*pair)


def test_padded_logits_match(pair):
    check_padded_logits(*pair)


def test_greedy_generation_matches(pair):
    check_greedy_generation(*pair)


def test_round_trip_is_exact(pair):
    check_round_trip(*pair)


def test_sharded_folder(tmp_path):
    check_sharded_folder(build(CONFIG, NOPE, seed=4), tmp_path / "sharded")


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    check_missing_and_misshaped(build(CONFIG, NOPE, seed=5), tmp_path / "bad",
                                missing="model.layers.2.mamba.conv1d.bias",
                                widened="model.layers.0.block_sparse_moe.input_linear.weight")


@pytest.mark.parametrize("changes, message", [
    ({"mamba_proj_bias": True}, "mamba_proj_bias=True"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"time_step_limit": (0.0, 8.0)}, r"time_step_limit=\[0.0, 8.0\]"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type='alibi'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_options_are_refused(changes, message):
    check_refusal(CONFIG, NOPE, changes, message)


def test_moekit_checkpoint_converts_back(tmp_path):
    """The config's infinite time_step_limit survives moekit's config.json and rebuilds the model."""
    hf = build(CONFIG, NOPE, seed=7)
    from_hf(hf).save_pretrained(tmp_path)
    back = to_hf(MoEForCausalLM.from_pretrained(tmp_path))
    assert back.config.time_step_limit == (0.0, float("inf"))
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(back, ids), logits(hf, ids))
