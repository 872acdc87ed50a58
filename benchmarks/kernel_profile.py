"""Per-kernel GPU time of a callable, from torch.profiler: shared by the benchmarks' --profile."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_times(step: Callable[[], object], reps: int, name_width: int = 40) -> dict[str, float]:
    """{kernel name (truncated): us of GPU time per call of ``step``}, over ``reps`` calls (run
    ``step`` once before, so compilation and autotuning stay out)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            times[e.key[:name_width]] += e.self_device_time_total / reps
    return dict(times)


def format_top(times: dict[str, float], top: int = 25) -> str:
    """The ``top`` kernels by time, with their share of the summed kernel time."""
    total = sum(times.values())
    rows = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    lines = [f"{'kernel':60s} {'ms':>8s} {'share':>6s}"]
    lines += [f"{name:60s} {us / 1e3:8.2f} {100 * us / total:5.1f}%" for name, us in rows]
    lines.append(f"{'all kernels':60s} {total / 1e3:8.2f}")
    return "\n".join(lines)
