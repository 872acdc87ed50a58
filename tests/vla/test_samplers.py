"""Each sampler integrates the velocity fields it is exact for to float64 precision, converges
at its order on a field it is not exact for, and refuses bad input."""

import pytest
import torch

from moekit.models.vla import samplers

DTYPE = torch.float64


def _state(seed: int, shape=(5, 8, 2)) -> torch.Tensor:
    return torch.randn(shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", samplers.SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("t_start", [0.0, 0.3])
def test_constant_field_is_exact(method, steps, t_start):
    """v = b: x(1) = x0 + (1 - t_start) b. Every sampler is exact."""
    x0, b = _state(steps), _state(100 + steps)
    out = samplers.integrate(method, lambda x, t: b.expand_as(x), x0, steps, t_start)
    torch.testing.assert_close(out, x0 + (1 - t_start) * b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["heun", "ab2"])
@pytest.mark.parametrize("steps", [2, 3, 10])
def test_field_linear_in_time_is_exact_for_second_order(method, steps):
    """v = a + c t: x(1) = x0 + (1 - s) a + (1 - s^2) c / 2 from t = s."""
    x0, a, c = _state(1), _state(2), _state(3)
    s = 0.2
    out = samplers.integrate(method, lambda x, t: a + c * t, x0, steps, s)
    torch.testing.assert_close(out, x0 + (1 - s) * a + (1 - s * s) / 2 * c, rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [2, 10])
def test_euler_is_not_exact_for_time_varying_field(steps):
    """The first-order sampler's known error on v = c t: its left sums miss c h / 2."""
    x0, c = _state(4), _state(5)
    out = samplers.euler(lambda x, t: c * t, x0, steps)
    torch.testing.assert_close(out, x0 + c / 2 - c / (2 * steps), rtol=0, atol=1e-9)


def _linear_system(seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 4, dtype=DTYPE, generator=g) * 0.7
    b = torch.randn(4, dtype=DTYPE, generator=g)
    x0 = torch.randn(3, 4, dtype=DTYPE, generator=g)
    # dx/dt = A x + b  =>  x(1) = e^A x0 + A^{-1} (e^A - I) b
    expm = torch.linalg.matrix_exp(a)
    exact = x0 @ expm.T + torch.linalg.solve(a, (expm - torch.eye(4, dtype=DTYPE)) @ b)
    return (lambda x, t: x @ a.T + b), x0, exact


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("ab2", 2)])
def test_convergence_order_on_linear_system(method, order):
    field, x0, exact = _linear_system(6)
    errors = [(samplers.integrate(method, field, x0, n) - exact).norm().item() for n in (32, 64)]
    observed = torch.log2(torch.tensor(errors[0] / errors[1])).item()
    assert abs(observed - order) < 0.15, (method, errors, observed)


@pytest.mark.parametrize("method", samplers.SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_evaluation_count(method, steps):
    calls = []
    field = lambda x, t: calls.append(float(t)) or torch.ones_like(x)
    samplers.integrate(method, field, _state(7), steps)
    assert len(calls) == samplers.evaluations(method, steps)
    assert min(calls) == 0.0 and max(calls) <= 1.0


def test_bad_input():
    x0 = _state(8)
    field = lambda x, t: x
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        samplers.integrate("euler", field, x0, 0)
    with pytest.raises(ValueError, match="unknown method 'rk4'"):
        samplers.integrate("rk4", field, x0, 2)
    with pytest.raises(ValueError, match=r"t_start must lie in \[0, 1\)"):
        samplers.integrate("heun", field, x0, 2, t_start=1.0)
    with pytest.raises(ValueError, match="velocity has shape"):
        samplers.integrate("ab2", lambda x, t: x[..., :1], x0, 2)
