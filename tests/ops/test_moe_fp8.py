"""FP8 / MXFP8 routed experts: Triton kernels (interpreter on CPU) vs the plain-PyTorch recipe,
the recipe vs the float64 definition within the documented bound, where its quantization
blocks lie, and input errors."""

import pytest
import torch

from moekit.ops.moe import fp8, fp8_reference, reference, triton_meta
from moekit.ops.moe.fp8_recipe import recipe

# Documented in moekit/ops/moe/fp8.py: ||out - ref|| / ||ref|| for outputs and gradients.
BOUND = {"fp8": 0.10, "mxfp8": 0.12}


def _problem(tokens, hidden, ffn, experts, top_k, activation, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    up = 2 * ffn if activation != "gelu" else ffn
    x = torch.randn(tokens, hidden, generator=g)
    # Distinct experts per token, uneven loads (one expert empty), a few dropped slots.
    scores = torch.rand(tokens, experts, generator=g)
    scores[:, 0] += 0.5
    scores[:, -1] = -1.0
    w, idx = scores.topk(top_k, dim=-1)
    idx = torch.where(torch.rand(idx.shape, generator=g) < 0.1, -1, idx)
    w = w.softmax(-1)
    w_up = torch.randn(experts, up, hidden, generator=g) * hidden**-0.5
    w_down = torch.randn(experts, hidden, ffn, generator=g) * ffn**-0.5
    grad = torch.randn(tokens, hidden, generator=g)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, w, w_up, w_down)]
    return leaves, idx.to(device), grad.to(device=device, dtype=dtype)


def _run(fn, leaves, idx, grad, activation):
    x, w, w_up, w_down = leaves
    out = fn(x, idx, w, w_up, w_down, activation)
    return (out, *torch.autograd.grad(out, leaves, grad))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("recipe_name,activation,hidden", [("fp8", "swiglu", 256), ("mxfp8", "gelu", 128)])
