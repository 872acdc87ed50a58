"""precision="fp8" / "mxfp8" in the MoE layer: the block-scaled recipe, within its documented bound."""

import pytest
import torch
from helpers import rel_err

from moekit import MoE, MoEConfig
from moekit.moe import dispatch
from moekit.ops.moe import fp8_reference
from moekit.ops.moe.weight_cache import WeightCache


@pytest.mark.parametrize("precision,bound", [("fp8", 0.10), ("mxfp8", 0.12)])
def test_layer_runs_the_low_precision_recipe(precision, bound):
    torch.manual_seed(0)
    kw = dict(hidden_size=128, ffn_hidden_size=128, num_experts=4, top_k=2, num_shared_experts=1,
              backend="reference")
    exact = MoE(MoEConfig(**kw))
    low = MoE(MoEConfig(precision=precision, **kw))
    low.load_state_dict(exact.state_dict())
    x = torch.randn(2, 24, 128)
    xe, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(x)
    out_e, out_l = exact(xe), low(xl)
    out_e.backward(grad)
    out_l.backward(grad)
    # The layer's routed part is exactly the recipe (same routing, same quantization points) ...
    routing = low.router(x.view(-1, 128))
    recipe = fp8_reference.routed_experts(x.view(-1, 128), routing.topk_idx, routing.topk_weight,
                                          low.experts.w_up, low.experts.w_down, "swiglu", precision)
    assert torch.equal(out_l.view(-1, 128), recipe + low.shared(x.view(-1, 128)))
    # ... and stays within the documented error bound of the exact layer, forward and backward.
    assert 1e-4 < rel_err(out_l, out_e) < bound
    assert rel_err(xl.grad, xe.grad) < bound
    assert rel_err(low.experts.w_up.grad, exact.experts.w_up.grad) < bound
    assert rel_err(low.experts.w_down.grad, exact.experts.w_down.grad) < bound


def test_grouped_mm_backend_refuses_low_precision():
    layer = MoE(MoEConfig(hidden_size=128, ffn_hidden_size=128, num_experts=4, top_k=2, precision="fp8",
                          backend="grouped_mm"))
    with pytest.raises(ValueError, match="precision 'fp8' runs on the 'triton' \\(GPU\\) or 'reference' backends"):
        layer(torch.randn(8, 128))


def test_cache_fp8_weights_reaches_the_experts_op(monkeypatch):
    kw = dict(hidden_size=128, ffn_hidden_size=128, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="cache_fp8_weights .* needs precision 'fp8' or 'mxfp8'"):
        MoEConfig(cache_fp8_weights=True, **kw)
    assert MoE(MoEConfig(precision="fp8", **kw)).experts.fp8_weights is None
    layer = MoE(MoEConfig(precision="fp8", cache_fp8_weights=True, **kw))
    assert isinstance(layer.experts.fp8_weights, WeightCache)
    seen = []
    real = dispatch.moe_ops.routed_experts

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(dispatch.moe_ops, "routed_experts", spy)
    layer(torch.randn(1, 8, 128))
    assert seen == [layer.experts.fp8_weights]


def test_a_cast_or_move_empties_the_fp8_weight_cache():
    """.half().float() can hand the weights their old address back with the old version counter: an
    entry kept across it would serve the quantized form of other (unrounded) values."""
    layer = MoE(MoEConfig(hidden_size=128, ffn_hidden_size=128, num_experts=2, top_k=1, precision="fp8",
                          cache_fp8_weights=True))
    cache = layer.experts.fp8_weights
    made = []
    cache.get("up", layer.experts.w_up, (), lambda: made.append(1) or ("first",))
    assert cache.get("up", layer.experts.w_up, (), lambda: made.append(1) or ("again",)) == ("first",)
    layer.half().float()
    assert cache.get("up", layer.experts.w_up, (), lambda: made.append(1) or ("after cast",)) == ("after cast",)
    assert made == [1, 1]
