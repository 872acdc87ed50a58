"""The one-program top-k router against ``Router.logits``' math, ``score``, ``select_experts`` and
``gate_weights`` (the reference); on the CPU the interpreter runs the kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.moe import MoEConfig
from moekit.moe.router import Router, gate_weights, score, select_experts
from moekit.ops.moe import router_kernel

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, w, b, expert_bias, score_func, top_k, norm, scale):
    logits = F.linear(x.float(), w.float(), None if b is None else b.float())
    scores = score(logits, score_func)
    idx = select_experts(scores, top_k, expert_bias)
    return logits, scores, idx, gate_weights(scores, idx, norm, scale)


def inputs(T, E, H, seed, dtype=torch.float32, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(DEVICE, dtype)
    w = torch.randn(E, H, generator=gen).mul_(3 / H**0.5).to(DEVICE, dtype)
    b = torch.randn(E, generator=gen).to(DEVICE, dtype) if bias else None
    return x, w, b, torch.randn(E, generator=gen).mul_(0.05).to(DEVICE)


def assert_matches_reference(x, w, b, expert_bias, score_func, top_k, norm=True, scale=1.0):
    got = router_kernel.route_topk(x, w, b, expert_bias, score_func, top_k, norm, scale)
    want = reference(x, w, b, expert_bias, score_func, top_k, norm, scale)
    assert [t.dtype for t in got] == [torch.float32, torch.float32, torch.int64, torch.float32]
    assert got[2].shape == want[2].shape
    assert torch.equal(got[2], want[2]), "different experts chosen"
    # Float32 sums in another order: logits a few ulps of their largest terms apart. The tensor cores
    # sum in float32 leaning toward zero: from 1024 terms on the error grows with H
    # (benchmarks/router_accuracy.py: 1.3e-5 at H = 1024, 5.4e-5 at 4096 on an H200).
    tol = 1e-5 * max(1, x.shape[1] / 1024)
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol, msg=lambda m: f"logits: {m}")
    torch.testing.assert_close(got[1], want[1], rtol=tol, atol=tol / 10, msg=lambda m: f"scores: {m}")
    torch.testing.assert_close(got[3], want[3], rtol=tol, atol=tol / 10, msg=lambda m: f"weights: {m}")


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T,E,H,K", [(1, 8, 32, 2), (16, 64, 1024, 8), (5, 256, 64, 8), (40, 16, 72, 4),
                                     (7, 60, 100, 1), (4, 128, 32, 128)])
def test_logits_in_the_kernel(T, E, H, K, score_func):
    x, w, b, expert_bias = inputs(T, E, H, seed=T * E + K, bias=True)
    assert router_kernel.fits(x, w, b, K) and w.numel() <= router_kernel.LOGITS_MAX_WEIGHTS
    assert T <= router_kernel.LOGITS_MAX_TOKENS and E <= router_kernel.LOGITS_MAX_EXPERTS
    assert_matches_reference(x, w, b, expert_bias, score_func, K)
    assert_matches_reference(x, w, None, torch.zeros_like(expert_bias), score_func, K, norm=False, scale=2.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,H,K", [(router_kernel.LOGITS_MAX_TOKENS + 1, 64, 32, 8), (2, 512, 512, 4),
                                     (3, 1000, 16, 6)])
def test_logits_from_a_gemm(T, E, H, K, dtype):
    """More tokens, or a larger router, than the kernel forms logits for: one GEMM first."""
    x, w, b, expert_bias = inputs(T, E, H, seed=E + H, dtype=dtype, bias=True)
    assert (T > router_kernel.LOGITS_MAX_TOKENS or E > router_kernel.LOGITS_MAX_EXPERTS
            or w.numel() > router_kernel.LOGITS_MAX_WEIGHTS)
    assert_matches_reference(x, w, b, expert_bias, "softmax", K)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_16_bit_input_in_the_kernel(x_dtype, w_dtype, gpu_like_bf16):
    """16-bit products are exact in float32: the tensor-core path computes the reference's logits
    (mixed types take float32 FMAs)."""
    x, w, b, expert_bias = inputs(16, 64, 256, seed=3, dtype=x_dtype, bias=True)
    assert_matches_reference(x, w.to(w_dtype), b, expert_bias, "sigmoid", 6)


@pytest.mark.parametrize("T", [3, 80])  # logits in the kernel, and from a GEMM
def test_strided_input_and_bias(T):
    x, w, _, expert_bias = inputs(T, 32, 64, seed=5)
    wide = torch.randn(T, 128, device=DEVICE)
    b = torch.randn(64, device=DEVICE)[::2]
    assert not wide[:, ::2].is_contiguous() and not b.is_contiguous()
    assert_matches_reference(wide[:, ::2], w, b, expert_bias, "softmax", 4)


def test_no_tokens():
    x, w, _, expert_bias = inputs(0, 16, 32, seed=6)
    logits, scores, idx, weight = router_kernel.route_topk(x, w, None, expert_bias, "softmax", 2, True, 1.0)
    assert logits.shape == scores.shape == (0, 16) and idx.shape == weight.shape == (0, 2)


def test_experts_switched_off_by_a_minus_inf_bias_are_picked_once():
    """A live expert's choice may be -inf: each is still chosen at most once per token."""
    x, w, _, _ = inputs(4, 8, 16, seed=7)
    expert_bias = torch.full((8,), float("-inf"), device=DEVICE)
    expert_bias[5] = 0.0
    for score_func in ("softmax", "sigmoid"):
        _, scores, idx, weight = router_kernel.route_topk(x, w, None, expert_bias, score_func, 3, False, 1.0)
        assert (idx[:, 0] == 5).all()
        assert all(len(set(row)) == 3 for row in idx.tolist()), idx
        torch.testing.assert_close(weight, scores.gather(1, idx))


