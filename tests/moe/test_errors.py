"""Bad configurations and inputs fail with messages that name the problem."""

import pytest
import torch

from moekit import MoE, MoEConfig


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=9, num_experts=8), r"top_k \(9\) must be <= num_experts \(8\)"),
    (dict(num_groups=2, topk_groups=3), r"topk_groups \(3\) must be <= num_groups \(2\)"),
    (dict(num_experts=10, num_groups=4), r"num_experts \(10\) must be divisible by num_groups \(4\)"),
    (dict(score_func="relu"), "unknown score_func 'relu'"),
    (dict(activation="tanh"), "unknown activation 'tanh'"),
    (dict(backend="cuda"), "unknown backend 'cuda'"),
    (dict(router_type="hash"), "unknown router_type 'hash'"),
    (dict(drop_policy="random"), "unknown drop_policy 'random'"),
    (dict(capacity_factor=0.0), "capacity_factor must be None"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(top_k=True), "top_k must be a positive integer"),
    (dict(capacity_factor=float("inf")), "capacity_factor must be None .* finite"),
    (dict(bias_update_rate=float("inf")), "bias_update_rate must be finite"),
    (dict(router_jitter=1.0), r"router_jitter must lie in \[0, 1\)"),
    (dict(route_scale=float("inf")), "route_scale must be finite"),
    (dict(num_shared_experts=1.5), "num_shared_experts must be an integer"),
    (dict(shared_ffn_hidden_size=-4), "shared_ffn_hidden_size must be None or an integer >= 0"),
    (dict(init_std=-0.1), "init_std must be finite and >= 0"),
    (dict(shared_expert_gate=True), "num_shared_experts is 0: there is no shared expert for shared_expert_gate=True"),
    (dict(shared_ffn_hidden_size=64), "there is no shared expert for shared_ffn_hidden_size=64"),
    (dict(router_type="expert_choice", aux_loss_coef=0.01, route_scale=2.0),
     "expert_choice routing does not use aux_loss_coef=0.01, route_scale=2.0"),
    (dict(router_type="expert_choice", norm_topk_prob=False, drop_policy="position"),
     "expert_choice routing does not use norm_topk_prob=False, drop_policy='position'"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(norm_topk_prob="false"), "norm_topk_prob must be True or False, got 'false'"),
    (dict(shared_expert_gate=1, num_shared_experts=1), "shared_expert_gate must be True or False, got 1"),
    (dict(check_finite="no"), "check_finite must be True or False, got 'no'"),
    (dict(aux_loss_coef="1e-3"), "aux_loss_coef must be a number, got '1e-3'"),
    (dict(route_scale="2.5"), "route_scale must be a number, got '2.5'"),
    (dict(capacity_factor="1.25"), "capacity_factor must be None or a number, got '1.25'"),
    (dict(capacity_factor=True), "capacity_factor must be None or a number, got True"),
    (dict(route_scale=None), "route_scale must be a number, got None"),
    (dict(router_jitter="0.1"), "router_jitter must be a number, got '0.1'"),
])
def test_config_field_types(kw, match):
    """A string is truthy: norm_topk_prob="false" would normalise the weights; a number given as a string
    (YAML reads 1e-3 as one) must name its field, not fail in a comparison with a bare TypeError."""
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kw)


def test_unknown_config_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_expert'\]"):
        MoEConfig.from_dict({"num_expert": 8})
    assert MoEConfig.from_dict({"num_experts": 4, "top_k": 1}).num_experts == 4


def test_bad_inputs():
    layer = MoE(MoEConfig(hidden_size=16, ffn_hidden_size=8, check_finite=True))
    with pytest.raises(ValueError, match=r"expected input \[..., hidden_size=16\], got shape \(4, 12\)"):
        layer(torch.randn(4, 12))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 16, dtype=torch.long))
    x = torch.randn(4, 16)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(x)
    x[2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(x)


def test_low_precision_needs_whole_scale_blocks():
    with pytest.raises(ValueError, match="precision 'fp8' needs hidden_size to be a multiple of 128, got 96"):
        MoEConfig(precision="fp8", hidden_size=96, ffn_hidden_size=128)
    with pytest.raises(ValueError, match="precision 'mxfp8' needs ffn_hidden_size to be a multiple of 128"):
        MoEConfig(precision="mxfp8", hidden_size=128, ffn_hidden_size=64)


@pytest.mark.parametrize("backend", ["reference", "grouped_mm"])
@pytest.mark.parametrize("kw", [dict(aux_loss_coef=0.01, seq_aux_loss_coef=0.01, z_loss_coef=0.01,
                                     num_shared_experts=1),
                                dict(capacity_factor=1.0), dict(router_type="expert_choice", capacity_factor=1.0)])
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_no_tokens_give_an_empty_output_and_zero_losses(backend, kw, shape):
    layer = MoE(MoEConfig(hidden_size=16, ffn_hidden_size=8, backend=backend, **kw)).train()
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out.shape == shape
    (out.sum() + layer.aux_loss).backward()
    assert layer.aux_loss.item() == 0
    stats = layer.last_stats
    assert stats.dropped_fraction.item() == 0 and stats.tokens_per_expert.sum().item() == 0
    assert all(torch.isfinite(getattr(stats, f)).all() for f in ("router_entropy", "load_cv", "z_loss"))
