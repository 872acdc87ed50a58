"""Bad input to the linear-attention ops is a clear error naming the argument at fault."""

import pytest
import torch

from moekit.ops import linear_attention as la

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
    """Values whose float32 sum overflows are still finite: the check looks at the elements
    before it calls them NaN or inf."""
    q, k, v = (t.double() for t in qkv)
    v[0, :4] = 3e38  # four of them sum past float32's largest value
    o, _ = la.linear_attn(q, k, v, scale=1e-30)
    assert torch.isfinite(o).all()


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
