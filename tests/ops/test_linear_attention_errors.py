"""Bad input to the linear-attention ops is a clear error naming the argument at fault."""

import pytest
import torch
import torch.nn.functional as F

from moekit.ops import linear_attention as la
from moekit.ops.linear_attention import _checks

B, T, H, K, V = 2, 10, 2, 4, 3


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    return torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)


def gate():
    return torch.nn.functional.logsigmoid(torch.randn(B, T, H))


def test_shape_and_dtype_errors(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"`k` must have shape"):
        la.linear_attn(q, k[..., :3], v)
    with pytest.raises(ValueError, match=r"`v` must have shape \[B, T, H, V\]"):
        la.linear_attn(q, k, v[:, :5])
    with pytest.raises(ValueError, match=r"`q` must be a floating-point tensor"):
        la.linear_attn(q.long(), k, v)
    with pytest.raises(ValueError, match=r"`q` must have 4 dims"):
        la.linear_attn(q[0], k, v)
    with pytest.raises(ValueError, match=r"share one dtype"):
        la.linear_attn(q, k.double(), v)
    with pytest.raises(ValueError, match=r"`g` must have shape \[B, T, H\]"):
        la.simple_gla(q, k, v, gate()[..., None])
    with pytest.raises(ValueError, match=r"`gk` must have shape \[B, T, H, K\]"):
        la.gla(q, k, v, gate())
    with pytest.raises(ValueError, match=r"`beta` must have shape"):
        la.gated_delta_rule(q, k, v, gate(), torch.rand(B, T))
    with pytest.raises(ValueError, match=r"`initial_state` must have shape \[B, H, K, V\]"):
        la.simple_gla(q, k, v, gate(), initial_state=torch.randn(B, H, V, K))


