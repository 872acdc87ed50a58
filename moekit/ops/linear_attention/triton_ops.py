"""Triton backend of the linear-attention ops: autograd Functions and the entry points that
``__init__`` dispatches to.

Built: simple GLA (so linear attention, lightning attention, retention and Mamba2's SSD), the
(gated) delta rule and GLA, chunked forward + backward; a fused recurrent forward for every op.

Inputs are [B, T, H, D] (or B == 1 packed with ``bounds``); they are viewed as [tokens, H, D]
with B sequences of length T when there are no bounds. The recurrent form is forward-only: when
autograd needs gradients it runs the chunked Function instead (the same function).
"""

from __future__ import annotations

import os

import torch

from moekit.ops.first_order import refuse_create_graph
from moekit.ops.linear_attention import triton_chunk as kc
from moekit.ops.linear_attention._common import l2norm
from moekit.ops.linear_attention.mamba2 import ssd_terms, with_skip
from moekit.ops.linear_attention.triton_gla import ChunkGLA
from moekit.ops.linear_attention.triton_layout import (
    CHUNK_SIZES,
    MAX_HEAD_DIM,
    MAX_KEY_DIM_STAGED,
    SUPPORTED_DTYPES,
    Chunks,
    chunk_cumsum,
    chunk_tables,
)
from moekit.ops.linear_attention.triton_recurrent import recurrent_fwd


class ChunkScalarGate(torch.autograd.Function):
    """Chunked simple GLA (beta None) or (gated) delta rule (beta given); g None = no decay.

    vs (simple GLA only, float32 [tokens, H] or None) scales v's rows inside the kernels: Mamba2
    passes v = x and vs = dt, so dt x is never rounded to x's dtype (that rounding was the largest
    error of dA, a sum over all tokens).

    Returns (o, final state, nonfinite): nonfinite is int32 [1], set to 1 by the kernels that write
    o and the final state when either holds NaN or inf (the finite check's verdict)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, chunks, store_final, vs=None):
        delta = beta is not None
        if delta and vs is not None:
            raise ValueError("ChunkScalarGate: a v scale (vs) is for simple GLA, not the delta rule")
        gc = chunk_cumsum(g, chunks) if g is not None else None
        T = w = None
        nonfinite = torch.zeros(1, dtype=torch.int32, device=q.device)
        if delta:
            T, w, u = kc.wy_fwd(k, v, beta, gc, chunks)
            h, v_new, ht = kc.state_fwd(k, u, w, gc, h0, chunks, store_final, v.dtype, nonfinite)
        else:
            h, _, ht = kc.state_fwd(k, v, None, gc, h0, chunks, store_final, v.dtype, nonfinite, vs)
            v_new = v
        o = kc.output_fwd(q, k, v_new, gc, h, chunks, scale, v.dtype, nonfinite, vs)
        ctx.save_for_backward(q, k, v, beta, gc, h0, h, v_new, T, w, vs)
        ctx.scale, ctx.chunks, ctx.g_dtype = scale, chunks, None if g is None else g.dtype
        ctx.mark_non_differentiable(nonfinite)
        ctx.set_materialize_grads(False)  # an unused final state's gradient stays None, not a zero tensor
        return o, ht, nonfinite

    @staticmethod
    def backward(ctx, do, dht, _):
        refuse_create_graph("linear attention (triton)", "backend='reference'")  # kernels: no graph to differentiate
        q, k, v, beta, gc, h0, h, v_new, T, w, vs = ctx.saved_tensors
        chunks, scale = ctx.chunks, ctx.scale
        delta = beta is not None
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        dv_dtype = torch.float32 if vs is not None else v.dtype
        if delta:  # dh reads dv: the reverse pass finishes it (ungated: all of it, see state_bwd)
            dv_loc = kc.dv_local(q, k, do, gc, chunks, scale) if gc is not None else None
            dh, dv_state, dh0 = kc.state_bwd(q, k, w, gc, do, dv_loc, dht, chunks, scale, dv_dtype,
                                             want_dh0=h0 is not None)
        else:  # float32 dh where a learned gate (or Mamba2's dt scale) takes its gradient through it
            exact_dh = vs is not None or (gc is not None and ctx.needs_input_grad[3])
            dh, _, dh0 = kc.state_bwd(q, k, None, gc, do, None, dht, chunks, scale, dv_dtype,
                                      want_dh0=h0 is not None, exact_dh=exact_dh)
            dv_state = kc.dv_local(q, k, do, gc, chunks, scale, dh=dh, dtype=dv_dtype)
        dq, dk, dw, dgc = kc.dqk(q, k, v_new, h, dh, do, dv_state if delta else None, gc, chunks, scale, vs)
        dbeta = None
        if delta:
            dgc_wy = torch.zeros_like(gc) if gc is not None else None
            dv, dbeta = kc.wy_bwd(k, v, beta, gc, T, dw, dv_state, dk, dgc_wy, chunks, v.dtype)
            dbeta = dbeta.to(beta.dtype)
            if gc is not None:
                dgc = dgc + dgc_wy
        else:
            dv = dv_state
        dvs = None
        if vs is not None:  # dv_state is the float32 gradient of the scaled v
            dvs = (dv * v.float()).sum(-1)
            dv = (dv * vs.unsqueeze(-1)).to(v.dtype)
        dg = None if gc is None else chunk_cumsum(dgc, chunks, reverse=True).to(ctx.g_dtype)
        return dq, dk, dv, dg, dbeta, dh0, None, None, None, dvs


def unsupported(op: str, mode: str, tensors: dict[str, torch.Tensor | None], K: int, V: int,
                chunk_size: int) -> str | None:
    """Why the Triton backend cannot run this call, or None when it can."""
    present = [t for t in tensors.values() if t is not None]
    if not all(t.is_cuda for t in present) and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"
    dtype = tensors[next(iter(tensors))].dtype
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernels take {', '.join(map(str, SUPPORTED_DTYPES))} inputs, got {dtype}"
    wide = [name for name, t in tensors.items() if t is not None and t.dtype == torch.float64]
    if wide:  # the kernels keep float32 states: a float64 gate or state would come back float32
        return f"the Triton kernels compute in float32, got float64 {', '.join(wide)}"
    if max(K, V) > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims K, V <= {MAX_HEAD_DIM}, got K={K}, V={V}"
    if op in ("delta_rule", "gated_delta_rule", "gla") and K > MAX_KEY_DIM_STAGED:
        return f"the Triton {op} kernels take K <= {MAX_KEY_DIM_STAGED}, got K={K}"
    if mode == "chunk" and chunk_size not in CHUNK_SIZES:
        return f"the Triton chunk kernels take chunk_size in {CHUNK_SIZES}, got {chunk_size}"
    return None


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors.values())


def _packed(x: torch.Tensor | None) -> torch.Tensor | None:
    """[B, T, H, ...] -> contiguous [B * T, H, ...]."""
    return None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


# Opaque to torch.compile: dynamo cannot trace the Triton launches (autotuners), so a compiled
# model runs the kernels eagerly between its compiled graphs.
@torch.compiler.disable
def _run(q, k, v, **kwargs):
    """Launches on the inputs' device (Triton uses the current CUDA device)."""
    if not q.is_cuda:
        return _run_here(q, k, v, **kwargs)
    with torch.cuda.device(q.device):
        return _run_here(q, k, v, **kwargs)