def test_bias_changes_the_choice_not_the_weights():
    """Aux-loss-free balancing: a large bias on the last experts makes them the choice, while their
    weights stay their scores."""
    x, w, _, _ = inputs(6, 32, 16, seed=1)
    expert_bias = torch.zeros(32, device=DEVICE)
    expert_bias[-4:] = 10.0
    _, scores, idx, weight = router_kernel.route_topk(x, w, None, expert_bias, "sigmoid", 4, False, 1.0)
    assert torch.equal(idx.sort(-1).values, torch.arange(28, 32, device=DEVICE).expand(6, 4))
    torch.testing.assert_close(weight, scores.gather(1, idx))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over NaN
def test_nan_input_reaches_the_weights_and_keeps_indices_in_range():
    x, w, _, expert_bias = inputs(3, 16, 8, seed=2)
    x[1, 5] = float("nan")
    _, _, idx, weight = router_kernel.route_topk(x, w, None, expert_bias, "softmax", 2, True, 1.0)
    assert weight[1].isnan().all() and not weight[[0, 2]].isnan().any()
    assert ((idx >= 0) & (idx < 16)).all()


def test_one_nan_expert_makes_the_renormalised_weights_nan():
    """Sigmoid scores with one NaN expert: the NaN is chosen first and its sum poisons the
    renormalisation, as in the reference (a max-with-epsilon that drops NaN would give ~1e19)."""
    x, w, _, expert_bias = inputs(3, 16, 8, seed=8)
    w[3, 0] = float("nan")
    _, _, idx, weight = router_kernel.route_topk(x, w, None, expert_bias, "sigmoid", 4, True, 1.0)
    _, want = reference(x, w, None, expert_bias, "sigmoid", 4, True, 1.0)[2:]
    assert (idx[:, 0] == 3).all() and weight.isnan().all() and want.isnan().all()


def test_refuses_what_it_does_not_compute():
    x, w, b, expert_bias = inputs(2, 8, 16, seed=4, bias=True)
    assert router_kernel.fits(x, w, b, 2)
    assert not router_kernel.fits(x.double(), w, b, 2)
    assert not router_kernel.fits(x, w, b, 9)
    assert not router_kernel.fits(x[:, :8], w, b, 2)
    assert not router_kernel.fits(x, torch.randn(2048, 16, device=DEVICE), None, 2)
    assert not router_kernel.fits(x, w.clone().requires_grad_(), b, 2)
    assert not router_kernel.fits(x, w, b.clone().requires_grad_(), 2)  # e.g. tuning the bias alone
    with torch.no_grad():
        assert router_kernel.fits(x, w.clone().requires_grad_(), b.clone().requires_grad_(), 2)
    with pytest.raises(ValueError, match="score_func"):
        router_kernel.route_topk(x, w, None, expert_bias, "relu", 2, True, 1.0)
    with pytest.raises(ValueError, match="16/32-bit float"):
        router_kernel.route_topk(x.double(), w, None, expert_bias, "softmax", 2, True, 1.0)


