"""Independent plain-PyTorch computations the MoE tests compare against (float64, loops)."""

import math

import torch
import torch.nn.functional as F


def ffn(x, w_up, w_down, activation):
    h = x @ w_up.t()
    if activation == "gelu":
        a = F.gelu(h)
    else:
        gate, up = h.chunk(2, dim=-1)
        a = (F.silu(gate) if activation == "swiglu" else F.gelu(gate)) * up
    return a @ w_down.t()


def naive_topk_routing(logits, cfg, expert_bias=None):
    """Per-token loop: returns a list of {expert: weight} dicts (before any capacity drop)."""
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    per_group = cfg.num_experts // cfg.num_groups
    out = []
    for t in range(logits.shape[0]):
        s = scores[t].tolist()
        c = [s[e] + (0.0 if expert_bias is None else float(expert_bias[e])) for e in range(cfg.num_experts)]
        candidates = list(range(cfg.num_experts))
        if cfg.num_groups > 1:
            group_rank = []
            for g in range(cfg.num_groups):
                members = sorted(c[g * per_group:(g + 1) * per_group], reverse=True)
                group_rank.append((members[0] + members[1], g))
            kept = [g for _, g in sorted(group_rank, reverse=True)[: cfg.topk_groups]]
            candidates = [e for e in candidates if e // per_group in kept]
        chosen = sorted(candidates, key=lambda e: -c[e])[: cfg.top_k]
        w = {e: s[e] for e in chosen}
        if cfg.norm_topk_prob:
            total = sum(w.values())
            w = {e: v / total for e, v in w.items()}
        out.append({e: v * cfg.route_scale for e, v in w.items()})
    return out


def routing_to_dicts(idx, weight):
    return [{int(e): float(w) for e, w in zip(idx[t].tolist(), weight[t].tolist()) if e >= 0}
            for t in range(idx.shape[0])]


def assert_same_routing(got, expected, tol=1e-12):
    assert len(got) == len(expected)
    for t, (g, e) in enumerate(zip(got, expected)):
        assert set(g) == set(e), f"token {t}: experts {sorted(g)} != expected {sorted(e)}"
        for k in e:
            assert math.isclose(g[k], e[k], rel_tol=tol, abs_tol=tol), f"token {t} expert {k}: {g[k]} != {e[k]}"


def naive_moe_output(layer, x, routes):
    """sum_e w_e FFN_e(x_t) + shared(x_t) from the layer's own parameters, token by token."""
    cfg = layer.config
    w_up, w_down = layer.experts.w_up, layer.experts.w_down
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros_like(x[t])
        for e, w in routes[t].items():
            row = row + w * ffn(x[t], w_up[e], w_down[e], cfg.activation)
        if layer.shared is not None:
            shared = ffn(x[t], layer.shared.up.weight, layer.shared.down.weight, cfg.activation)
            if layer.shared_gate is not None:
                shared = shared * torch.sigmoid(x[t] @ layer.shared_gate.weight[0])
            row = row + shared
        rows.append(row)
    return torch.stack(rows)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