def test_option_errors(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"`mode` must be one of"):
        la.linear_attn(q, k, v, mode="parallel")
    with pytest.raises(ValueError, match=r"`backend` must be one of"):
        la.linear_attn(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: .*float64"):
        la.linear_attn(q.double(), k.double(), v.double(), backend="triton")
    with pytest.raises(ValueError, match=r"`chunk_size` must be a positive int"):
        la.linear_attn(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match=r"`scale` must be a number"):
        la.linear_attn(q, k, v, scale="0.5")


def test_non_finite_inputs_are_named(qkv):
    q, k, v = qkv
    v = v.clone()
    v[1, 3, 0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values .* in `v`"):
        la.delta_rule(q, k, v, torch.rand(B, T, H))
    g = gate()
    g[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values .* in `g`"):
        la.simple_gla(q, k, qkv[2], g)


def test_huge_finite_inputs_pass_the_finite_check(qkv):
    """Values whose float32 sum would overflow are still finite: the check takes each result's
    min and max, not a sum."""
    q, k, v = (t.double() for t in qkv)
    v[0, :4] = 3e38  # four of them sum past float32's largest value
    o, _ = la.linear_attn(q, k, v, scale=1e-30)
    assert torch.isfinite(o).all()


@pytest.fixture
def deferred(monkeypatch):
    """The GPU's deferred check, on the CPU."""
    monkeypatch.setattr(_checks, "DEFERRED_ON", ("cuda", "cpu"))


def test_the_check_waits_for_the_backward_when_one_follows(qkv, deferred):
    """With a backward to come, the forward returns without reading the check (its output holds
    the NaN) and the backward raises the named error instead of returning gradients."""
    q, k, v = (t.clone().requires_grad_() for t in qkv)
    with torch.no_grad():
        v[1, 3, 0, 2] = float("nan")
    o, _ = la.linear_attn(q, k, v)
    assert o[1, 3:].isnan().any() and o[0].isfinite().all()
    with pytest.raises(ValueError, match=r"linear_attn: non-finite values .* in `v`"):
        torch.autograd.grad(o.sum(), [q, k, v])
    with pytest.raises(ValueError, match=r"linear_attn: non-finite values .* in `v`"):  # no backward to wait for
        la.linear_attn(q.detach(), k.detach(), v.detach())


def test_the_deferred_check_runs_for_any_requested_gradient(qkv, deferred):
    """Gradients asked only of the initial state, or of Mamba2's A (an option, not a per-token
    input), still pass through the check: a NaN elsewhere is an error, not NaN gradients."""
    q, k, v = (t.clone() for t in qkv)
    v[0, 2, 1, 0] = float("nan")
    h0 = torch.zeros(B, H, K, V, requires_grad=True)
    o, _ = la.linear_attn(q, k, v, initial_state=h0)
    with pytest.raises(ValueError, match=r"non-finite values .* in `v`"):
        torch.autograd.grad(o.sum(), [h0])
    x, dt, A = torch.randn(B, T, 4, 3), torch.rand(B, T, 4), (-torch.rand(4)).requires_grad_()
    x[1, 5, 2, 1] = float("inf")
    y, _ = la.mamba2_ssd(x, dt, A, torch.randn(B, T, 2, 5), torch.randn(B, T, 2, 5))
    with pytest.raises(ValueError, match=r"mamba2_ssd: non-finite values .* in `x`"):
        torch.autograd.grad(y.sum(), [A])


def test_a_deferred_overflow_is_named_as_one(qkv, deferred):
    q, k, v = (t.float() * 1e15 for t in qkv)
    o, _ = la.linear_attn(q.requires_grad_(), k, v, scale=1.0)
    with pytest.raises(ValueError, match=r"linear_attn: the result is not finite .* overflowed torch.float32"):
        o.sum().backward()


def test_a_passed_deferred_check_changes_no_gradient(qkv, deferred):
    """Finite inputs: the same outputs and gradients as without the check, and none for an input
    that did not ask for one."""
    g = gate()
    leaves = [t.clone().requires_grad_() for t in qkv[:2]]
    o, s = la.simple_gla(*leaves, qkv[2], g, output_final_state=True)
    grads = torch.autograd.grad(o.square().sum() + s.sum(), leaves)
    with la.finite_checks_skipped():
        o0, s0 = la.simple_gla(*leaves, qkv[2], g, output_final_state=True)
        grads0 = torch.autograd.grad(o0.square().sum() + s0.sum(), leaves)
    assert torch.equal(o, o0) and torch.equal(s, s0)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads0))
    assert not qkv[2].requires_grad and qkv[2].grad is None


def test_cu_seqlens_errors(qkv):
    q, k, v = (t[:1] for t in qkv)
    with pytest.raises(ValueError, match=r"batch size 1, got B=2"):
        la.linear_attn(*qkv, cu_seqlens=torch.tensor([0, 4, T]))
    with pytest.raises(ValueError, match=r"`cu_seqlens` must start at 0 and end at T=10"):
        la.linear_attn(q, k, v, cu_seqlens=torch.tensor([1, 4, T]))
    with pytest.raises(ValueError, match=r"`cu_seqlens` must start at 0 and end at T=10"):
        la.linear_attn(q, k, v, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match=r"`cu_seqlens` must be strictly increasing"):
        la.linear_attn(q, k, v, cu_seqlens=torch.tensor([0, 6, 4, T]))
    with pytest.raises(ValueError, match=r"`cu_seqlens` must be a 1-D integer tensor"):
        la.linear_attn(q, k, v, cu_seqlens=torch.tensor([0.0, 4.0, 10.0]))
    with pytest.raises(ValueError, match=r"`initial_state` must have shape \[N, H, K, V\] = \(2, 2, 4, 3\)"):
        la.linear_attn(q, k, v, cu_seqlens=torch.tensor([0, 4, T]), initial_state=torch.randn(1, H, K, V))


def test_mamba2_errors():
    torch.manual_seed(1)
    x, dt, A = torch.randn(B, T, 4, 3), torch.rand(B, T, 4), -torch.rand(4)
    Bm, Cm = torch.randn(B, T, 2, 5), torch.randn(B, T, 2, 5)
    with pytest.raises(ValueError, match=r"`B` must be \[B, T, G, N\] .* G dividing H=4"):
        la.mamba2_ssd(x, dt, A, torch.randn(B, T, 3, 5), torch.randn(B, T, 3, 5))
    with pytest.raises(ValueError, match=r"`C` must have shape"):
        la.mamba2_ssd(x, dt, A, Bm, Cm[..., :4])
    with pytest.raises(ValueError, match=r"`A` must have shape \[H\]"):
        la.mamba2_ssd(x, dt, A[:2], Bm, Cm)
    with pytest.raises(ValueError, match=r"`D` must have shape \[H\]"):
        la.mamba2_ssd(x, dt, A, Bm, Cm, D=torch.randn(3))
    with pytest.raises(ValueError, match=r"`dt` must have shape"):
        la.mamba2_ssd(x, dt[..., None], A, Bm, Cm)
    with pytest.raises(ValueError, match=r"`initial_state` must have shape \[B, H, K, V\] = \(2, 4, 5, 3\)"):
        la.mamba2_ssd(x, dt, A, Bm, Cm, initial_state=torch.randn(B, 4, 3, 5))


def test_decay_helper_errors():
    with pytest.raises(ValueError, match=r"layer_idx < num_layers"):
        la.lightning_decay(8, 4, 4)
    with pytest.raises(ValueError, match=r"num_heads >= 1"):
        la.retention_decay(0)


def test_a_result_that_overflows_from_finite_inputs_is_an_error(qkv):
    """The check reads the results: finite inputs whose result overflows are refused too, with
    a message saying so rather than blaming an input."""
    q, k, v = (t.float() * 1e15 for t in qkv)  # the state stays in range: k^T v ~ 1e30
    with pytest.raises(ValueError, match=r"linear_attn: the result is not finite .* overflowed torch.float32"):
        la.linear_attn(q, k, v, scale=1.0)
    o, _ = la.linear_attn(q, k, v, scale=1e-30)  # the same inputs, scaled into range
    assert torch.isfinite(o).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", ["linear_attn", "gated_delta_rule"])
def test_the_gpu_check_waits_for_the_backward(op):
    """On the GPU with gradients to come, the Triton op's forward raises nothing and its backward
    raises the named error; without them the forward raises."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 100, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k = torch.nn.functional.normalize(k.float(), dim=-1).bfloat16()
    v[0, 70, 1, 5] = float("inf")
    extra = [] if op == "linear_attn" else [torch.nn.functional.logsigmoid(torch.randn(1, 100, 2, device="cuda") + 2),
                                             torch.rand(1, 100, 2, device="cuda")]
    call = getattr(la, op)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o, _ = call(*leaves, *extra, backend="triton")
    # from the chunk holding the inf on (masked products within a chunk meet 0 * inf)
    assert not o[0, 70:].isfinite().all() and o[0, :64].isfinite().all()
    with pytest.raises(ValueError, match=rf"{op}: non-finite values .* in `v`"):
        torch.autograd.grad(o.float().sum(), leaves)
    with pytest.raises(ValueError, match=rf"{op}: non-finite values .* in `v`"):
        call(*(t.detach() for t in leaves), *extra, backend="triton")


def test_inputs_on_different_devices_are_named(qkv):
    """A tensor on another device than q is refused by name before anything runs (the Triton kernels
    launch on q's device and would read another device's pointer as their own)."""
    q, k, v = (t[:1] for t in qkv)
    g = gate()[:1]
    with pytest.raises(ValueError, match=r"simple_gla: every tensor must be on q's device cpu, got `g` on meta"):
        la.simple_gla(q, k, v, g.to("meta"))
    with pytest.raises(ValueError, match=r"`initial_state` on meta"):
        la.linear_attn(q, k, v, initial_state=torch.zeros(1, H, K, V, device="meta"))
    x, dt, A = torch.randn(1, T, 4, 3), torch.rand(1, T, 4), -torch.rand(4)
    Bm, Cm = torch.randn(1, T, 2, 5), torch.randn(1, T, 2, 5)
    with pytest.raises(ValueError, match=r"mamba2_ssd: every tensor must be on x's device cpu, got `D` on meta"):
        la.mamba2_ssd(x, dt, A, Bm, Cm, torch.ones(4, device="meta"))


@pytest.mark.parametrize("dim", [0, 2, 3])
def test_empty_dimensions_are_named(qkv, dim):
    """An empty batch, head or head dim is a clear error, not a crash deep in the op (K = 0 divided
    by zero in the default scale; the others failed in the finite check's aminmax)."""
    q, k, v = qkv
    if dim == 3:
        with pytest.raises(ValueError, match=r"linear_attn: `q` has an empty dimension"):
            la.linear_attn(q[..., :0], k[..., :0], v)
        with pytest.raises(ValueError, match=r"linear_attn: `v` has an empty dimension"):
            la.linear_attn(q, k, v[..., :0])
        return
    empty = [slice(None)] * dim + [slice(0, 0)]
    with pytest.raises(ValueError, match=r"linear_attn: `q` has an empty dimension"):
        la.linear_attn(q[tuple(empty)], k[tuple(empty)], v[tuple(empty)])


def test_mamba2_empty_dimensions_are_named():
    x, dt, A = torch.randn(1, T, 4, 3), torch.rand(1, T, 4), -torch.rand(4)
    Bm, Cm = torch.randn(1, T, 2, 5), torch.randn(1, T, 2, 5)
    with pytest.raises(ValueError, match=r"mamba2_ssd: `x` has an empty dimension"):
        la.mamba2_ssd(x[..., :0], dt, A, Bm, Cm)
    with pytest.raises(ValueError, match=r"mamba2_ssd: `B` has an empty dimension"):
        la.mamba2_ssd(x, dt, A, Bm[..., :0], Cm[..., :0])


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_scale_is_named(qkv, scale):
    """Not blamed on an overflow of finite inputs, as the result check would."""
    with pytest.raises(ValueError, match=r"`scale` must be finite"):
        la.linear_attn(*qkv, scale=scale)


def test_switches_must_be_bools(qkv):
    """A truthy string such as "False" (a YAML or CLI slip) would turn a switch on."""
    q, k, v = qkv
    beta = torch.rand(B, T, H)
    with pytest.raises(ValueError, match=r"`output_final_state` must be a bool, got 'no'"):
        la.linear_attn(q, k, v, output_final_state="no")
    with pytest.raises(ValueError, match=r"`use_qk_l2norm_in_kernel` must be a bool, got 'False'"):
        la.delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel="False")
    x, dt, A = torch.randn(1, T, 4, 3), torch.randn(1, T, 4), -torch.rand(4)
    Bm, Cm = torch.randn(1, T, 2, 5), torch.randn(1, T, 2, 5)
    with pytest.raises(ValueError, match=r"`dt_softplus` must be a bool, got 'False'"):
        la.mamba2_ssd(x, dt, A, Bm, Cm, dt_softplus="False")
    # the real switches still work
    o, s = la.delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True, output_final_state=True)
    o0, _ = la.delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta)
    assert s.shape == (B, H, K, V) and ((o - o0).norm() / o0.norm()) < 1e-3


def test_a_float64_state_or_gate_keeps_the_triton_kernels_out(qkv):
    """The kernels keep float32 states: with a float64 initial state or gate, "auto" takes the
    reference (a float64 final state) and an explicit "triton" says why it cannot."""
    q, k, v = qkv
    state = torch.randn(B, H, K, V, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: .*float64 initial_state"):
        la.linear_attn(q, k, v, initial_state=state, output_final_state=True, backend="triton")
    with pytest.raises(ValueError, match=r"float64 g"):
        la.simple_gla(q, k, v, gate().double(), backend="triton")
    _, final = la.linear_attn(q, k, v, initial_state=state, output_final_state=True)
    assert final.dtype == torch.float64