@pytest.mark.parametrize("which", ["bias", "expert_bias"])
def test_biases_of_another_length_are_refused(which):
    """A bias shorter than the expert count used to be read past its end: logits from whatever lay
    there (a router bias of 3 for 8 experts moved them by up to 1.6 in the interpreter)."""
    x, w, b, expert_bias = inputs(5, 8, 32, seed=6, bias=True)
    args = {"bias": b, "expert_bias": expert_bias}
    args[which] = args[which][:3].clone()
    with torch.no_grad(), pytest.raises(ValueError, match=rf"route_topk: {which} must be \[8\] .* got \(3,\)"):
        router_kernel.route_topk(x, w, args["bias"], args["expert_bias"], "softmax", 2, True, 1.0)


def small_router(**changes) -> Router:
    config = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=8, top_k=2, router_bias=True, **changes)
    return Router(config).bfloat16()


def test_router_takes_the_kernel_without_autograd():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert small_router()._one_kernel(x)
        assert small_router(router_jitter=0.01).eval()._one_kernel(x)  # jitter only acts in training


@pytest.mark.parametrize("change", ["expert_choice", "groups", "jitter", "float64", "bias_grad", "autograd"])
def test_router_keeps_the_reference_path_where_the_kernel_does_not_apply(change):
    router = small_router(**{"expert_choice": dict(router_type="expert_choice", capacity_factor=1.0),
                             "groups": dict(num_groups=2, topk_groups=1),
                             "jitter": dict(router_jitter=0.01)}.get(change, {}))
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    if change == "float64":
        router, x = router.double(), x.double()
    if change == "bias_grad":
        router.weight.requires_grad_(False)  # tuning the bias alone: it still needs its gradient
    with torch.set_grad_enabled(change in ("bias_grad", "autograd")):
        assert not router.train(change == "jitter")._one_kernel(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("T,E,H,K", [(16, 64, 1024, 8), (40, 16, 4096, 2), (5, 256, 512, 8), (80, 64, 256, 6)])
def test_kernel_in_every_dtype_on_gpu(x_dtype, w_dtype, T, E, H, K):
    """Each logits path compiled for the GPU (tensor cores, IEEE float32 FMAs, the GEMM first), and
    the edge cases the interpreter cannot show: tl.maximum drops NaN on the GPU."""
    x, w, b, expert_bias = inputs(T, E, H, seed=T + E + H, dtype=x_dtype, bias=True)
    for score_func in ("softmax", "sigmoid"):
        assert_matches_reference(x, w.to(w_dtype), b, expert_bias, score_func, K)
    test_experts_switched_off_by_a_minus_inf_bias_are_picked_once()
    test_one_nan_expert_makes_the_renormalised_weights_nan()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("score_func,bias,tokens", [("softmax", False, 16), ("sigmoid", True, 16),
                                                    ("softmax", True, 300)])
def test_router_takes_the_kernel_without_autograd_on_gpu(score_func, bias, tokens):
    """A GPU forward without autograd goes through the kernel and routes as the reference path
    (the same forward with autograd) does."""
    cfg = MoEConfig(hidden_size=256, ffn_hidden_size=64, num_experts=64, top_k=6, score_func=score_func,
                    norm_topk_prob=True, route_scale=1.5, router_bias=bias)
    router = Router(cfg).cuda().bfloat16()
    if bias:
        router.expert_bias.normal_(0, 0.01)
        router.bias.data.normal_(0, 0.1)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert router._one_kernel(x)
        fast = router(x)
    assert not router._one_kernel(x)
    ref = router(x)
    assert torch.equal(fast.topk_idx, ref.topk_idx)
    torch.testing.assert_close(fast.logits, ref.logits.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.scores, ref.scores.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.topk_weight, ref.topk_weight.detach(), rtol=1e-5, atol=1e-6)
