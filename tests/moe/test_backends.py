"""gradcheck of the reference backend, and grouped_mm == reference forward and backward."""

import pytest
import torch
from helpers import rel_err
from torch.func import functional_call

from moekit import MoE, MoEConfig
from moekit.ops import moe as moe_ops


@pytest.mark.parametrize("extra", [
    dict(),
    dict(score_func="sigmoid", num_groups=2, topk_groups=1, num_shared_experts=1, route_scale=2.0),
    dict(capacity_factor=0.75, activation="geglu", aux_loss_coef=0.1, seq_aux_loss_coef=0.1, z_loss_coef=0.1),
    dict(router_type="expert_choice", activation="gelu", num_shared_experts=1, shared_expert_gate=True),
])
def test_gradcheck_reference_float64(extra):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=6, ffn_hidden_size=4, num_experts=4, top_k=2, backend="reference", **extra)
    layer = MoE(cfg).double()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        out = functional_call(layer, dict(zip(names, ps)), (x,))
        return out, layer.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def clone_pair(cfg_kwargs, dtype=torch.float32):
    torch.manual_seed(1)
    ref = MoE(MoEConfig(backend="reference", **cfg_kwargs)).to(dtype)
    grouped = MoE(MoEConfig(backend="grouped_mm", **cfg_kwargs)).to(dtype)
    grouped.load_state_dict(ref.state_dict())
    return ref, grouped


@pytest.mark.parametrize("kw", [
    dict(hidden_size=32, ffn_hidden_size=16, num_experts=8, top_k=2),
    dict(hidden_size=64, ffn_hidden_size=32, num_experts=16, top_k=4, num_shared_experts=2, score_func="sigmoid",
         num_groups=4, topk_groups=2),
    dict(hidden_size=32, ffn_hidden_size=24, num_experts=8, top_k=1, capacity_factor=0.5, activation="gelu"),
    dict(hidden_size=48, ffn_hidden_size=16, num_experts=6, top_k=3, capacity_factor=1.0, drop_policy="position",
         activation="geglu", aux_loss_coef=0.01),
])
def test_grouped_mm_matches_reference(kw):
    ref, grouped = clone_pair(kw)
    x = torch.randn(3, 37, kw["hidden_size"])
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = []
    for layer, xi in zip((ref, grouped), xs):
        out = layer(xi)
        ((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + layer.aux_loss).backward()
        outs.append(out)
    assert rel_err(outs[1], outs[0]) < 1e-5
    assert rel_err(xs[1].grad, xs[0].grad) < 1e-5
    for (name, p_ref), (_, p_g) in zip(ref.named_parameters(), grouped.named_parameters()):
        assert rel_err(p_g.grad, p_ref.grad) < 1e-5, name


def test_grouped_mm_ignores_dropped_rows_and_empty_experts():
    torch.manual_seed(2)
    tokens, hidden, ffn, experts = 20, 16, 8, 6
    x = torch.randn(tokens, hidden, requires_grad=True)
    idx = torch.randint(0, 3, (tokens, 2))  # experts 3..5 stay empty
    idx[::3, 1] = -1  # dropped assignments
    weight = torch.rand(tokens, 2).masked_fill(idx < 0, 0).requires_grad_()
    w_up = torch.randn(experts, 2 * ffn, hidden, requires_grad=True)
    w_down = torch.randn(experts, hidden, ffn, requires_grad=True)
    grads = []
    for backend in ("reference", "grouped_mm"):
        out = moe_ops.routed_experts(x, idx, weight, w_up, w_down, "swiglu", backend)
        g = torch.autograd.grad(out.square().sum(), (x, weight, w_up, w_down))
        grads.append((out,) + g)
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        assert rel_err(b, a) < 1e-5
    assert grads[1][3][3:].abs().max() == 0  # empty experts get zero weight gradient


def test_auto_backend_choices():
    x = torch.randn(4, 8)
    w_up, w_down = torch.randn(2, 16, 8), torch.randn(2, 8, 8)
    # torch._grouped_mm runs on the CPU from torch 2.13 on.
    cpu_grouped = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)
    expected = "grouped_mm" if cpu_grouped else "reference"
    assert moe_ops.resolve_backend("auto", x, w_up, w_down) == expected
    assert moe_ops.resolve_backend("auto", x.double(), w_up.double(), w_down.double()) == "reference"
    with pytest.warns(UserWarning, match="grouped_mm backend unavailable"):
        assert moe_ops.resolve_backend("grouped_mm", x.double(), w_up.double(), w_down.double()) == "reference"
    with pytest.raises(RuntimeError, match="backend='triton' needs a CUDA tensor"):
        moe_ops.resolve_backend("triton", x, w_up, w_down)
