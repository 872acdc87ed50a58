"""The routed-expert entry points refuse what they would otherwise compute wrongly, on every backend
that runs on the CPU (reference, grouped_mm, the low-precision reference): indices out of range,
up-projections that do not match the ffn width, mismatched dtypes and shapes."""

import pytest
import torch

from moekit.ops import moe as moe_ops
from moekit.ops.activations import apply_activation
from moekit.ops.moe import grouped_mm, reference

BACKENDS = ("reference", "grouped_mm")


def _operands(T=6, H=16, F=8, E=4, K=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    w_up = torch.randn(E, 2 * F, H, generator=gen) / H**0.5
    w_down = torch.randn(E, H, F, generator=gen) / F**0.5
    idx = torch.rand(T, E, generator=gen).argsort(-1)[:, :K]
    return x, idx, torch.rand(T, K, generator=gen), w_up, w_down


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [4, 7, -2])
def test_indices_out_of_range_are_refused(backend, bad):
    """An index >= E or < -1 used to count as dropped (the same output as -1): silently wrong."""
    x, idx, weight, w_up, w_down = _operands()
    idx[3, 1] = bad
    dropped = idx.clone()
    dropped[3, 1] = -1
    assert not torch.equal(moe_ops.routed_experts(x, dropped, weight, w_up, w_down, backend=backend),
                           moe_ops.routed_experts(x, idx.clamp(0, 3), weight, w_up, w_down, backend=backend))
    for fn in (lambda: moe_ops.routed_experts(x, idx, weight, w_up, w_down, backend=backend),
               lambda: {"reference": reference, "grouped_mm": grouped_mm}[backend].routed_experts(
                   x, idx, weight, w_up, w_down)):
        with pytest.raises(RuntimeError, match=r"topk_idx entries must lie in \[-1, 4\)"):
            fn()


@pytest.mark.parametrize("backend", BACKENDS)
def test_up_width_must_match_the_ffn_width(backend):
    """w_up with 3 rows and w_down with ffn 2 under SwiGLU used to split into a [2] gate and a [1] up
    half that broadcast, giving an output where the shapes do not define one."""
    x, idx, weight, _, _ = _operands()
    w_up, w_down = torch.randn(4, 3, 16), torch.randn(4, 16, 2)
    with pytest.raises(ValueError, match="w_up has 3 rows but 'swiglu' with ffn size 2 needs 4"):
        moe_ops.routed_experts(x, idx, weight, w_up, w_down, backend=backend)
    with pytest.raises(ValueError, match="w_up has 3 rows but 'gelu' with ffn size 2 needs 2"):
        moe_ops.routed_experts(x, idx, weight, w_up, w_down, "gelu", backend=backend)


def test_gated_activation_refuses_an_odd_width():
    with pytest.raises(ValueError, match="swiglu: .* needs an even width, got 5"):
        apply_activation(torch.randn(3, 5), "swiglu")
    h = torch.randn(3, 6)
    torch.testing.assert_close(apply_activation(h, "geglu"), torch.nn.functional.gelu(h[:, :3]) * h[:, 3:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_and_dtypes_are_named(backend):
    x, idx, weight, w_up, w_down = _operands()
    call = lambda *a: moe_ops.routed_experts(*a, backend=backend)  # noqa: E731
    with pytest.raises(ValueError, match=r"topk_idx \(6,\) and topk_weight \(6,\) must both be \[tokens=6, k\]"):
        call(x, idx[:, 0], weight[:, 0], w_up, w_down)
    with pytest.raises(TypeError, match="topk_idx must be int64 or int32, got torch.float32"):
        call(x, idx.float(), weight, w_up, w_down)
    with pytest.raises(ValueError, match="expert weights expect hidden 16 / 12, x has 16"):
        call(x, idx, weight, w_up, w_down[:, :12])
    with pytest.raises(TypeError, match="x, w_up, w_down must share a dtype"):
        call(x, idx, weight, w_up.double(), w_down.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_with_bf16_input_and_float32_weights(backend):
    """Under autocast the reference's matmuls cast their operands; grouped_mm (no autocast rule of its
    own) used to fail on the mixed dtypes, and now hands such a call to the reference."""
    x, idx, weight, w_up, w_down = _operands(seed=3)
    x = x.bfloat16()
    want = reference.routed_experts(x.float(), idx, weight, w_up.bfloat16().float(), w_down.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe_ops.routed_experts(x, idx, weight, w_up, w_down, backend=backend)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2


def _curvature(experts, w_up, x):
    """Second derivative along w_up of sum(out**2) + sum(w_up**3): the cube keeps the first gradient in
    the graph, so an op whose backward is not differentiable gave a result without its own part."""
    (g,) = torch.autograd.grad(experts(x, w_up).pow(2).sum() + (w_up**3).sum(), w_up, create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), w_up)[0]


@pytest.mark.parametrize("precision", ["fp8", "mxfp8"])
def test_low_precision_reference_refuses_double_backward(precision):
    x, idx, weight, w_up, w_down = _operands(T=5, H=128, F=128, seed=5)
    w_up.requires_grad_(True)
    want = _curvature(lambda x, w: reference.routed_experts(x, idx, weight, w, w_down), w_up, x)
    alone = _curvature(lambda x, w: x.sum() * 0, w_up, x)
    assert (want - alone).norm() > 1e-3 * want.norm()  # the experts' curvature matters here
    with pytest.raises(RuntimeError, match=r"routed_experts \(fp8 reference\) has no second derivative"):
        _curvature(lambda x, w: moe_ops.routed_experts(x, idx, weight, w, w_down, precision=precision), w_up, x)
