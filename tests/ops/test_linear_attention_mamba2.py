"""mamba2_ssd against a naive selective scan written here, in Mamba2's own state layout.

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T    (h is [P, N] per head, as Mamba2 keeps it)
    y_t = h_t C_t + D x_t
"""

import pytest
import torch
import torch.nn.functional as F

from moekit.ops import linear_attention as la

F64 = torch.float64


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def naive_selective_scan(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None):
    """Returns y [B, T, H, P] and the final state in moekit's [B, H, N, P] layout."""
    batch, T, H, P = x.shape
    G, N = B.shape[2:]
    group_of_head = torch.tensor([h * G // H for h in range(H)])
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    h = torch.zeros(batch, H, P, N, dtype=F64) if initial_state is None else initial_state.transpose(-1, -2)
    ys = []
    for t in range(T):
        Bt, Ct = B[:, t, group_of_head], C[:, t, group_of_head]  # [batch, H, N]
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        h = decay * h + dt[:, t, :, None, None] * torch.einsum("bhp,bhn->bhpn", x[:, t], Bt)
        y = torch.einsum("bhpn,bhn->bhp", h, Ct)
        if D is not None:
            y = y + (D[:, None] if D.dim() == 1 else D) * x[:, t]
        ys.append(y)
    return torch.stack(ys, 1), h.transpose(-1, -2)


def make_inputs(batch=2, T=37, H=4, P=6, G=2, N=5, D_shape=(4,), with_state=True):
    x = {
        "x": torch.randn(batch, T, H, P, dtype=F64),
        "dt": F.softplus(torch.randn(batch, T, H, dtype=F64)),
        "A": -torch.exp(torch.randn(H, dtype=F64)),
        "B": torch.randn(batch, T, G, N, dtype=F64),
        "C": torch.randn(batch, T, G, N, dtype=F64),
    }
    if D_shape is not None:
        x["D"] = torch.randn(D_shape, dtype=F64)
    if with_state:
        x["initial_state"] = torch.randn(batch, H, N, P, dtype=F64)
    return x


def forward_backward(fn, x):
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    y, h = fn(leaves)
    gen = torch.Generator().manual_seed(0)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=F64)).sum() + \
        (h * torch.randn(h.shape, generator=gen, dtype=F64)).sum()
    return y, h, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.mark.parametrize("T,chunk,with_state,G,D_shape", [
    (1, 64, True, 2, (4,)),
    (37, 32, False, 1, None),
    (37, 64, True, 4, (4, 6)),
    (130, 32, True, 2, (4,)),
])
def test_ssd_matches_naive_selective_scan(T, chunk, with_state, G, D_shape):
    torch.manual_seed(T + G)
    x = make_inputs(T=T, G=G, D_shape=D_shape, with_state=with_state)
    y_ref, h_ref, g_ref = forward_backward(lambda a: naive_selective_scan(**a), x)
    for mode in ("chunk", "recurrent"):
        y, h, grads = forward_backward(
            lambda a, mode=mode: la.mamba2_ssd(**a, output_final_state=True, mode=mode, chunk_size=chunk), x)
        assert y.shape == x["x"].shape and h.shape == (2, 4, 5, 6)
        assert rel_err(y, y_ref) < 1e-10 and rel_err(h, h_ref) < 1e-10, mode
        for name in x:
            assert rel_err(grads[name], g_ref[name]) < 1e-10, (mode, name)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_ssd_dt_bias_and_softplus(mode):
    torch.manual_seed(2)
    x = make_inputs(T=40)
    x["dt"] = torch.randn_like(x["dt"])  # raw, before bias and softplus
    x["dt_bias"] = torch.randn(4, dtype=F64)
    y_ref, h_ref, g_ref = forward_backward(lambda a: naive_selective_scan(**a, dt_softplus=True), x)
    y, h, grads = forward_backward(lambda a: la.mamba2_ssd(**a, dt_softplus=True, output_final_state=True,
                                                           mode=mode, chunk_size=16), x)
    assert rel_err(y, y_ref) < 1e-10 and rel_err(h, h_ref) < 1e-10
    for name in x:
        assert rel_err(grads[name], g_ref[name]) < 1e-10, name


def test_ssd_low_precision_and_packed_sequences():
    torch.manual_seed(3)
    lengths = [7, 30, 1, 20]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    x = make_inputs(batch=1, T=sum(lengths))
    x["initial_state"] = torch.randn(len(lengths), 4, 5, 6, dtype=F64)
    y, h = la.mamba2_ssd(**x, cu_seqlens=torch.tensor(bounds), output_final_state=True, chunk_size=16)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = {n: t[:, a:b] for n, t in x.items() if n not in ("A", "D", "initial_state")}
        y_ref, h_ref = naive_selective_scan(**alone, A=x["A"], D=x["D"], initial_state=x["initial_state"][i:i + 1])
        assert rel_err(y[:, a:b], y_ref) < 1e-10 and rel_err(h[i:i + 1], h_ref) < 1e-10, i
    x32 = {n: t.float() for n, t in x.items()}
    y32, h32 = la.mamba2_ssd(**x32, cu_seqlens=torch.tensor(bounds), output_final_state=True, mode="recurrent")
    assert y32.dtype == torch.float32 and h32.dtype == torch.float32
    assert rel_err(y32.double(), y) < 1e-5 and rel_err(h32.double(), h) < 1e-5
