"""Input validation for the public ops: each problem is a ValueError naming the argument."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from moekit.ops.capture import is_capturing

MODES = ("chunk", "recurrent")
BACKENDS = ("auto", "reference", "triton")


def floating(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: `{name}` must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{op}: `{name}` must be a floating-point tensor, got dtype {t.dtype}")


def float_tensor(op: str, name: str, t, dim: int) -> None:
    floating(op, name, t)
    if t.dim() != dim:
        raise ValueError(f"{op}: `{name}` must have {dim} dims, got shape {tuple(t.shape)}")


def shape(op: str, name: str, t, expected: tuple[int, ...], layout: str) -> None:
    """`t` must be a floating tensor of shape `expected` (described as `layout`, e.g. "[B, T, H]")."""
    floating(op, name, t)
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: `{name}` must have shape {layout} = {tuple(expected)}, got {tuple(t.shape)}")


def non_empty(op: str, name: str, t: torch.Tensor) -> None:
    """No zero-sized dim: an empty head dim would divide by zero in the default scale and an empty
    batch or head count fail in the finite check's reductions, far from the cause."""
    if 0 in t.shape:
        raise ValueError(f"{op}: `{name}` has an empty dimension, got shape {tuple(t.shape)}")


def qkv(op: str, q, k, v) -> tuple[int, int, int, int, int]:
    """Checks q, k, v [B, T, H, K|V]; returns (B, T, H, K, V)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        float_tensor(op, name, t, 4)
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError(f"{op}: sequence length T must be >= 1, got `q` of shape {tuple(q.shape)}")
    non_empty(op, "q", q)
    shape(op, "k", k, (B, T, H, K), "[B, T, H, K] (like q)")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: `v` must have shape [B, T, H, V] with B, T, H = {(B, T, H)} of q, "
                         f"got {tuple(v.shape)}")
    non_empty(op, "v", v)
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{op}: `q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, T, H, K, v.shape[-1]


def switch(op: str, name: str, value) -> bool:
    """A bool option: a truthy string such as "False" (a YAML or command-line slip) is refused, not
    taken as True."""
    if not isinstance(value, bool):
        raise ValueError(f"{op}: `{name}` must be a bool, got {value!r}")
    return value


def one_device(op: str, named: dict[str, torch.Tensor | None]) -> None:
    """Every tensor on the first one's device: the Triton kernels launch on that device and would
    take another device's pointer for their own."""
    (first, ref), *rest = [(name, t) for name, t in named.items() if t is not None]
    for name, t in rest:
        if t.device != ref.device:
            raise ValueError(f"{op}: every tensor must be on {first}'s device {ref.device}, got `{name}` on {t.device}")


def options(op: str, mode: str, backend: str, chunk_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"{op}: `mode` must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: `backend` must be one of {BACKENDS}, got {backend!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: `chunk_size` must be a positive int, got {chunk_size!r}")


