"""Per step and per shape, the faster of the fused Triton kernel and the vendor grouped GEMM.

Each GEMM step of the layer (``STEPS``) has a Triton implementation and, where
``torch._grouped_mm`` supports the operands, a vendor one (``triton_vendor``) computing the same
result in the same layout. On a GPU the first call for a shape times both on its real operands
and remembers the winner; later calls run it directly. Neither wins everywhere: the fused
kernels save whole passes over memory when experts are small (olmoe, deepseek-v3), cuBLAS/CUTLASS
can be faster on very large per-expert GEMMs (mixtral).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch

STEPS = ("up fwd", "down fwd", "down dgrad", "down wgrad", "up wgrad", "up dgrad")
IMPLEMENTATIONS = ("triton", "vendor")

# Pin one implementation for every step (tests, benchmarks, or MOEKIT_MOE_IMPL=triton|vendor in the
# environment); None lets timing decide.
force: str | None = os.environ.get("MOEKIT_MOE_IMPL") or None

_winners: dict[tuple, str] = {}
R = TypeVar("R")


def run(step: str, key: tuple, candidates: dict[str, Callable[[], R]], on_gpu: bool) -> R:
    """Run ``candidates[name]()`` for the implementation chosen for (step, key)."""
    return candidates[choose(step, key, candidates, on_gpu)]()


def choose(step: str, key: tuple, candidates: dict[str, Callable[[], R]], on_gpu: bool) -> str:
    """Pinned by ``force``; else on a GPU the faster (timed once per key), elsewhere Triton
    (timings of the CPU interpreter say nothing)."""
    if step not in STEPS:
        raise ValueError(f"unknown MoE step {step!r}; steps: {STEPS}")
    if force is not None:
        if force not in IMPLEMENTATIONS:
            raise ValueError(f"triton_choice.force (MOEKIT_MOE_IMPL) must be one of {IMPLEMENTATIONS} or None, "
                             f"got {force!r}")
        if force not in candidates:
            raise RuntimeError(f"MoE step {step!r}: implementation {force!r} cannot run these operands")
        return force
    if len(candidates) == 1 or not on_gpu:
        return "triton" if "triton" in candidates else next(iter(candidates))
    full_key = (step, *key)
    if full_key not in _winners:
        _winners[full_key] = _race(candidates)
    return _winners[full_key]


def chosen() -> dict[tuple, str]:
    """(step, *shape key) -> implementation, for every decision made so far."""
    return dict(_winners)


# Each timed run queues its calls behind a GPU-side delay, so the host has launched them all before
# the GPU starts: the timing holds the GPU's time only, as a CUDA-graph replay runs them. (A decode
# step's calls take tens of microseconds, of the order of their host launch time.)
RACE_DELAY_CYCLES = 4_000_000  # about 2 ms at an H200's clock: longer than queuing the calls takes


def _race(candidates: dict[str, Callable[[], object]], rounds: int = 3, calls: int = 3) -> str:
    """Median over ``rounds`` of the mean GPU time of ``calls`` back-to-back calls, the candidates
    taking turns, after one untimed call each (Triton compiles and tunes there)."""
    for fn in candidates.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(RACE_DELAY_CYCLES)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / calls)
    times = {name: sorted(runs)[rounds // 2] for name, runs in samples.items()}
    return min(times, key=times.get)
