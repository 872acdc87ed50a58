"""Inputs and comparisons shared by the quantization tests (exposed as fixtures)."""

import pytest
import torch


def _make_input(shape, dtype, seed, specials=True):
    """Random data over many binades: per-row magnitudes, outliers, values that land in the FP8
    subnormal range of their block, input-dtype subnormals, an all-zero block with a -0.0, and
    (with `specials`) NaN, +Inf and -Inf in different blocks."""
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    small = dtype == torch.float16  # float16 overflows past 65504
    span, outlier, tiny = (4, 2.0**5, 2.0**-20) if small else (30, 2.0**12, 2.0**-130)
    x = torch.randn(shape, generator=g).reshape(-1, k)
    r = x.shape[0]
    x *= torch.exp2(torch.randint(-span, span, (r, 1), generator=g).float())
    # Push 30% of the elements 0..24 binades down, into and below the FP8 subnormal range.
    drop = torch.randint(0, 25, x.shape, generator=g).float() * (torch.rand(x.shape, generator=g) < 0.3)
    x *= torch.exp2(-drop)
    outliers = torch.randint(0, x.numel(), (max(2, x.numel() // 500),), generator=g)
    x.view(-1)[outliers] *= outlier
    x[r // 2] *= tiny
    x[0, :32] = 0.0
    x[0, 7] = -0.0
    if specials:
        x[1 % r, 40 % k] = float("nan")
        x[(r - 1), k - 3] = float("inf")
        x[r // 3, 5] = -float("inf")
    return x.reshape(shape).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    diff = _bits(actual) != _bits(expected)
    n = int(diff.sum())
    assert n == 0, f"{n} of {actual.numel()} differ, first at {diff.nonzero()[0].tolist()}"


def _assert_same_values(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal floats, except that any NaN matches any NaN (payloads vary across devices)."""
    nan = actual.isnan()
    assert torch.equal(nan, expected.isnan())
    _assert_same_bits(actual.masked_fill(nan, 0.0), expected.masked_fill(nan, 0.0))


@pytest.fixture
def make_input():
    return _make_input


@pytest.fixture
def assert_same_bits():
    return _assert_same_bits


@pytest.fixture
def assert_same_values():
    return _assert_same_values
