"""CUDA graph capture: whether one is under way (host-side checks that read device values must
skip then), and capturing a call."""

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def is_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's automatic (cyclic) garbage collection off inside the block; its former state after.

    Wrap a CUDA graph capture in it. An automatic collection fires at whatever allocation crosses its
    threshold, so also inside a capture, and it finalizes whatever dead reference cycles it finds then:
    a ``torch.cuda.CUDAGraph`` among them is destroyed (cudaGraphExecDestroy, cudaGraphDestroy), which
    CUDA refuses while a stream is capturing; the capture is then invalidated and fails.
    ``torch.cuda.graph`` neither pauses the collector nor (unless
    ``torch.compiler.config.force_cudagraph_gc``) collects before capturing. An explicit
    ``gc.collect()`` still runs in the block: only the automatic collections stop."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def capture_graph(fn: Callable[[], torch.Tensor], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """(graph, output buffer) of ``fn`` captured on the current CUDA device, after ``warmup`` calls on
    a side stream (as torch.cuda.graphs advises: compilation and the allocator settle outside the
    capture). ``graph.replay()`` rewrites the output buffer."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with gc_paused(), torch.cuda.graph(graph):
        out = fn()
    return graph, out
