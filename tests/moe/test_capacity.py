"""Capacity factor and drop policies against an independent per-expert selection."""

import math

import pytest
import torch
from helpers import assert_same_routing, naive_moe_output, naive_topk_routing, rel_err, routing_to_dicts

from moekit import MoE, MoEConfig


def naive_capacity(routes, scores, num_experts, top_k, capacity, policy):
    """Keep per expert the `capacity` best assignments: by score, or first choices then token order."""
    tokens = len(routes)
    ranked = []  # (token, slot) in each token's choice order, slot 0 = best
    for t, r in enumerate(routes):
        ordered = sorted(r, key=lambda e: -scores[t][e])
        ranked.append(ordered)
    kept = [dict() for _ in range(tokens)]
    for e in range(num_experts):
        cands = [(k, t) for k in range(top_k) for t in range(tokens) if ranked[t][k] == e]
        if policy == "probability":
            cands.sort(key=lambda kt: -scores[kt[1]][e])  # stable: ties keep position order
        for _, t in cands[:capacity]:
            kept[t][e] = routes[t][e]
    return kept


@pytest.mark.parametrize("policy", ["probability", "position"])
@pytest.mark.parametrize("capacity_factor,score_func", [(1.0, "softmax"), (0.5, "sigmoid"), (1.25, "softmax")])
def test_capacity_drops_match_naive(policy, capacity_factor, score_func):
    torch.manual_seed(7)
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=8, top_k=2, capacity_factor=capacity_factor,
                    drop_policy=policy, score_func=score_func, backend="reference")
    layer = MoE(cfg).double()
    with torch.no_grad():
        layer.router.weight[0] += 0.8  # make expert 0 oversubscribed
    tokens = 40
    x = torch.randn(tokens, 16, dtype=torch.float64) + 0.5
    routing = layer.router(x)
    logits = x @ layer.router.weight.t()
    scores = (logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()).tolist()
    routes = naive_topk_routing(logits, cfg)
    capacity = math.ceil(capacity_factor * tokens * 2 / 8)
    expected = naive_capacity(routes, scores, 8, 2, capacity, policy)
    assert_same_routing(routing_to_dicts(routing.topk_idx, routing.topk_weight), expected)
    dropped = sum(len(r) - len(k) for r, k in zip(routes, expected))
    assert dropped > 0
    out = layer(x)
    assert rel_err(out, naive_moe_output(layer, x, expected)) < 1e-12
    assert math.isclose(layer.last_stats.dropped_fraction.item(), dropped / (tokens * 2), rel_tol=1e-6)
    load = layer.last_stats.tokens_per_expert
    assert int(load.max()) <= capacity and int(load.sum()) == tokens * 2 - dropped


def test_policies_differ_and_dropless_drops_nothing():
    torch.manual_seed(8)
    base = dict(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, backend="reference")
    x = torch.randn(64, 16, dtype=torch.float64)
    kept = {}
    for policy in ("probability", "position"):
        torch.manual_seed(9)
        layer = MoE(MoEConfig(capacity_factor=0.5, drop_policy=policy, **base)).double()
        kept[policy] = layer.router(x).topk_idx
    assert not torch.equal(kept["probability"], kept["position"])
    torch.manual_seed(9)
    dropless = MoE(MoEConfig(**base)).double()
    dropless(x)
    assert dropless.last_stats.dropped_fraction.item() == 0.0
    assert int(dropless.last_stats.tokens_per_expert.sum()) == 64 * 2