def sequences(op: str, cu_seqlens, batch: int, seq_len: int) -> list[int] | None:
    """Checks cu_seqlens against the packed batch; returns its bounds as a list (or None)."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() \
            or cu_seqlens.dtype == torch.bool or cu_seqlens.is_complex():
        raise ValueError(f"{op}: `cu_seqlens` must be a 1-D integer tensor")
    if batch != 1:
        raise ValueError(f"{op}: with `cu_seqlens` the inputs must be packed into batch size 1, got B={batch}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != seq_len:
        raise ValueError(f"{op}: `cu_seqlens` must start at 0 and end at T={seq_len}, got {bounds}")
    if any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{op}: `cu_seqlens` must be strictly increasing, got {bounds}")
    return bounds


_finite_checks_on: ContextVar[bool] = ContextVar("finite_checks_on", default=True)


@contextmanager
def finite_checks_skipped() -> Iterator[None]:
    """Within this block the ops skip ``FiniteCheck``: for callers that run many small steps on inputs
    they produced themselves (a decode step), where one device-to-host read per op and step
    would stall the GPU queue for a check that cannot fail on healthy activations."""
    token = _finite_checks_on.set(False)
    try:
        yield
    finally:
        _finite_checks_on.reset(token)


def _checking() -> bool:
    """Whether the finite check runs: not while torch.compile traces (a data-dependent branch breaks
    the graph), not while a CUDA graph is captured (a sync is illegal there), not inside
    ``finite_checks_skipped``."""
    # is_compiling first: dynamo cannot trace ContextVar.get, and short-circuits here on a constant
    return not (torch.compiler.is_compiling() or not _finite_checks_on.get() or is_capturing())


# Devices whose check is read in the backward when one follows (see ``FiniteCheck``): where a read
# stalls a queue of launched work. Tests add "cpu".
DEFERRED_ON = ("cuda",)


def defers_to_backward(tensors: Sequence[torch.Tensor]) -> bool:
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and tensors[0].device.type in DEFERRED_ON)


class FiniteCheck:
    """NaN / inf inputs are rejected with an error naming them, found through the results: each
    input element reaches the output at its own position (o_t reads q_t, k_t, v_t, the gates up
    to t and the initial state), so one read of the output and final state stands for one read of
    every input (a third of the bytes for linear attention). Only when a result is not finite are
    the inputs looked at: to name the bad ones, or, when all are finite, to say the computation
    overflowed.

    The verdict needs one device-to-host read, and a read in the forward stalls the GPU queue: it
    idles while the host launches what follows (at T = 2k on the H200 that cost linear attention's
    forward + backward a sixth of its time). Where a backward will follow on the GPU
    (``defers_to_backward``), the flag goes to the host asynchronously and is read by a node the
    inputs pass through first (``watch``), whose backward runs after the op's own backward has been
    launched: the error is raised there, before any gradient is returned, and the forward's output
    holds the NaN meanwhile. Otherwise the read happens at once, in ``verify``."""

    def __init__(self, op: str, named: dict[str, torch.Tensor | None]):
        self.op, self.named = op, named
        self.on = _checking()
        self.deferred = False
        self.flag = self.event = None  # set by verify when deferred
        self.result_dtype: torch.dtype | None = None  # the output's, for the overflow message

    def watch(self, args: Sequence) -> list:
        """``args`` (the op's inputs, before it runs), their tensors routed through the backward check
        when it defers; other values (None, options) pass as they are."""
        present = [t for t in args if isinstance(t, torch.Tensor)]
        if not (self.on and present and defers_to_backward(present)):
            return list(args)
        self.deferred = True
        routed = iter(_CheckedInBackward.apply(self, *present))
        return [next(routed) if isinstance(t, torch.Tensor) else t for t in args]

    def verify(self, results: Sequence[torch.Tensor | None], nonfinite: torch.Tensor | None = None) -> None:
        """``nonfinite``: the kernels' own flag (int32 [1], 1 when a result is not finite), where the
        kernels that wrote the results computed it; else the results are read here."""
        if not self.on:
            return
        present = [t for t in results if t is not None]
        self.result_dtype = present[0].dtype
        if nonfinite is not None:
            finite = nonfinite[0] == 0
        else:
            # One reduction per tensor, no boolean copy: min and max propagate NaN and reach any inf.
            wide = torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32
            finite = torch.stack([m.to(wide) for t in present for m in t.aminmax()]).isfinite().all()
        if not self.deferred:
            if not bool(finite):
                self._raise()
        elif finite.is_cuda:
            self.flag = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(finite, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.flag = finite

    def read_deferred(self) -> None:
        """The backward's read (a no-op when the forward raised before ``verify``)."""
        if self.flag is None:
            return
        if self.event is not None:
            self.event.synchronize()
        if not bool(self.flag):
            self._raise()

    def _raise(self) -> None:
        """A result is not finite: name the inputs that are not, or say it overflowed."""
        bad = [name for name, t in self.named.items() if t is not None and not bool(t.isfinite().all())]
        if bad:
            raise ValueError(f"{self.op}: non-finite values (NaN or inf) in {', '.join(f'`{n}`' for n in bad)}")
        raise ValueError(f"{self.op}: the result is not finite (NaN or inf) although every input is: the "
                         f"computation overflowed {self.result_dtype}; scale the inputs (or `scale`) down")


class _CheckedInBackward(torch.autograd.Function):
    """Identity on the op's inputs whose backward reads a deferred ``FiniteCheck``."""

    @staticmethod
    def forward(ctx, check: FiniteCheck, *tensors):
        ctx.check = check
        out = tuple(t.view_as(t) for t in tensors)
        ctx.mark_non_differentiable(*(o for o, t in zip(out, tensors) if not t.requires_grad))
        return out

    @staticmethod
    def backward(ctx, *grads):
        ctx.check.read_deferred()
        return (None, *grads)