def _run_here(q, k, v, *, g=None, gk=None, beta=None, vs=None, scale: float, initial_state=None, bounds=None,
              mode: str, chunk_size: int):
    """vs: optional float32 [B, T, H] scale of v's rows (simple GLA), see ChunkScalarGate."""
    B, T, H, _ = q.shape
    bounds = list(range(0, B * T + 1, T)) if bounds is None else bounds
    packed = [_packed(x) for x in (q, k, v, g, gk, beta, vs)]
    h0 = None if initial_state is None else initial_state.float().contiguous()
    inputs = dict(zip(("q", "k", "v", "g", "gk", "beta", "vs", "h0"), (q, k, v, g, gk, beta, vs, initial_state)))
    pq, pk, pv, pg, pgk, pbeta, pvs = packed
    if mode == "recurrent" and not _needs_grad(inputs):
        if pvs is not None:  # the forward-only recurrent kernel takes the scaled v
            pv = (pv.float() * pvs.unsqueeze(-1)).to(pv.dtype)
        chunks = chunk_tables(bounds, 1, q.device)
        o, ht = recurrent_fwd(pq, pk, pv, chunks, scale=scale, g=pg, gk=pgk, beta=pbeta, h0=h0)
        nonfinite = None
    else:
        chunks: Chunks = chunk_tables(bounds, chunk_size if mode == "chunk" else 64, q.device)
        if pgk is not None:
            o, ht = ChunkGLA.apply(pq, pk, pv, pgk, h0, scale, chunks)
            nonfinite = None
        else:
            o, ht, nonfinite = ChunkScalarGate.apply(pq, pk, pv, pg, pbeta, h0, scale, chunks, True, pvs)
    return o.reshape(*v.shape[:2], H, v.shape[-1]), ht, nonfinite


def simple_gla(q, k, v, g, *, scale: float, initial_state=None, bounds=None, mode="chunk", chunk_size=64):
    """The reference forms' contract (g None = linear attention); returns (o, final_state, nonfinite):
    nonfinite is the kernels' int32 [1] flag that o or the final state is not finite, or None where
    this path has none (the finite check then reads the results)."""
    return _run(q, k, v, g=g, scale=scale, initial_state=initial_state, bounds=bounds, mode=mode,
                chunk_size=chunk_size)


def gla(q, k, v, gk, *, scale: float, initial_state=None, bounds=None, mode="chunk", chunk_size=64):
    return _run(q, k, v, gk=gk, scale=scale, initial_state=initial_state, bounds=bounds, mode=mode,
                chunk_size=chunk_size)


def gated_delta_rule(q, k, v, g, beta, *, scale: float, initial_state=None, bounds=None, mode="chunk",
                     chunk_size=64, use_qk_l2norm_in_kernel: bool = False):
    """g None = DeltaNet. The optional q/k L2 normalisation runs in PyTorch before the kernels."""
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.float()).to(q.dtype), l2norm(k.float()).to(k.dtype)
    return _run(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state, bounds=bounds, mode=mode,
                chunk_size=chunk_size)


def ssd(x, dt, B, C, *, A, D=None, dt_bias=None, dt_softplus=False, initial_state=None, bounds=None,
        mode="chunk", chunk_size=64):
    """Mamba2's SSD as simple GLA: q = C, k = B, v = x scaled by dt inside the kernels (in float32),
    g = dt A, scale 1."""
    q, k, dt, g = ssd_terms(x, dt, A, B, C, dt_bias, dt_softplus, qk_dtype=x.dtype)
    y, h, nonfinite = _run(q, k, x, g=g, vs=dt, scale=1.0, initial_state=initial_state, bounds=bounds, mode=mode,
                           chunk_size=chunk_size)
    # the skip term D x comes after the kernels: their flag cannot vouch for it
    return with_skip(y, x, D), h, nonfinite if D is None else None
