"""moekit.ops.cross_entropy: the chunked LM-head cross-entropy against F.cross_entropy on full
logits, and its Triton row kernel against the plain-PyTorch reference (in the interpreter on the
CPU, float32; bf16 on the GPU)."""

import pytest
import torch
import torch.nn.functional as F

from moekit.ops.cross_entropy import linear_cross_entropy, reference

CUDA = torch.cuda.is_available()


def _problem(n, h, v, dtype, seed, ignored=(), device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[list(ignored)] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), labels.to(device)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("n,h,v,rows,scale", [(37, 16, 50, 8, 1.0), (64, 8, 301, 64, 0.5), (5, 32, 7, 1, 2.0),
                                              (130, 16, 1000, None, 1.0)])
def test_matches_full_logits_cross_entropy(n, h, v, rows, scale):
    hidden, weight, labels = _problem(n, h, v, torch.float64, seed=n, ignored=(0, n - 1))
    got = linear_cross_entropy(hidden, weight, labels, scale=scale, rows=rows)
    want = F.cross_entropy(hidden @ weight.t() * scale, labels, ignore_index=-100)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(got * 1.7, [hidden, weight])
    wants = torch.autograd.grad(want * 1.7, [hidden, weight])
    for g, w in zip(grads, wants, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_bf16_matches_its_float32_logits_reference():
    """bf16 weights: the same bf16 head GEMM as nn.Linear, then float32 softmax."""
    hidden, weight, labels = _problem(48, 32, 200, torch.bfloat16, seed=3, ignored=(5,))
    got = linear_cross_entropy(hidden, weight, labels, rows=16)
    want = F.cross_entropy((hidden @ weight.t()).float(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, [hidden, weight]), torch.autograd.grad(want, [hidden, weight]),
                    strict=True):
        assert g.dtype == torch.bfloat16 and _rel(g, w) < 1e-2


def test_autocast_runs_in_the_autocast_dtype():
    hidden, weight, labels = _problem(32, 16, 64, torch.float32, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, labels)
        want = F.cross_entropy(F.linear(hidden, weight).float(), labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_h, g_w = torch.autograd.grad(got, [hidden, weight])
    assert g_h.dtype == g_w.dtype == torch.float32  # the parameters' dtype, as autocast's linear gives


def test_no_grad_and_all_ignored():
    hidden, weight, labels = _problem(16, 8, 20, torch.float64, seed=5)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), labels))
    assert torch.isnan(linear_cross_entropy(hidden, weight, torch.full_like(labels, -100)))


def test_bad_inputs_are_named():
    hidden, weight, labels = _problem(8, 4, 10, torch.float32, seed=6)
    with pytest.raises(ValueError, match="hidden \\[N, H\\] and weight \\[V, H\\]"):
        linear_cross_entropy(hidden, weight[:, :3], labels)
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape \\[8\\]"):
        linear_cross_entropy(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="labels must lie in \\[0, 10\\) or equal ignore_index -100; got 10"):
        linear_cross_entropy(hidden, weight, torch.full_like(labels, 10))


@pytest.mark.skipif(CUDA, reason="the interpreter run; the GPU test below covers CUDA")
@pytest.mark.parametrize("rows,vocab", [(6, 50), (3, 2048), (5, 4100)])
@pytest.mark.parametrize("want_grad", [True, False])
def test_triton_row_kernel_matches_reference(rows, vocab, want_grad):
    from moekit.ops.cross_entropy import triton as kernel

    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[1] = -100
    inv_count = torch.tensor(1 / 7)
    want_loss, want_grad_t = reference.row_loss_and_grad(logits, labels, 0.8, inv_count, -100, want_grad)
    got_loss, got_grad = kernel.row_loss_and_grad(logits.clone(), labels, 0.8, inv_count, -100, want_grad)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert got_loss[1] == 0
    if want_grad:
        torch.testing.assert_close(got_grad, want_grad_t, rtol=1e-5, atol=1e-7)
        assert torch.all(got_grad[1] == 0)
    else:
        assert got_grad is None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,h,vocab", [(1000, 512, 151936), (333, 512, 50257), (37, 16, 50), (130, 48, 1000)])
