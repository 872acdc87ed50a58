"""The model options added for these architectures: MLA, qk_norm_scope and YaRN in ModelConfig."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.mixers.mla import LatentCache, MultiHeadLatentAttention
from moekit.mixers.mla_config import MLAConfig
from moekit.mixers.rope_scaling import YarnScaling
from moekit.models.config import ModelConfig
from moekit.models.model import MoEForCausalLM

MLA = {"kv_lora_rank": 8, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 5, "q_lora_rank": 12}


def mla_model() -> MoEForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=40, hidden_size=16, layer_pattern="NN", num_heads=2, head_dim=10, mla=MLA,
                         first_k_dense=1, dense_ffn_hidden_size=24,
                         moe={"ffn_hidden_size": 8, "num_experts": 4, "top_k": 2})
    return MoEForCausalLM(config).eval()


def test_mla_config_round_trips_through_yaml(tmp_path):
    model = mla_model()
    assert isinstance(model.layers[0].mixer, MultiHeadLatentAttention)
    model.config.to_yaml(tmp_path / "m.yaml")
    again = ModelConfig.from_yaml(tmp_path / "m.yaml")
    assert again == model.config and again.mla == MLAConfig(**MLA)


def test_mla_config_refuses_bad_keys_and_shapes():
    with pytest.raises(ValueError, match=r"MLAConfig: unknown key\(s\) \['kv_rank'\]"):
        ModelConfig(layer_pattern="N", mla={"kv_rank": 8})
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even"):
        MLAConfig(qk_rope_head_dim=5)
    with pytest.raises(ValueError, match="unknown qk_norm_scope 'rows'"):
        ModelConfig(layer_pattern="N", qk_norm=True, qk_norm_scope="rows")


def test_mla_decoding_matches_full_forward():
    """Token-by-token decoding through the latent cache gives the full forward's logits."""
    model = mla_model()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 9)
        steps = [model(ids[:, :4], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(4, 9)]
    assert float((torch.cat(steps, 1) - full).norm() / full.norm()) < 1e-5
    entry = cache[0]
    assert isinstance(entry, LatentCache)
    # The cache holds the latent and the shared rotary key, not per-head keys and values.
    assert entry.nbytes == 2 * 9 * (8 + 4) * 4


def test_qk_norm_scope_all_normalises_across_heads():
    """scope "all" (OLMoE) normalises each token's whole q / k projection: one RMS for all heads."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=40, hidden_size=16, layer_pattern="N", num_heads=2, num_kv_heads=1,
                         head_dim=8, qk_norm=True, qk_norm_scope="all", moe={"ffn_hidden_size": 8, "num_experts": 2,
                                                                            "top_k": 1})
    attn = MoEForCausalLM(config).layers[0].mixer
    assert attn.q_norm.weight.shape == (16,) and attn.k_norm.weight.shape == (8,)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        q = attn.q_norm(attn.q_proj(x))
        flat = attn.q_proj(x)
        expected = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + config.norm_eps) * attn.q_norm.weight
    assert torch.allclose(q, expected, atol=1e-6)


def test_yarn_blends_extrapolated_and_interpolated_frequencies():
    """Dimensions turning more than beta_fast times over the original context keep their
    frequency, those turning less than beta_slow times are divided by the factor, and the ones
    between follow the linear ramp; cos / sin get the attention factor."""
    head_dim, theta = 32, 10000.0
    yarn = YarnScaling(factor=4.0, original_max_len=64, beta_fast=8.0, beta_slow=0.5)
    base = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    turns = 64 * base / (2 * math.pi)
    got = yarn.inv_freq(head_dim, theta)
    assert torch.equal(got[turns > 8 * 1.5], base[turns > 8 * 1.5])
    slow = turns < 0.5 / 1.5
    assert slow.any() and torch.allclose(got[slow], base[slow] / 4, rtol=1e-12)
    between = (got < base) & (got > base / 4)
    assert between.any() and torch.all(got.diff() < 0)
    assert yarn.cos_sin_scale() == pytest.approx(0.1 * math.log(4.0) + 1)
    deepseek = YarnScaling(factor=40.0, original_max_len=4096, mscale=1.0, mscale_all_dim=1.0)
    assert deepseek.cos_sin_scale() == 1.0


def test_yarn_config_round_trips_and_refuses_bad_values(tmp_path):
    config = ModelConfig(vocab_size=40, hidden_size=16, layer_pattern="N", num_heads=2, head_dim=8,
                         rope_scaling={"factor": 2.0, "original_max_len": 32},
                         moe={"ffn_hidden_size": 8, "num_experts": 2, "top_k": 1})
    config.to_yaml(tmp_path / "c.yaml")
    assert ModelConfig.from_yaml(tmp_path / "c.yaml").rope_scaling == YarnScaling(2.0, 32)
    with pytest.raises(ValueError, match=r"YarnScaling: unknown key\(s\) \['scale'\]"):
        ModelConfig(layer_pattern="N", rope_scaling={"scale": 2.0})
    with pytest.raises(ValueError, match="factor must be >= 1"):
        YarnScaling(factor=0.5, original_max_len=32)


def test_mla_model_trains():
    """Every MLA parameter gets a finite gradient from the LM loss."""
    model = mla_model().train()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if ".mixer." in name:
            assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("key, values, error", [
    ("rope_scaling", {"factor": 4.0, "original_max_len": 32, "truncate": "false"}, "YarnScaling: truncate must be"),
    ("rope_scaling", {"factor": "4", "original_max_len": 32}, "YarnScaling: factor must be a number"),
    ("rope_scaling", {"factor": 4.0, "original_max_len": True}, "YarnScaling: original_max_len must be"),
    ("rope_scaling", {"factor": 4.0, "original_max_len": 32, "mscale": "1"}, "YarnScaling: mscale must be"),
    ("rope_scaling", {"factor": 4.0, "original_max_len": 32, "attention_factor": 0.0},
     "YarnScaling: attention_factor must be None or > 0"),
    ("mla", {"bias": "false"}, "MLAConfig: bias must be true or false"),
    ("mla", {"norm_eps": -1.0}, "MLAConfig: norm_eps must be"),
    ("mla", {"softmax_scale": "0.1"}, "MLAConfig: softmax_scale must be"),
    ("mla", {"kv_lora_rank": True}, "MLAConfig: kv_lora_rank must be a positive integer"),
])
def test_nested_attention_configs_refuse_mistyped_values(key, values, error):
    """A quoted YAML value in ``rope_scaling`` or ``mla`` built another model (the string "false" is
    true: truncated YaRN ramp, MLA biases) or failed on a bare comparison error naming no key."""
    with pytest.raises((TypeError, ValueError), match=error):
        ModelConfig(layer_pattern="N", **{key: values})


@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_yarn_needs_a_rope_theta_above_one(theta):
    """YaRN's correction range divides by log(rope_theta): theta 1 failed at the first forward with a
    bare ZeroDivisionError, and theta < 1 gave a ramp over negative dimensions."""
    with pytest.raises(ValueError, match="rope_theta must be > 1 with rope_scaling"):
        ModelConfig(layer_pattern="N", rope_theta=theta, rope_scaling={"factor": 4.0, "original_max_len": 64})
    assert ModelConfig(layer_pattern="N", rope_theta=theta).rope_theta == theta
