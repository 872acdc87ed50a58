"""The one-program routing metadata of decode-sized calls against the torch ops it replaces
(``triton_meta.routing_meta_torch``); on the CPU the interpreter runs the kernel."""

from __future__ import annotations

import pytest
import torch

from moekit.ops.moe import routing_kernel, triton_meta

# The interpreter turns 0-d loop bounds into Python ints through a deprecated NumPy path.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_indices(T: int, K: int, E: int, seed: int, drop: float = 0.2) -> torch.Tensor:
    """Distinct experts per token where there are enough, some slots dropped (-1)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=gen).argsort(-1)[:, :K] if K <= E else torch.randint(0, E, (T, K), generator=gen)
    return torch.where(torch.rand(T, K, generator=gen) < drop, -1, idx).to(DEVICE)


def assert_matches_torch_path(idx: torch.Tensor, E: int) -> None:
    counts, order, ok = routing_kernel.routing_meta_small(idx.reshape(-1), E)
    ref = triton_meta.routing_meta_torch(idx, E)
    assert counts.dtype == order.dtype == torch.int32
    assert torch.equal(counts, ref.counts) and torch.equal(order, ref.order)
    assert ok.item() == 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("T,K,E", [(1, 1, 1), (16, 8, 64), (3, 2, 1000), (32, 8, 256), (5, 3, 4), (17, 4, 8)])
def test_matches_the_torch_path(T, K, E, dtype):
    idx = random_indices(T, K, E, seed=T * K + E).to(dtype)
    assert routing_kernel.fits(idx.numel(), E)
    assert_matches_torch_path(idx, E)


def test_every_slot_dropped_and_one_expert_taking_all():
    assert_matches_torch_path(torch.full((8, 2), -1, device=DEVICE), 4)
    assert_matches_torch_path(torch.zeros(40, 1, dtype=torch.int64, device=DEVICE), 3)


@pytest.mark.parametrize("bad", [-2, 6, 7, 100, 2**32 + 3, 2**32 - 1])
def test_out_of_range_indices_clear_the_flag(bad):
    """Also int64 indices that an int32 cast would wrap into range."""
    idx = random_indices(9, 3, 6, seed=1)
    idx[4, 1] = bad
    counts, order, ok = routing_kernel.routing_meta_small(idx.reshape(-1), 6)
    assert ok.item() == 0
    # Still a permutation of the assignments: no position lands past the end.
    assert torch.equal(order.sort().values.cpu(), torch.arange(idx.numel(), dtype=torch.int32))


def test_sizes_it_takes():
    assert routing_kernel.fits(1, 1) and routing_kernel.fits(routing_kernel.MAX_ASSIGNMENTS, routing_kernel.MAX_EXPERTS)
    assert not routing_kernel.fits(0, 8)
    assert not routing_kernel.fits(routing_kernel.MAX_ASSIGNMENTS + 1, 8)
    assert not routing_kernel.fits(8, routing_kernel.MAX_EXPERTS + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,K,E", [(1, 8, 64), (16, 8, 64), (32, 8, 256), (7, 2, 1000), (32, 8, 8)])
def test_decode_sized_calls_on_gpu_take_the_kernel(monkeypatch, T, K, E):
    """On the GPU routing_meta runs the kernel for these sizes, and the torch path above them."""
    calls = []
    kernel = routing_kernel.routing_meta_small
    monkeypatch.setattr(routing_kernel, "routing_meta_small", lambda *a: calls.append(a) or kernel(*a))
    for rows in (T, routing_kernel.MAX_ASSIGNMENTS // K + 1):
        idx = random_indices(rows, K, E, seed=E)
        meta, ref = triton_meta.routing_meta(idx, E), triton_meta.routing_meta_torch(idx, E)
        assert torch.equal(meta.counts, ref.counts) and torch.equal(meta.order, ref.order)
    assert len(calls) == 1
