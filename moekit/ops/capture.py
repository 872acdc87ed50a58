"""CUDA graph capture: whether one is under way (host-side checks that read device values must
skip then), and capturing a call."""

from collections.abc import Callable

import torch


def is_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