def test_gpu_bf16_against_full_logits(n, h, vocab):
    hidden, weight, labels = _problem(n, h, vocab, torch.bfloat16, seed=n, ignored=(0, 7), device="cuda")
    got = linear_cross_entropy(hidden, weight, labels, rows=256)
    want = F.cross_entropy((hidden @ weight.t()).float(), labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, [hidden, weight]), torch.autograd.grad(want, [hidden, weight]),
                    strict=True):
        assert _rel(g, w) < 1e-2, _rel(g, w)


@pytest.mark.skipif(CUDA, reason="the interpreter run; the GPU test above covers CUDA")
def test_triton_row_kernel_bf16_logits(gpu_like_bf16):
    """bf16 logits in and their gradient out in place, rounded to nearest as the GPU rounds
    (tests/ops/conftest.py): the same bf16 values as the float32 reference's gradient cast to bf16."""
    from moekit.ops.cross_entropy import triton as kernel

    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(4, 3000, generator=gen) * 3).bfloat16()
    labels = torch.tensor([5, -100, 2999, 0])
    inv_count = torch.tensor(1 / 3)
    want_loss, want_grad = reference.row_loss_and_grad(logits, labels, 1.0, inv_count, -100, True)
    got_loss, got_grad = kernel.row_loss_and_grad(logits.clone(), labels, 1.0, inv_count, -100, True)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("rows", [0, -4, 2.0, True])
def test_rows_must_be_a_positive_integer(rows):
    """rows=-4 used to run no chunk at all: a loss of exactly 0 and gradients never written."""
    hidden, weight, labels = _problem(10, 8, 20, torch.float32, seed=7)
    with pytest.raises(ValueError, match="rows must be None or a positive integer, got"):
        linear_cross_entropy(hidden, weight, labels, rows=rows)


def test_second_derivative_is_refused_not_silently_zero():
    """The backward only scales gradients formed in the forward: through them a second derivative is 0.
    A Hessian-vector product through the loss used to come out without the loss's curvature (here
    ``(A**3).sum()`` keeps the first gradient in the graph, so nothing failed); now it raises."""
    gen = torch.Generator().manual_seed(8)
    x, weight = torch.randn(10, 8, generator=gen, dtype=torch.float64), torch.randn(20, 8, generator=gen,
                                                                                    dtype=torch.float64)
    labels = torch.randint(0, 20, (10,), generator=gen)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64, requires_grad=True)

    def curvature(loss_fn):
        (g,) = torch.autograd.grad(loss_fn(x @ a) + (a**3).sum(), a, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), a)[0]

    want = curvature(lambda h: F.cross_entropy(h @ weight.t(), labels))
    without_loss = curvature(lambda h: h.sum() * 0)
    assert (want - without_loss).norm() > 1e-3 * want.norm()  # the loss's curvature matters here
    with pytest.raises(RuntimeError, match="no second derivative.*use F.cross_entropy on the full"):
        curvature(lambda h: linear_cross_entropy(h, weight, labels, rows=4))


def test_a_scale_that_needs_a_gradient_is_refused():
    """``scale`` is a constant of the op: a learnable temperature passed as a tensor used to be read with
    float(), so its gradient was silently None (and the loss looked right). Now it is an error; a
    tensor that needs no gradient still works as its value."""
    hidden, weight, labels = _problem(10, 8, 20, torch.float64, seed=9)
    temperature = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="scale is a constant here: .* gets no gradient"):
        linear_cross_entropy(hidden, weight, labels, scale=temperature)
    got = linear_cross_entropy(hidden, weight, labels, scale=temperature.detach())
    want = F.cross_entropy(0.5 * hidden @ weight.t(), labels)
    torch.testing.assert_close(got, want)
