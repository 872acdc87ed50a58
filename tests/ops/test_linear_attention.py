"""The linear-attention ops: chunk form == recurrent form == a naive recurrence written here.

The naive recurrence below uses explicit K x K transition matrices,
    S_t = (I - beta_t k_t k_t^T) diag(a_t) S_{t-1} + beta_t k_t v_t^T    (delta rules)
    S_t = diag(a_t) S_{t-1} + k_t v_t^T                                 (the others)
with a_t the per-key decay exp(gate), so it shares no algebra with the package's forms.
"""

import zlib

import pytest
import torch
import torch.nn.functional as F

from moekit.ops import linear_attention as la

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; exact zeros on both sides (e.g. the gate gradient of a single step
    from a zero state) count as agreement."""
    diff, ref = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return diff / ref if ref > 0 else diff


def naive_l2norm(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def naive_recurrence(q, k, v, *, log_decay=None, beta=None, scale, initial_state=None):
    """log_decay is per key [B, T, H, K] (or None); beta [B, T, H] turns on the delta rule."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = torch.zeros(B, H, K, V, dtype=F64) if initial_state is None else initial_state.to(F64)
    eye = torch.eye(K, dtype=F64)
    outs = []
    for t in range(T):
        kt, vt = k[:, t].to(F64), v[:, t].to(F64)
        if log_decay is not None:
            S = torch.diag_embed(torch.exp(log_decay[:, t].to(F64))) @ S
        outer_kv = kt[..., :, None] @ vt[..., None, :]
        if beta is None:
            S = S + outer_kv
        else:
            b = beta[:, t].to(F64)[..., None, None]
            S = (eye - b * (kt[..., :, None] @ kt[..., None, :])) @ S + b * outer_kv
        outs.append(scale * (q[:, t].to(F64)[..., None, :] @ S).squeeze(-2))
    return torch.stack(outs, 1), S


# name -> (extra inputs given (B, T, H, K, dtype), how the naive recurrence reads them)
def _gate(B, T, H, dtype):
    return F.logsigmoid(torch.randn(B, T, H, dtype=dtype) + 1.0)


def _beta(B, T, H, dtype):
    return torch.sigmoid(torch.randn(B, T, H, dtype=dtype))


OPS = {
    "linear_attn": (lambda B, T, H, K, dt: {}, lambda x, K: {}),
    "simple_gla": (lambda B, T, H, K, dt: {"g": _gate(B, T, H, dt)},
                   lambda x, K: {"log_decay": x["g"][..., None].expand(*x["g"].shape, K)}),
    "gla": (lambda B, T, H, K, dt: {"gk": F.logsigmoid(torch.randn(B, T, H, K, dtype=dt) + 1.0)},
            lambda x, K: {"log_decay": x["gk"]}),
    "delta_rule": (lambda B, T, H, K, dt: {"beta": _beta(B, T, H, dt)}, lambda x, K: {"beta": x["beta"]}),
    "gated_delta_rule": (lambda B, T, H, K, dt: {"g": _gate(B, T, H, dt), "beta": _beta(B, T, H, dt)},
                         lambda x, K: {"beta": x["beta"],
                                       "log_decay": x["g"][..., None].expand(*x["g"].shape, K)}),
}
DELTA = ("delta_rule", "gated_delta_rule")


def make_inputs(op, B=2, T=37, H=2, K=8, V=6, dtype=F64, with_state=True):
    q = torch.randn(B, T, H, K, dtype=dtype)
    k = torch.randn(B, T, H, K, dtype=dtype)
    if op in DELTA:
        k = k / k.norm(dim=-1, keepdim=True)  # the delta rule is contractive only for unit keys
    x = {"q": q, "k": k, "v": torch.randn(B, T, H, V, dtype=dtype), **OPS[op][0](B, T, H, K, dtype)}
    if with_state:
        x["initial_state"] = torch.randn(B, H, K, V, dtype=dtype)
    return x


def call(op, x, **kw):
    return getattr(la, op)(**x, output_final_state=True, **kw)


def call_naive(op, x, scale=None, l2norm=False):
    q, k = x["q"], x["k"]
    if l2norm:
        q, k = naive_l2norm(q), naive_l2norm(k)
    K = q.shape[-1]
    return naive_recurrence(q, k, x["v"], scale=K ** -0.5 if scale is None else scale,
                            initial_state=x.get("initial_state"), **OPS[op][1](x, K))