def test_triton_matches_recipe_reference(monkeypatch, recipe_name, activation, hidden):
    """Same quantization points, same rounding: only the float32 summation order differs, which
    may flip a rare FP8 rounding of an intermediate (a, dh) by one step. 2e-3 is far below one
    quantization's error (3 %), so a wrong or misplaced scale or block fails."""
    monkeypatch.setattr(triton_meta, "poison_buffers", True)  # unwritten elements would show as NaN
    leaves, idx, grad = _problem(40, hidden, 128, 5, 2, activation, seed=1)
    got = _run(lambda *a: fp8.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad, activation)
    want = _run(lambda *a: fp8_reference.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad,
                activation)
    for name, g, w in zip(("out", "dx", "dweight", "dw_up", "dw_down"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert torch.isfinite(g).all(), name
        assert _rel(g, w) < 2e-3, (name, _rel(g, w))
    # Dropped slots get no routing-weight gradient; the empty last expert no weight gradient.
    assert torch.all(got[2][idx < 0] == 0)
    assert torch.all(got[3][-1] == 0) and torch.all(got[4][-1] == 0)


def test_inference_forward_matches_training_forward():
    leaves, idx, _ = _problem(24, 128, 128, 4, 2, "swiglu", seed=2)
    x, w, w_up, w_down = leaves
    train = fp8.routed_experts(x, idx, w, w_up, w_down)
    with torch.no_grad():
        infer = fp8.routed_experts(x, idx, w, w_up, w_down)
    assert torch.equal(train.detach(), infer)


@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_recipe_within_documented_bound_of_float64(recipe_name, activation):
    leaves, idx, grad = _problem(96, 256, 256, 6, 2, activation, seed=3)
    got = _run(lambda *a: fp8_reference.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad,
               activation)
    exact = _run(reference.routed_experts, [t.detach().double().requires_grad_() for t in leaves], idx,
                 grad.double(), activation)
    for name, g, w in zip(("out", "dx", "dweight", "dw_up", "dw_down"), got, exact, strict=True):
        err = _rel(g, w)
        # Above: FP8 rounding really happened (an fp32 path is ~1e-7); below: the documented bound.
        assert 3e-3 < err < BOUND[recipe_name], (name, err)


def test_bf16_inputs_within_bound():
    leaves, idx, grad = _problem(64, 128, 128, 4, 2, "swiglu", dtype=torch.bfloat16, seed=4)
    got = _run(lambda *a: fp8_reference.routed_experts(*a, recipe_name="fp8"), leaves, idx, grad, "swiglu")
    exact = _run(reference.routed_experts, [t.detach().double().requires_grad_() for t in leaves], idx,
                 grad.double(), "swiglu")
    for g, w in zip(got, exact, strict=True):
        assert g.dtype == torch.bfloat16 and _rel(g, w) < BOUND["fp8"]


@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8"])
def test_token_axis_blocks_start_at_each_expert(recipe_name):
    """Expert 0's rows are 2**20 times larger than expert 1's: a block shared across the
    boundary would flush expert 1's values to zero; per-expert blocks keep them to FP8 precision."""
    r = recipe(recipe_name)
    g = torch.Generator().manual_seed(5)
    counts = [r.block + 3, 2 * r.block - 5]
    v = torch.randn(sum(counts), 128, generator=g) + 3.0
    v[: counts[0]] *= 2.0**20
    got = fp8_reference.qdq_expert_cols(v, counts, r)
    rel = ((got - v).abs() / v.abs()).max().item()
    assert 1e-4 < rel <= 2.0**-3


def test_weight_tiles_are_shared_by_forward_and_dgrad_in_fp8_only():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(2, 256, 128, generator=g) * torch.exp2(torch.randint(-6, 6, (2, 256, 1), generator=g).float())
    fwd, bwd = (fp8_reference.qdq_weight(w, recipe("fp8"), axis) for axis in (2, 1))
    assert torch.equal(fwd, bwd.transpose(1, 2))  # one 128 x 128 tile, read both ways
    fwd, bwd = (fp8_reference.qdq_weight(w, recipe("mxfp8"), axis) for axis in (2, 1))
    assert not torch.equal(fwd, bwd.transpose(1, 2))  # MX blocks follow each GEMM's K axis
    assert _rel(fwd, w) < 0.05 and _rel(bwd.transpose(1, 2), w) < 0.05


def test_errors_name_the_problem():
    leaves, idx, _ = _problem(8, 128, 128, 4, 2, "swiglu")
    x, w, w_up, w_down = (t.detach() for t in leaves)
    with pytest.raises(ValueError, match="unknown low-precision recipe 'fp4'"):
        fp8.routed_experts(x, idx, w, w_up, w_down, recipe_name="fp4")
    with pytest.raises(ValueError, match="hidden size 96 is not a multiple of 128"):
        fp8.routed_experts(x[:, :96], idx, w, w_up[:, :, :96], w_down[:, :96], "swiglu")
    with pytest.raises(ValueError, match="ffn size 64 is not a multiple of 128"):
        fp8.routed_experts(x, idx, w, torch.cat([w_up[:, :64], w_up[:, 128:192]], 1), w_down[:, :, :64])
    with pytest.raises(TypeError, match="float64"):
        fp8.routed_experts(x.double(), idx, w, w_up.double(), w_down.double())
    with pytest.raises(TypeError, match="must share a dtype"):
        fp8.routed_experts(x.half(), idx, w, w_up, w_down)
    with pytest.raises(ValueError, match="unknown activation"):
        fp8.routed_experts(x, idx, w, w_up, w_down, "relu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8"])
def test_gpu_bf16_matches_recipe_reference(monkeypatch, recipe_name):
    monkeypatch.setattr(triton_meta, "poison_buffers", True)
    leaves, idx, grad = _problem(2048, 1024, 512, 16, 4, "swiglu", dtype=torch.bfloat16, seed=7, device="cuda")
    got = _run(lambda *a: fp8.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad, "swiglu")
    want = _run(lambda *a: fp8_reference.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad, "swiglu")
    for name, g, w in zip(("out", "dx", "dweight", "dw_up", "dw_down"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert _rel(g, w) < 1e-2, (name, _rel(g, w))  # bf16 storage of h / y / dx terms
