"""Each routing mode against an independent per-token computation (float64)."""

import pytest
import torch
from helpers import assert_same_routing, naive_moe_output, naive_topk_routing, rel_err, routing_to_dicts

from moekit import MoE, MoEConfig


def make_layer(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(hidden_size=16, ffn_hidden_size=8, num_experts=8, top_k=2, backend="reference")
    base.update(kw)
    return MoE(MoEConfig(**base)).double()


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu"])
def test_softmax_topk_routing_and_output(norm, activation):
    layer = make_layer(norm_topk_prob=norm, activation=activation, route_scale=1.5, num_shared_experts=1)
    x = torch.randn(24, 16, dtype=torch.float64)
    routing = layer.router(x)
    expected = naive_topk_routing(x @ layer.router.weight.t(), layer.config)
    assert_same_routing(routing_to_dicts(routing.topk_idx, routing.topk_weight), expected)
    assert rel_err(layer(x), naive_moe_output(layer, x, expected)) < 1e-12


@pytest.mark.parametrize("num_groups,topk_groups,top_k", [(4, 2, 4), (8, 3, 2), (2, 1, 3)])
def test_deepseek_v3_group_limited_sigmoid_with_bias(num_groups, topk_groups, top_k):
    layer = make_layer(seed=1, num_experts=16, top_k=top_k, score_func="sigmoid", num_groups=num_groups,
                       topk_groups=topk_groups, route_scale=2.5, num_shared_experts=2)
    # A bias large enough to change choices, as after aux-loss-free balancing.
    layer.router.expert_bias.copy_(torch.randn(16) * 0.3)
    x = torch.randn(32, 16, dtype=torch.float64)
    routing = layer.router(x)
    logits = x @ layer.router.weight.t()
    expected = naive_topk_routing(logits, layer.config, layer.router.expert_bias)
    assert_same_routing(routing_to_dicts(routing.topk_idx, routing.topk_weight), expected)
    # The bias changes the choice but the weights are the unbiased sigmoid scores.
    unbiased = naive_topk_routing(logits, layer.config)
    assert any(set(a) != set(b) for a, b in zip(expected, unbiased))
    assert rel_err(layer(x), naive_moe_output(layer, x, expected)) < 1e-12


@pytest.mark.parametrize("capacity_factor", [1.0, 2.0, 0.5])
def test_expert_choice(capacity_factor):
    layer = make_layer(seed=2, router_type="expert_choice", capacity_factor=capacity_factor)
    tokens = 20
    x = torch.randn(tokens, 16, dtype=torch.float64)
    routing = layer.router(x)
    scores = (x @ layer.router.weight.t()).softmax(-1)
    capacity = max(1, -(-int(capacity_factor * tokens * 2) // 8))
    expected = [{} for _ in range(tokens)]
    for e in range(8):
        picked = sorted(range(tokens), key=lambda t: -scores[t, e].item())[:capacity]
        for t in picked:
            expected[t][e] = scores[t, e].item()
    assert_same_routing(routing_to_dicts(routing.topk_idx, routing.topk_weight), expected)
    assert rel_err(layer(x), naive_moe_output(layer, x, expected)) < 1e-12
    assert int((routing.topk_idx >= 0).sum()) == 8 * min(capacity, tokens)
    untouched = sum(1 for d in expected if not d) / tokens
    assert abs(layer.last_stats.dropped_fraction.item() - untouched) < 1e-6  # stats are float32


def test_gated_shared_expert():
    layer = make_layer(seed=3, num_shared_experts=1, shared_ffn_hidden_size=12, shared_expert_gate=True)
    x = torch.randn(10, 16, dtype=torch.float64)
    expected = naive_topk_routing(x @ layer.router.weight.t(), layer.config)
    assert rel_err(layer(x), naive_moe_output(layer, x, expected)) < 1e-12


def test_router_math_in_float32_for_bf16_input():
    layer = make_layer(seed=4).to(torch.bfloat16)
    x = torch.randn(8, 16).to(torch.bfloat16)
    routing = layer.router(x)
    assert routing.logits.dtype == torch.float32 and routing.topk_weight.dtype == torch.float32
    assert layer(x).dtype == torch.bfloat16


def test_router_math_in_float32_under_autocast():
    """bf16 autocast (the trainer's on a GPU) must not turn the router's GEMM, and so the routing and
    the balancing losses, into bf16."""
    layer = make_layer(seed=6, score_func="sigmoid", aux_loss_coef=0.01, z_loss_coef=1e-3).float().train()
    x = torch.randn(256, 16)
    plain = layer.router(x)
    layer(x)
    plain_aux = layer.aux_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = layer.router(x)
        layer(x)
        auto_aux = layer.aux_loss
    assert auto.logits.dtype == torch.float32 and auto.topk_weight.dtype == torch.float32
    assert torch.equal(auto.logits, plain.logits) and torch.equal(auto.topk_idx, plain.topk_idx)
    assert torch.equal(auto.topk_weight, plain.topk_weight)
    assert auto_aux.dtype == torch.float32 and torch.equal(auto_aux, plain_aux)


def test_router_jitter_noise_is_drawn_in_float32():
    """In bf16 the multipliers in 1 +- 0.01 would take four values, none above 1."""
    layer = make_layer(seed=7, router_jitter=0.01).to(torch.bfloat16).train()
    x = torch.zeros(4096, 16, dtype=torch.bfloat16)
    x[:, 0] = 1  # each logit is then the weight times the one feature's multiplier
    noisy = layer.router.logits(x)
    clean = layer.router.eval().logits(x)
    multiplier = noisy[:, 0] / clean[:, 0]
    assert multiplier.max() > 1.005 and multiplier.min() < 0.995 and len(multiplier.unique()) > 100


def test_router_jitter_only_in_training():
    layer = make_layer(seed=5, router_jitter=0.1)
    x = torch.randn(64, 16, dtype=torch.float64)
    clean = x @ layer.router.weight.t()
    layer.eval()
    assert torch.equal(layer.router.logits(x), clean)
    layer.train()
    noisy = layer.router.logits(x)
    assert not torch.allclose(noisy, clean)
    # Multiplicative noise in [1 - eps, 1 + eps] on the input: bounded logit change.
    bound = (x.abs() * 0.1) @ layer.router.weight.abs().t()
    assert bool(((noisy - clean).abs() <= bound + 1e-12).all())


@pytest.mark.parametrize("norm", [True, False])
def test_top1_weight_with_and_without_norm_topk_prob(norm):
    """The documented variant: norm_topk_prob renormalises at top_k=1 too (HF Mixtral / Qwen-MoE), so the
    weight is route_scale and the task loss gives the router no gradient; without it the weight is the
    softmax probability (Switch Transformer) and the router learns from the output."""
    layer = make_layer(seed=8, top_k=1, norm_topk_prob=norm, route_scale=1.5)
    x = torch.randn(12, 16, dtype=torch.float64)
    routing = layer.router(x)
    probs = (x @ layer.router.weight.t()).softmax(-1)
    expected = 1.5 * (torch.ones(12, 1, dtype=torch.float64) if norm else probs.max(-1, keepdim=True).values)
    torch.testing.assert_close(routing.topk_weight, expected, rtol=1e-12, atol=1e-12)
    layer(x).sum().backward()
    grad = layer.router.weight.grad.abs().max().item()
    assert grad < 1e-15 if norm else grad > 1e-4  # s / s: zero up to rounding
