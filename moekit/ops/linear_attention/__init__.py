"""Linear sequence-modeling ops: one signature each, a chunked and a recurrent form, a backend.

    from moekit.ops import linear_attention as la
    o, state = la.gla(q, k, v, gk, output_final_state=True)

Every op takes q, k [B, T, H, K] and v [B, T, H, V] (one dtype), gates in log space, and returns
``(o, final_state)``: o [B, T, H, V] in v's dtype, final_state [B, H, K, V] (None unless
``output_final_state``) kept in float32, or float64 when an input is float64, whatever the input
dtype. Per step, with S the K x V state and o_t = scale * q_t S_t:

    linear_attn(q, k, v)                 S_t = S_{t-1} + k_t^T v_t
    simple_gla(q, k, v, g)               S_t = exp(g_t) S_{t-1} + k_t^T v_t               g [B, T, H]
    gla(q, k, v, gk)                     S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t        gk [B, T, H, K]
    delta_rule(q, k, v, beta)            S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}) beta [B, T, H]
    gated_delta_rule(q, k, v, g, beta)   S' = exp(g_t) S_{t-1}; S_t = S' + beta_t k_t^T (v_t - k_t S')
    mamba2_ssd(x, dt, A, B, C, D)        Mamba2's SSD (see its docstring)

Common keyword arguments:
    scale=None               None means K ** -0.5 (mamba2_ssd has no scale)
    initial_state=None       [B, H, K, V], or [N, H, K, V] with cu_seqlens (N sequences)
    output_final_state=False
    mode="chunk"             "chunk" (block-parallel, training) or "recurrent" (step loop,
                             decoding; cheap for T == 1); both compute the same function
    cu_seqlens=None          int tensor [N + 1] of packed sequence bounds, 0 ... T, with B == 1;
                             each sequence starts from initial_state[i] (or zeros) and
                             final_state is per sequence, [N, H, K, V]
    chunk_size=64            block length of the chunk form
    backend="auto"           "auto" | "reference" | "triton": "auto" runs the fused Triton
                             kernels (triton_ops.py) on CUDA tensors they support and the plain
                             PyTorch reference otherwise; "triton" raises a ValueError saying
                             why when the kernels cannot run the call

Lightning attention and retention are ``simple_gla`` with a fixed per-head decay from
``lightning_decay`` / ``retention_decay``. Gates must be finite: for a full reset use a large
negative log-gate (e.g. -60), not -inf (the chunked form turns it into NaN).

NaN or inf in an input is a ValueError naming it. The check reads the results, not the inputs
(every input reaches the output at its own position), once per call; a result that overflows
from finite inputs is an error too. Where a backward follows on the GPU, the error is raised in
it, before any gradient is returned (the forward then does not stall the GPU queue; see
``_checks.FiniteCheck``). ``finite_checks_skipped()`` turns the check off (a decode loop).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from moekit.ops.linear_attention import _checks
from moekit.ops.linear_attention._checks import finite_checks_skipped
from moekit.ops.linear_attention.decay import lightning_decay, retention_decay
from moekit.ops.linear_attention.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from moekit.ops.linear_attention.gla import chunk_gla, recurrent_gla
from moekit.ops.linear_attention.mamba2 import chunk_ssd, recurrent_ssd
from moekit.ops.linear_attention.simple_gla import chunk_simple_gla, recurrent_simple_gla
from moekit.ops.linear_attention.varlen import run_per_sequence

__all__ = [
    "delta_rule",
    "finite_checks_skipped",
    "gated_delta_rule",
    "gla",
    "lightning_decay",
    "linear_attn",
    "mamba2_ssd",
    "retention_decay",
    "simple_gla",
]


@dataclass(frozen=True)
class _Forms:
    """An op's implementations: its reference forms and the name of its Triton entry point in
    ``triton_ops`` (same positional inputs; it also returns its kernels' finite flag), with the
    keyword arguments they all take."""

    chunk: Callable
    recurrent: Callable
    triton: str
    kwargs: dict


@dataclass(frozen=True)
class _Call:
    """The keyword arguments every op shares, validated and applied by ``_run``."""

    op: str
    initial_state: torch.Tensor | None
    output_final_state: bool
    mode: str
    cu_seqlens: torch.Tensor | None
    chunk_size: int
    backend: str


def linear_attn(q, k, v, *, scale=None, initial_state=None, output_final_state=False, mode="chunk",
                cu_seqlens=None, chunk_size=64, backend="auto"):
    """Causal linear attention without decay: S_t = S_{t-1} + k_t^T v_t."""
    call = _Call("linear_attn", initial_state, output_final_state, mode, cu_seqlens, chunk_size, backend)
    dims = _checks.qkv(call.op, q, k, v)
    forms = _Forms(chunk_simple_gla, recurrent_simple_gla, "simple_gla", {"scale": _scale(call.op, scale, dims)})
    return _run(call, forms, (q, k, v, None), dims, {"q": q, "k": k, "v": v}, v.dtype)


def simple_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, mode="chunk",
               cu_seqlens=None, chunk_size=64, backend="auto"):
    """Linear attention with a scalar log-decay per head and step: S_t = exp(g_t) S_{t-1} + k_t^T v_t.

    g is [B, T, H]. Lightning attention (pass ``scale=1.0`` to match MiniMax) and retention are
    this op with ``g = lightning_decay(...)`` / ``retention_decay(...)`` broadcast over [B, T].
    """
    call = _Call("simple_gla", initial_state, output_final_state, mode, cu_seqlens, chunk_size, backend)
    dims = _checks.qkv(call.op, q, k, v)
    _checks.shape(call.op, "g", g, dims[:3], "[B, T, H]")
    forms = _Forms(chunk_simple_gla, recurrent_simple_gla, "simple_gla", {"scale": _scale(call.op, scale, dims)})
    return _run(call, forms, (q, k, v, g), dims, {"q": q, "k": k, "v": v, "g": g}, v.dtype)


def gla(q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False, mode="chunk",
        cu_seqlens=None, chunk_size=64, backend="auto"):
    """Gated linear attention with a per-key log-decay: S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t.

    gk is [B, T, H, K], like q.
    """
    call = _Call("gla", initial_state, output_final_state, mode, cu_seqlens, chunk_size, backend)
    dims = _checks.qkv(call.op, q, k, v)
    _checks.shape(call.op, "gk", gk, dims[:4], "[B, T, H, K] (like q)")
    forms = _Forms(chunk_gla, recurrent_gla, "gla", {"scale": _scale(call.op, scale, dims)})
    return _run(call, forms, (q, k, v, gk), dims, {"q": q, "k": k, "v": v, "gk": gk}, v.dtype)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False, mode="chunk",
               cu_seqlens=None, chunk_size=64, backend="auto", use_qk_l2norm_in_kernel=False):
    """DeltaNet: S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}).

    beta is [B, T, H], normally in (0, 1). ``use_qk_l2norm_in_kernel`` first L2-normalises q and
    k over K as x / sqrt(sum x^2 + 1e-6) (keys should be unit-norm for the rule to be stable).
    """
    call = _Call("delta_rule", initial_state, output_final_state, mode, cu_seqlens, chunk_size, backend)
    dims = _checks.qkv(call.op, q, k, v)
    _checks.shape(call.op, "beta", beta, dims[:3], "[B, T, H]")
    forms = _Forms(chunk_gated_delta_rule, recurrent_gated_delta_rule, "gated_delta_rule",
                   _delta_kwargs(call.op, scale, dims, use_qk_l2norm_in_kernel))
    return _run(call, forms, (q, k, v, None, beta), dims, {"q": q, "k": k, "v": v, "beta": beta}, v.dtype)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     mode="chunk", cu_seqlens=None, chunk_size=64, backend="auto",
                     use_qk_l2norm_in_kernel=False):
    """Gated DeltaNet: S' = exp(g_t) S_{t-1}; S_t = S' + beta_t k_t^T (v_t - k_t S').

    g and beta are [B, T, H]; ``use_qk_l2norm_in_kernel`` as in ``delta_rule``.
    """
    call = _Call("gated_delta_rule", initial_state, output_final_state, mode, cu_seqlens, chunk_size, backend)
    dims = _checks.qkv(call.op, q, k, v)
    _checks.shape(call.op, "g", g, dims[:3], "[B, T, H]")
    _checks.shape(call.op, "beta", beta, dims[:3], "[B, T, H]")
    forms = _Forms(chunk_gated_delta_rule, recurrent_gated_delta_rule, "gated_delta_rule",
                   _delta_kwargs(call.op, scale, dims, use_qk_l2norm_in_kernel))
    named = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    return _run(call, forms, (q, k, v, g, beta), dims, named, v.dtype)


def mamba2_ssd(x, dt, A, B, C, D=None, *, dt_bias=None, dt_softplus=False, initial_state=None,
               output_final_state=False, mode="chunk", cu_seqlens=None, chunk_size=64, backend="auto"):
    """Mamba2's SSD scan: h_t = exp(dt_t A) h_{t-1} + dt_t B_t^T x_t,  y_t = C_t h_t + D x_t.

    x [B, T, H, P]; dt [B, T, H], used as given (the caller adds the bias, applies softplus and
    any clamp) unless ``dt_bias`` [H] is given (added first) or ``dt_softplus=True`` (applied
    after the bias); A [H], negative (Mamba2's -exp(A_log)); B and C [B, T, G, N] with H a
    multiple of G, head h reading group h // (H / G); D None, [H] or [H, P]. No ``scale``.
    Returns (y [B, T, H, P] in x's dtype, final_state [B, H, N, P] or None): the [B, H, K, V]
    layout of the other ops (Mamba2 / Hugging Face caches hold its transpose [B, H, P, N]).
    """
    call = _Call("mamba2_ssd", initial_state, output_final_state, mode, cu_seqlens, chunk_size, backend)
    op = call.op
    _checks.float_tensor(op, "x", x, 4)
    batch, T, H, P = x.shape
    if T == 0:
        raise ValueError(f"{op}: sequence length T must be >= 1, got `x` of shape {tuple(x.shape)}")
    _checks.non_empty(op, "x", x)
    _checks.shape(op, "dt", dt, (batch, T, H), "[B, T, H]")
    _checks.shape(op, "A", A, (H,), "[H]")
    _checks.float_tensor(op, "B", B, 4)
    G, N = B.shape[2:]
    if B.shape[:2] != x.shape[:2] or G == 0 or H % G:
        raise ValueError(f"{op}: `B` must be [B, T, G, N] with B, T = {(batch, T)} of x and G dividing "
                         f"H={H}, got {tuple(B.shape)}")
    _checks.non_empty(op, "B", B)
    _checks.shape(op, "C", C, B.shape, "[B, T, G, N] (like B)")
    if D is not None:
        _checks.floating(op, "D", D)
        if tuple(D.shape) not in ((H,), (H, P)):
            raise ValueError(f"{op}: `D` must have shape [H] = ({H},) or [H, P] = {(H, P)}, "
                             f"got {tuple(D.shape)}")
    if dt_bias is not None:
        _checks.shape(op, "dt_bias", dt_bias, (H,), "[H]")
    forms = _Forms(chunk_ssd, recurrent_ssd, "ssd", {"A": A, "D": D, "dt_bias": dt_bias,
                                                     "dt_softplus": _checks.switch(op, "dt_softplus", dt_softplus)})
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "dt_bias": dt_bias}
    return _run(call, forms, (x, dt, B, C), (batch, T, H, N, P), named, x.dtype)


def _scale(op: str, scale, dims) -> float:
    """None means K ** -0.5."""
    if scale is None:
        return dims[3] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise ValueError(f"{op}: `scale` must be a number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):  # else the result check would blame an overflow of finite inputs
        raise ValueError(f"{op}: `scale` must be finite, got {scale}")
    return float(scale)


def _delta_kwargs(op: str, scale, dims, use_qk_l2norm_in_kernel) -> dict:
    """The keyword arguments of both delta-rule ops' forms."""
    return {"scale": _scale(op, scale, dims),
            "use_qk_l2norm_in_kernel": _checks.switch(op, "use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)}


def _triton_ops():
    """The Triton backend module, imported on first use (importing triton is slow)."""
    return importlib.import_module("moekit.ops.linear_attention.triton_ops")


def _resolve_backend(call: _Call, named: dict[str, torch.Tensor | None], dims) -> str:
    """"auto" takes Triton for CUDA tensors it supports and the reference otherwise; an explicit
    "triton" that cannot run this call is an error saying why."""
    if call.backend == "reference":
        return "reference"
    on_cuda = all(t.is_cuda for t in named.values() if t is not None)
    if call.backend == "auto" and not on_cuda:
        return "reference"
    if importlib.util.find_spec("triton") is None:
        if call.backend == "auto":
            return "reference"
        raise ValueError(f"{call.op}: backend='triton' needs the triton package (pip install moekit[kernels])")
    K, V = dims[3:]
    reason = _triton_ops().unsupported(call.op, call.mode, named, K, V, call.chunk_size)
    if reason is None:
        return "triton"
    if call.backend == "auto":
        return "reference"
    raise ValueError(f"{call.op}: backend='triton' cannot run this call: {reason}; use backend='auto' "
                     "to fall back to the reference")


def _run(call: _Call, forms: _Forms, per_token: Sequence[torch.Tensor | None], dims,
         named: dict[str, torch.Tensor | None], out_dtype: torch.dtype):
    """Validate the shared options, pick the form, run it (per sequence with cu_seqlens).

    ``per_token`` are the reference form's positional [B, T, ...] inputs; ``dims`` is
    (B, T, H, K, V) of the state.
    """
    op = call.op
    _checks.options(op, call.mode, call.backend, call.chunk_size)
    _checks.switch(op, "output_final_state", call.output_final_state)
    batch, T, H, K, V = dims
    bounds = _checks.sequences(op, call.cu_seqlens, batch, T)
    num_states, layout = (batch, "[B, H, K, V]") if bounds is None else (len(bounds) - 1, "[N, H, K, V]")
    if call.initial_state is not None:
        _checks.shape(op, "initial_state", call.initial_state, (num_states, H, K, V), layout)
    named = {**named, "initial_state": call.initial_state}
    _checks.one_device(op, named)
    check = _checks.FiniteCheck(op, named)
    # every tensor the op reads goes through the check's node, so that any requested gradient reaches it
    routed = check.watch([*per_token, call.initial_state, *forms.kwargs.values()])
    n = len(per_token)
    per_token, initial_state, kwargs = routed[:n], routed[n], dict(zip(forms.kwargs, routed[n + 1:]))
    if _resolve_backend(call, named, dims) == "triton":
        kernel = getattr(_triton_ops(), forms.triton)
        o, state, nonfinite = kernel(*per_token, **kwargs, initial_state=initial_state, bounds=bounds,
                                     mode=call.mode, chunk_size=call.chunk_size)
    else:
        nonfinite = None
        fn = partial(forms.recurrent, **kwargs)
        if call.mode == "chunk":
            fn = partial(forms.chunk, **kwargs, chunk_size=call.chunk_size)
        if bounds is None:
            o, state = fn(*per_token, initial_state=initial_state)
        else:
            o, state = run_per_sequence(fn, per_token, bounds, initial_state)
    check.verify((o, state), nonfinite)
    return o.to(out_dtype), (state if call.output_final_state else None)
