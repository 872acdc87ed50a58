"""Building blocks of the mixers against float64 formulas: short conv, norms, RoPE."""

import pytest
import torch
import torch.nn.functional as F

from moekit.mixers.conv import ShortConvolution
from moekit.mixers.norm import GatedRMSNorm, RMSNorm
from moekit.mixers.rope import RotaryEmbedding


def reference_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[t, c] = silu(sum_j w[c, j] x[t - W + 1 + j, c]), zeros before the start."""
    b, t, c = x.shape
    w = weight.shape[-1]
    y = torch.zeros_like(x)
    for i in range(t):
        for j in range(w):
            src = i - w + 1 + j
            if src >= 0:
                y[:, i] += weight[:, 0, j] * x[:, src]
    return F.silu(y)


@pytest.mark.parametrize("kernel_size,seq_len", [(2, 5), (4, 3), (4, 10)])
def test_short_conv_matches_reference_and_streams(kernel_size, seq_len):
    conv = ShortConvolution(6, kernel_size).double()
    x = torch.randn(2, seq_len, 6, dtype=torch.float64, requires_grad=True)
    y, state = conv(x)
    ref = reference_conv(x, conv.conv.weight)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gx, gw = torch.autograd.grad(y.sin().sum(), (x, conv.conv.weight))
    rx, rw = torch.autograd.grad(ref.sin().sum(), (x, conv.conv.weight))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    # One step at a time through the state gives the same outputs and the same final state.
    s = None
    steps = []
    for i in range(seq_len):
        yi, s = conv(x[:, i:i + 1], s)
        steps.append(yi)
    torch.testing.assert_close(torch.cat(steps, 1), y)
    torch.testing.assert_close(s, state)


def test_norms_match_formula():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    g = torch.randn(3, 5, 8, dtype=torch.float64)
    norm = RMSNorm(8, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    rms = lambda t: t / torch.sqrt(t.square().mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), rms(x))

    gated = GatedRMSNorm(8, eps=1e-5, activation="swish").double()
    gated.weight = norm.weight
    torch.testing.assert_close(gated(x, g), rms(x) * F.silu(g))
    gated_first = GatedRMSNorm(8, eps=1e-5, norm_before_gate=False).double()
    gated_first.weight = norm.weight
    torch.testing.assert_close(gated_first(x, g), rms(x * F.silu(g)))
    sig = GatedRMSNorm(8, eps=1e-5, activation="sigmoid").double()
    sig.weight = norm.weight
    torch.testing.assert_close(sig(x, g), rms(x) * torch.sigmoid(g))
    with pytest.raises(ValueError, match="unknown gate activation 'tanh'"):
        GatedRMSNorm(8, activation="tanh")


def test_rope_scores_depend_on_distance_only():
    rope = RotaryEmbedding(8, theta=100.0)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=gen), torch.randn(1, 1, 1, 8, generator=gen)
    # float32 rounding is relative to |q| |k|, not to the score (which can nearly cancel)
    tol = 1e-5 * (q.norm() * k.norm()).item()

    def score(m, n):
        return (rope(q, torch.tensor([[m]])) * rope(k, torch.tensor([[n]]))).sum().item()

    assert score(7, 3) == pytest.approx(score(4, 0), abs=tol)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=tol)
    assert abs(score(5, 0) - score(0, 0)) > 1e-3
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)


def test_short_conv_skips_padding_anywhere():
    """With a token mask, each row convolves its real tokens after the state as if the padding were
    not there (wherever it sits), and the new state holds the row's last real inputs."""
    conv = ShortConvolution(3, 4).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    state = torch.randn(2, 3, 3, dtype=torch.float64)
    mask = torch.tensor([[False, False, True, False, True, True], [True] * 6])
    y, new_state = conv(x, state, mask)
    for b in range(2):
        real = x[b:b + 1, mask[b]]
        y_alone, state_alone = conv(real, state[b:b + 1])
        torch.testing.assert_close(y[b:b + 1, mask[b]], y_alone)
        torch.testing.assert_close(new_state[b:b + 1], state_alone)
    # fewer real tokens than the state is long: the state keeps its tail
    y1, s1 = conv(x[:1, :2], state[:1], torch.tensor([[False, True]]))
    torch.testing.assert_close(s1, torch.cat([state[:1, :, 1:], x[:1, 1:2].transpose(1, 2)], -1))


def test_unit_offset_norm_keeps_float64_weights():
    """A float64 norm with ``unit_offset`` applied 1 + weight rounded to float32 (``weight.float()``):
    float64 reference checks of a Qwen3-Next model were off by ~1e-7 and a gradcheck on the weight failed."""
    norm = RMSNorm(8, eps=1e-6, unit_offset=True).double()
    with torch.no_grad():
        norm.weight.copy_(0.1 * torch.randn(8, dtype=torch.float64) + 1e-9)
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight)
    torch.testing.assert_close(norm(x), expected, rtol=1e-14, atol=1e-14)
    weight = norm.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(norm, {"weight": w}, (x,)), (weight,))