def forward_backward(fn, x, seed):
    """Output, final state and the gradients of a random projection of both, for every input."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    o, s = fn(leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=F64)).sum() + \
        (s * torch.randn(s.shape, generator=gen, dtype=F64)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, s, dict(zip(leaves, grads))


SHAPES = [(1, 64), (37, 32), (37, 64), (130, 32), (130, 64)]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T,chunk", SHAPES)
@pytest.mark.parametrize("op", list(OPS))
def test_chunk_recurrent_naive_agree(op, T, chunk, with_state):
    torch.manual_seed(zlib.crc32(f"{op}-{T}-{chunk}-{with_state}".encode()))
    x = make_inputs(op, T=T, with_state=with_state)
    results = {
        "chunk": forward_backward(lambda a: call(op, a, mode="chunk", chunk_size=chunk), x, 0),
        "recurrent": forward_backward(lambda a: call(op, a, mode="recurrent"), x, 0),
        "naive": forward_backward(lambda a: call_naive(op, a), x, 0),
    }
    o_ref, s_ref, g_ref = results["naive"]
    assert o_ref.shape == x["v"].shape
    for form in ("chunk", "recurrent"):
        o, s, grads = results[form]
        assert o.dtype == F64 and s.dtype == F64
        assert rel_err(o, o_ref) < 1e-10, form
        assert rel_err(s, s_ref) < 1e-10, form
        assert set(grads) == set(x)
        for name, g in grads.items():
            assert rel_err(g, g_ref[name]) < 1e-10, (form, name)


@pytest.mark.parametrize("op", DELTA)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_delta_rule_qk_l2norm_and_scale(op, mode):
    torch.manual_seed(3)
    x = make_inputs(op, T=45)
    x["k"] = x["k"] * 3.0  # far from unit norm: only the in-kernel normalisation keeps it stable
    o, s, grads = forward_backward(
        lambda a: call(op, a, mode=mode, chunk_size=16, scale=0.7, use_qk_l2norm_in_kernel=True), x, 1)
    o_ref, s_ref, g_ref = forward_backward(lambda a: call_naive(op, a, scale=0.7, l2norm=True), x, 1)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    for name in x:
        assert rel_err(grads[name], g_ref[name]) < 1e-10, name


@pytest.mark.parametrize("op", list(OPS))
def test_decoding_one_step_at_a_time(op):
    """A chunked prefill followed by T == 1 recurrent steps from the carried state equals one
    call over the whole sequence."""
    torch.manual_seed(4)
    x = make_inputs(op, T=41)
    full_o, full_s = call(op, x)
    per_token = [n for n in x if n != "initial_state"]
    prefix = {n: x[n][:, :36] for n in per_token}
    o, state = call(op, {**prefix, "initial_state": x["initial_state"]}, chunk_size=16)
    outs = [o]
    for t in range(36, 41):
        step = {n: x[n][:, t:t + 1] for n in per_token}
        o, state = call(op, {**step, "initial_state": state}, mode="recurrent")
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), full_o) < 1e-12
    assert rel_err(state, full_s) < 1e-12


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_inputs_keep_float32_state(op, dtype, tol):
    """fp32 / bf16 inputs: output in the input dtype, state in float32, close to the float64
    recurrence on the same (rounded) inputs."""
    torch.manual_seed(5)
    x = {n: t.to(dtype) for n, t in make_inputs(op, T=70).items()}
    o_ref, s_ref = call_naive(op, {n: t.double() for n, t in x.items()})
    for mode in ("chunk", "recurrent"):
        o, s = call(op, x, mode=mode, chunk_size=32)
        assert o.dtype == dtype and s.dtype == torch.float32
        assert rel_err(o, o_ref) < tol, mode
        assert rel_err(s, s_ref) < tol, mode


@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
def test_very_negative_gates_stay_finite_and_exact(op):
    """Log-gates down to -20 per step (cumulative sums near -1300 in a chunk) in float32: no
    overflow, no NaN, forward and backward match the float64 recurrence."""
    torch.manual_seed(6)
    x64 = make_inputs(op, T=100)
    gate = "gk" if op == "gla" else "g"
    x64[gate] = -20.0 * torch.rand(x64[gate].shape, dtype=F64)
    x64[gate][:, :10] = -1e-3  # a slowly decaying stretch next to the fast ones
    o_ref, s_ref, g_ref = forward_backward(lambda a: call_naive(op, a), x64, 2)
    x32 = {n: t.float() for n, t in x64.items()}
    for mode in ("chunk", "recurrent"):
        o, s, grads = forward_backward(
            lambda a, mode=mode: tuple(r.double() for r in call(op, a, mode=mode, chunk_size=64)), x32, 2)
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
        for name in x32:
            assert torch.isfinite(grads[name]).all(), (mode, name)
            assert rel_err(grads[name], g_ref[name]) < 1e-4, (mode, name)


def test_final_state_only_when_asked():
    torch.manual_seed(7)
    x = make_inputs("gla", T=9)
    o, s = la.gla(**x)
    assert s is None and o.shape == x["v"].shape


def test_lightning_and_retention_decays():
    minimax = pytest.importorskip("transformers.models.minimax.modeling_minimax")
    from types import SimpleNamespace

    for heads, layer, layers in ((8, 0, 4), (8, 3, 4), (6, 2, 5), (64, 10, 80)):
        fake_layer = SimpleNamespace(num_attention_heads=heads, layer_idx=layer, num_hidden_layers=layers)
        slope = minimax.MiniMaxLightningAttention.get_slope_rate(fake_layer).flatten()
        g = la.lightning_decay(heads, layer, layers)
        assert g.shape == (heads,) and (g < 0).all()
        assert torch.allclose(-g, slope, rtol=1e-6, atol=0)
    h = torch.arange(5, dtype=F64)
    assert torch.allclose(la.retention_decay(5, dtype=F64), torch.log(1 - 2.0 ** (-5 - h)), rtol=1e-14)


def test_lightning_attention_is_simple_gla_with_fixed_decay():
    """simple_gla with the lightning decay equals MiniMax's own per-step recurrence (scale 1)."""
    torch.manual_seed(8)
    B, T, H, K = 1, 20, 4, 8
    q, k, v = (torch.randn(B, T, H, K, dtype=F64) for _ in range(3))
    g = la.lightning_decay(H, 1, 3, dtype=F64)
    o, _ = la.simple_gla(q, k, v, g.expand(B, T, H), scale=1.0, chunk_size=8)
    ratio = torch.exp(g)[:, None, None]  # MiniMax: kv = ratio * kv + k^T v; o = q kv
    kv = torch.zeros(B, H, K, K, dtype=F64)
    outs = []
    for t in range(T):
        kv = ratio * kv + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], kv))
    assert rel_err(o, torch.stack(outs, 1)) < 1e-12
