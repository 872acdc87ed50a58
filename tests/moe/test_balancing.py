"""Balancing losses against their formulas, and aux-loss-free bias balancing over steps."""

import math

import pytest
import torch
from helpers import naive_topk_routing

from moekit import MoE, MoEConfig
from moekit.moe import update_expert_biases


def make_layer(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(hidden_size=16, ffn_hidden_size=8, num_experts=8, top_k=2, backend="reference")
    base.update(kw)
    return MoE(MoEConfig(**base)).double()


def naive_switch_loss(routes, probs, num_experts, top_k):
    """E * sum_e f_e P_e with f_e the share of assignments to e and P_e the mean probability."""
    tokens = len(routes)
    total = 0.0
    for e in range(num_experts):
        f = sum(1 for r in routes if e in r) / (tokens * top_k)
        p = sum(probs[t][e] for t in range(tokens)) / tokens
        total += f * p
    return num_experts * total


def naive_losses(layer, x: torch.Tensor) -> tuple[float, float, float]:
    """The Switch aux loss, the sequence-wise loss (the same per sequence, averaged) and the z-loss of
    ``layer``'s router (8 experts, top-2) on ``x`` [batch, seq, 16], by their definitions."""
    batch, seq, _ = x.shape
    logits = x.reshape(-1, 16) @ layer.router.weight.t()
    routes = naive_topk_routing(logits, layer.config)
    scores = logits.softmax(-1) if layer.config.score_func == "softmax" else logits.sigmoid()
    probs = (scores / scores.sum(-1, keepdim=True)).tolist()
    aux = naive_switch_loss(routes, probs, 8, 2)
    seq_aux = sum(naive_switch_loss(routes[b * seq:(b + 1) * seq], probs[b * seq:(b + 1) * seq], 8, 2)
                  for b in range(batch)) / batch
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / len(routes)
    return aux, seq_aux, z


# Coefficients 0: MoEStats still reports the z and sequence-wise losses, unweighted (a run logs them to
# decide whether it needs them), while the weighted aux_loss leaves them out.
@pytest.mark.parametrize("seq_coef,z_coef", [(0.7, 0.05), (0.0, 0.0)])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_seq_and_z_losses(score_func, seq_coef, z_coef):
    layer = make_layer(score_func=score_func, aux_loss_coef=0.3, seq_aux_loss_coef=seq_coef, z_loss_coef=z_coef)
    batch, seq = 3, 10
    x = torch.randn(batch, seq, 16, dtype=torch.float64)
    layer(x)
    aux, seq_aux, z = naive_losses(layer, x)
    stats = layer.last_stats
    assert math.isclose(stats.aux_loss.item(), aux, rel_tol=1e-12)
    assert math.isclose(stats.seq_aux_loss.item(), seq_aux, rel_tol=1e-12)
    assert math.isclose(stats.z_loss.item(), z, rel_tol=1e-12)
    expected_total = 0.3 * aux + seq_coef * seq_aux + z_coef * z
    assert math.isclose(layer.aux_loss.item(), expected_total, rel_tol=1e-12)
    assert layer.aux_loss.requires_grad


def test_aux_loss_is_one_at_uniform_routing():
    layer = make_layer(aux_loss_coef=1.0)
    torch.nn.init.zeros_(layer.router.weight)  # every expert equally likely
    x = torch.randn(8, 16, dtype=torch.float64)
    # Force a perfectly even assignment: 8 tokens x top-2 over 8 experts, 2 per expert.
    idx = torch.tensor([[i % 8, (i + 4) % 8] for i in range(8)])
    probs = torch.full((8, 8), 1 / 8, dtype=torch.float64)
    from moekit.moe.balancing import load_balance_loss
    assert math.isclose(load_balance_loss(idx, probs, 8).item(), 1.0, rel_tol=1e-12)
    layer(x)
    assert layer.aux_loss.item() >= 1.0 - 1e-12  # zero logits: P uniform, so the loss is exactly 1
    assert math.isclose(layer.aux_loss.item(), 1.0, rel_tol=1e-12)


def load_cv(layer, x):
    layer(x)
    return layer.last_stats.load_cv.item()


# Softmax scores are ~1/E, so the bias step must be smaller than for sigmoid scores.
@pytest.mark.parametrize("score_func,rate", [("sigmoid", 0.01), ("softmax", 0.002)])
def test_expert_bias_balances_skewed_load(score_func, rate):
    layer = make_layer(seed=4, num_experts=16, top_k=2, score_func=score_func, bias_update_rate=rate)
    favoured = torch.randn(16, dtype=torch.float64)
    favoured = 2 * favoured / favoured.norm()
    with torch.no_grad():
        layer.router.weight.normal_(std=0.3)
        layer.router.weight[:3] += favoured  # experts 0-2 attract most tokens
    x = torch.randn(512, 16, dtype=torch.float64) + favoured
    layer.train()
    cv_before = load_cv(layer, x)
    for _ in range(150):
        layer(x)
        update_expert_biases(layer)
    cv_after = load_cv(layer, x)
    assert cv_before > 1.0
    assert cv_after <= 0.5 * cv_before, (cv_before, cv_after)


def test_expert_bias_untouched_in_eval_and_without_rate():
    layer = make_layer(bias_update_rate=0.01)
    x = torch.randn(32, 16, dtype=torch.float64)
    layer.eval()
    layer(x)
    layer.update_expert_bias()
    assert torch.count_nonzero(layer.router.expert_bias) == 0
    no_rate = make_layer()
    no_rate.train()
    no_rate(x)
    no_rate.update_expert_bias()
    assert torch.count_nonzero(no_rate.router.expert_bias) == 0


def test_bias_update_uses_reduced_load():
    layer = make_layer(bias_update_rate=0.1)
    layer.train()
    layer(torch.randn(16, 16, dtype=torch.float64))
    seen = {}

    def reduce(load):
        seen["load"] = load.clone()
        out = torch.zeros_like(load)
        out[0] = 100.0  # as if the other ranks sent everything to expert 0
        return out

    layer.update_expert_bias(reduce)
    assert seen["load"].sum().item() == 32  # 16 tokens x top-2 accumulated
    assert layer.router.expert_bias[0].item() == pytest.approx(-0.1)
    assert torch.allclose(layer.router.expert_bias[1:], torch.full((7,), 0.1))
    assert layer.router.expert_bias.dtype == torch.float32


def stats_dict(layer):
    return {k: torch.as_tensor(v) for k, v in layer.last_stats.to_dict().items()}


# A forward without autograd keeps its routing and computes the balancing losses and statistics
# only when read; they must be those the forward would have computed at once.
@pytest.mark.parametrize("kw", [
    dict(z_loss_coef=0.05, seq_aux_loss_coef=0.4),
    dict(score_func="sigmoid", capacity_factor=1.0, num_groups=2, topk_groups=1),
    dict(router_type="expert_choice", capacity_factor=1.0, aux_loss_coef=0.0, z_loss_coef=0.05),  # no aux loss
])
def test_no_grad_forward_defers_the_same_balancing(kw, monkeypatch):
    from moekit.moe import balancing
    layer = make_layer(seed=5, **{"aux_loss_coef": 0.3, **kw})
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    layer(x)
    eager_stats, eager_aux = stats_dict(layer), layer.aux_loss.detach()
    assert not layer.balance.deferred
    calls = []
    computed = balancing.layer_balance
    monkeypatch.setattr(balancing, "layer_balance", lambda *a: calls.append(1) or computed(*a))
    with torch.no_grad():
        out = layer(x)
    assert layer.balance.deferred and calls == []  # nothing computed during the forward
    assert torch.equal(layer.aux_loss, eager_aux) and len(calls) == 1
    assert not layer.aux_loss.requires_grad
    deferred = stats_dict(layer)
    assert deferred.keys() == eager_stats.keys()
    for name, value in eager_stats.items():
        assert torch.equal(deferred[name], value), name
    # The kept routing is this forward's: another input gives its own statistics.
    with torch.no_grad():
        layer(2 * x + 1)
    assert not torch.equal(stats_dict(layer)["router_entropy"], eager_stats["router_entropy"])
    assert out.shape == x.shape


def test_grad_forward_computes_balancing_in_the_graph():
    layer = make_layer(aux_loss_coef=0.5)
    x = torch.randn(12, 16, dtype=torch.float64)
    layer(x)
    assert not layer.balance.deferred
    layer.aux_loss.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cast", ["bfloat16", "double", "half"])
def test_balancing_buffers_keep_their_float32_values_through_a_cast(cast):
    """A trained bias (small steps: 0.001 apart) survives the model's cast to another dtype exactly."""
    layer = make_layer(bias_update_rate=0.001)
    values = torch.arange(8, dtype=torch.float32) * 0.001 + 0.3001
    layer.router.expert_bias.copy_(values)
    layer.router.load_since_update.copy_(values * 1000)
    getattr(layer, cast)()
    assert layer.router.expert_bias.dtype == torch.float32 and torch.equal(layer.router.expert_bias, values)
    assert torch.equal(layer.router.load_since_update, values * 1000)
    assert layer.router.weight.dtype == getattr(torch, cast if cast != "half" else "float16")


def test_no_grad_forward_in_training_mode_adds_no_bias_load():
    """A forward without autograd (a sample generated mid-training, a logging pass) trains nothing: its
    choices must not move the expert bias at the next step, even with the model left in train mode."""
    layer = make_layer(bias_update_rate=0.01).train()
    x = torch.randn(16, 16, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
    with torch.inference_mode():
        layer(x)
    assert torch.count_nonzero(layer.router.load_since_update) == 0
    layer.update_expert_bias()
    assert torch.count_nonzero(layer.router.expert_bias) == 0
    layer(x)  # a training forward counts: 16 tokens x top-2
    assert layer.router.load_since_update.sum().item() == 32
