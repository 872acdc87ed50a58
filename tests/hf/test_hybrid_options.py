"""The model options added for Qwen3-Next, MiniMax-Text-01 and GraniteMoeHybrid, on their own:
config round trips and refusals, partial RoPE, zero-centred and grouped norms, training."""

from __future__ import annotations

import pytest
import torch

from moekit.mixers.config import MixerConfig
from moekit.mixers.norm import GatedRMSNorm, RMSNorm
from moekit.mixers.rope import RotaryEmbedding
from moekit.models.config import ModelConfig, ResidualScaling
from moekit.models.model import MoEForCausalLM

MOE = {"ffn_hidden_size": 8, "num_experts": 4, "top_k": 2, "num_shared_experts": 1, "shared_expert_gate": True}


def hybrid_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=40, hidden_size=16, layer_pattern="LNL", linear_mixer="qwen3_next_deltanet",
                  num_heads=2, num_kv_heads=1, head_dim=8, linear_num_heads=1, linear_head_dim=4,
                  linear_num_v_heads=2, expand_v=2, partial_rotary_factor=0.5, attention_output_gate=True,
                  qk_norm=True, norm_unit_offset=True, embedding_multiplier=1.5, logits_scaling=2.0,
                  residual={"from_norm": True, "attention_beta": 0.5, "ffn_alpha": 1.2}, moe=MOE)
    values.update(overrides)
    return ModelConfig.from_dict(values)


def test_config_round_trips_through_yaml(tmp_path):
    config = hybrid_config()
    assert config.residual == ResidualScaling(from_norm=True, attention_beta=0.5, ffn_alpha=1.2)
    config.to_yaml(tmp_path / "c.yaml")
    assert ModelConfig.from_yaml(tmp_path / "c.yaml") == config
    linear, softmax = config.mixer_config(0), config.mixer_config(1)
    assert (linear.num_heads, linear.head_dim, linear.num_v_heads) == (1, 4, 2)
    assert (softmax.num_heads, softmax.head_dim, softmax.rotary_dim) == (2, 8, 4)


@pytest.mark.parametrize("overrides, message", [
    ({"residual": {"beta": 2.0}}, r"ResidualScaling: unknown key\(s\) \['beta'\]"),
    ({"linear_num_v_heads": 3, "linear_num_heads": 2}, r"num_v_heads \(3\) must be a multiple of num_heads \(2\)"),
    ({"partial_rotary_factor": 0.375}, "rotate an even number of channels"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor must be in"),
    ({"logits_scaling": 0.0}, "logits_scaling must be > 0"),
    ({"attention_scale": -1.0}, "attention_scale must be None or > 0"),
])
def test_bad_options_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        hybrid_config(**overrides)


def test_partial_rope_rotates_the_leading_channels_only():
    x = torch.randn(2, 5, 3, 12, dtype=torch.float64)
    positions = torch.randint(0, 50, (2, 5))
    out = RotaryEmbedding(12, 100.0, rotary_dim=4)(x, positions)
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert torch.allclose(out[..., :4], RotaryEmbedding(4, 100.0)(x[..., :4], positions))
    assert not torch.allclose(out[..., :4], x[..., :4])
    assert torch.equal(RotaryEmbedding(12, rotary_dim=0)(x, positions), x)  # NoPE


def test_zero_centred_norm_applies_one_plus_weight():
    norm = RMSNorm(10, 1e-5, unit_offset=True)
    assert torch.equal(norm.weight, torch.zeros(10))
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 10, dtype=torch.float64)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * (1 + norm.weight.double())
    assert torch.allclose(norm(x), expected)


def test_grouped_gated_norm_takes_the_rms_per_group():
    norm = GatedRMSNorm(12, 1e-6, norm_before_gate=False, group_size=4)
    with torch.no_grad():
        norm.weight.normal_()
    x, gate = torch.randn(2, 3, 12, dtype=torch.float64), torch.randn(2, 3, 12, dtype=torch.float64)
    gated = (x * torch.nn.functional.silu(gate)).view(2, 3, 3, 4)
    expected = (gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-6)).view(2, 3, 12) * norm.weight.double()
    assert torch.allclose(norm(x, gate), expected)
    with pytest.raises(ValueError, match="group_size 5 must divide dim 12"):
        GatedRMSNorm(12, group_size=5)


def test_mamba2_groups_must_divide_heads():
    from moekit.mixers.mamba2 import Mamba2

    with pytest.raises(ValueError, match=r"num_heads \(3\) must be a multiple of ssm_groups \(2\)"):
        Mamba2(MixerConfig(hidden_size=16, num_heads=3, head_dim=4, ssm_groups=2))


@pytest.mark.parametrize("overrides", [{}, {"linear_mixer": "minimax_lightning", "linear_num_heads": 2,
                                            "linear_head_dim": 8, "linear_num_v_heads": None, "expand_v": 1},
                                       {"linear_mixer": "mamba2", "ssm_groups": 2, "conv_bias": True,
                                        "linear_num_v_heads": None, "linear_num_heads": 2, "partial_rotary_factor": 0.0,
                                        "attention_scale": 0.3, "residual": {"linear_beta": 0.5}}])
def test_models_with_the_options_train(overrides):
    """Every parameter gets a finite, non-zero gradient from the LM loss; decoding through the
    cache gives the full forward's logits."""
    torch.manual_seed(0)
    model = MoEForCausalLM(hybrid_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    model.eval()
    out = model.generate(ids[:, :4], 5, output_logits=True)
    with torch.no_grad():
        full = model(out.sequences).logits
    assert float((out.logits - full[:, 3:-1]).norm() / full.norm()) < 1e-5
