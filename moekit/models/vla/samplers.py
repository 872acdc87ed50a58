"""ODE samplers for flow matching: integrate dx/dt = v(x, t) from t_start to 1 on a uniform grid.

- ``euler``: x += h v(x, t). One velocity evaluation per step; exact when v is constant.
- ``heun``: the explicit trapezoid rule (predict with Euler, correct with the mean of both
  slopes). Two evaluations per step; exact when v is linear in t (and independent of x).
- ``ab2``: two-step Adams-Bashforth, x += h (3/2 v_n - 1/2 v_{n-1}), reusing the previous
  step's velocity, so one evaluation per step; its first step has no history and takes a
  Heun step (one extra evaluation), which keeps it exact for fields linear in t.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t scalar tensor) -> v like x
SAMPLERS = ("euler", "heun", "ab2")


def time_grid(steps: int, t_start: float = 0.0, device=None) -> torch.Tensor:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampler: steps must be a positive integer, got {steps!r}")
    if not 0.0 <= t_start < 1.0:
        raise ValueError(f"sampler: t_start must lie in [0, 1), got {t_start}")
    return torch.linspace(t_start, 1.0, steps + 1, dtype=torch.float64, device=device)


def _check(x0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if v.shape != x0.shape:
        raise ValueError(f"sampler: the velocity has shape {tuple(v.shape)}, the state {tuple(x0.shape)}")
    return v


def euler(velocity: VelocityFn, x0: torch.Tensor, steps: int, t_start: float = 0.0) -> torch.Tensor:
    ts = time_grid(steps, t_start).tolist()
    x = x0
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * _check(x0, velocity(x, _scalar(t, x0)))
    return x


def _heun_step(velocity: VelocityFn, x: torch.Tensor, t: float, t_next: float, v: torch.Tensor) -> torch.Tensor:
    h = t_next - t
    v_next = _check(x, velocity(x + h * v, _scalar(t_next, x)))
    return x + 0.5 * h * (v + v_next)


def heun(velocity: VelocityFn, x0: torch.Tensor, steps: int, t_start: float = 0.0) -> torch.Tensor:
    ts = time_grid(steps, t_start).tolist()
    x = x0
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = _heun_step(velocity, x, t, t_next, _check(x0, velocity(x, _scalar(t, x0))))
    return x


def ab2(velocity: VelocityFn, x0: torch.Tensor, steps: int, t_start: float = 0.0) -> torch.Tensor:
    ts = time_grid(steps, t_start).tolist()
    v_prev = _check(x0, velocity(x0, _scalar(ts[0], x0)))
    x = _heun_step(velocity, x0, ts[0], ts[1], v_prev)
    for t, t_next in zip(ts[1:-1], ts[2:]):
        v = _check(x0, velocity(x, _scalar(t, x0)))
        x = x + (t_next - t) * (1.5 * v - 0.5 * v_prev)  # uniform grid: h_n == h_{n-1}
        v_prev = v
    return x


def _scalar(t: float, like: torch.Tensor) -> torch.Tensor:
    # a fill, not a host-to-device copy: CUDA-graph capturable
    return torch.full((), t, dtype=like.dtype, device=like.device)


def integrate(method: str, velocity: VelocityFn, x0: torch.Tensor, steps: int, t_start: float = 0.0) -> torch.Tensor:
    """Integrate with the named sampler (one of ``SAMPLERS``)."""
    fns = {"euler": euler, "heun": heun, "ab2": ab2}
    if method not in fns:
        raise ValueError(f"sampler: unknown method {method!r}; choose one of {list(SAMPLERS)}")
    return fns[method](velocity, x0, steps, t_start)


def evaluations(method: str, steps: int) -> int:
    """Velocity evaluations ``integrate`` makes (the cost of a sample)."""
    return {"euler": steps, "heun": 2 * steps, "ab2": steps + 1}[method]
