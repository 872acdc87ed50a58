"""The MoE layer's grouped GEMMs on ``torch._grouped_mm`` (cuBLAS / CUTLASS), with Triton glue.

Where experts get many rows and large weights (mixtral: ~2048 rows per expert, 4096 x 14336)
the vendor grouped GEMM can beat the fused Triton kernels; ``triton_choice`` times both per
shape and keeps the faster, step by step. Each function here computes exactly what its
counterpart in ``triton.py`` computes, in the same layouts: rows are expert-sorted
(``meta.order``); rows past ``sum(counts)`` (dropped slots) are left unwritten and never read.

Glue kernels (plain-PyTorch counterparts in ``triton_reference``):

- ``gather_rows``: ``out[r] = src[order[r] // K]``, optionally times the routing weight.
- ``act_rows``: the activation of sorted up-projection rows.
- ``act_rows_backward``: weighted ``dA`` through the activation's backward, and the routing
  weight's gradient ``<dA, act(h)>`` from the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.ops.activations import is_gated
from moekit.ops.moe import grouped_mm
from moekit.ops.moe.triton_kernels import ACT_CODES, _act, _act_grad, _pow2, combine, persistent_programs
from moekit.ops.moe.triton_meta import RoutingMeta, new_buffer


def supported(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> bool:
    """On a GPU only bf16 (the dtype it has been measured and checked in); on the CPU wherever
    ``_grouped_mm`` runs (the tests)."""
    if x.is_cuda and x.dtype != torch.bfloat16:
        return False
    return grouped_mm.unsupported_reason(x, w_up, w_down) is None


# ----------------------------------------------------------------------------- glue kernels

@triton.jit
def _valid_rows(counts_ptr, num_experts, E_PAD: tl.constexpr):
    e = tl.arange(0, E_PAD)
    return tl.sum(tl.load(counts_ptr + e, mask=e < num_experts, other=0), 0)


# Each glue kernel is persistent over rows (``_row_programs``): its programs loop over the valid
# rows only, a count read on the device, so dropped slots cost neither a copy nor a program.
# ``disable_licm`` where it saves registers in the sm_90 build (benchmarks/compile_check_moe.py);
# ``tl.cast`` of the row: the interpreter's loop variable is an int.

@triton.jit
def _gather_rows_kernel(src_ptr, out_ptr, counts_ptr, order_ptr, weight_ptr, num_experts, top_k, N,
                        stride_src, stride_out, E_PAD: tl.constexpr, SCALE: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    for r in tl.range(tl.program_id(0), _valid_rows(counts_ptr, num_experts, E_PAD), tl.num_programs(0),
                      disable_licm=True):
        assignment = tl.load(order_ptr + r)
        row = tl.load(src_ptr + (assignment // top_k).to(tl.int64) * stride_src + cols, mask=ok)
        if SCALE:
            row = row.to(tl.float32) * tl.load(weight_ptr + assignment).to(tl.float32)
        tl.store(out_ptr + tl.cast(r, tl.int64) * stride_out + cols, row.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _act_rows_kernel(h_ptr, a_ptr, counts_ptr, num_experts, F, stride_h, stride_a,
                     E_PAD: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK_F: tl.constexpr):
    fs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    ok = fs < F
    for r in tl.range(tl.program_id(0), _valid_rows(counts_ptr, num_experts, E_PAD), tl.num_programs(0),
                      disable_licm=True):
        r64 = tl.cast(r, tl.int64)
        h_ptrs = h_ptr + r64 * stride_h + fs
        act = _act(tl.load(h_ptrs, mask=ok).to(tl.float32), ACT)
        if GATED:
            act = act * tl.load(h_ptrs + F, mask=ok).to(tl.float32)
        tl.store(a_ptr + r64 * stride_a + fs, act.to(a_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _act_rows_backward_kernel(da_ptr, h_ptr, dh_ptr, dweight_ptr, counts_ptr, order_ptr, weight_ptr,
                              num_experts, F, stride_da, stride_h, stride_dh,
                              E_PAD: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                              WEIGHT_GRAD: tl.constexpr, BLOCK_F: tl.constexpr):
    """Per sorted row: dh = w * dA through the activation; dweight = <dA, act(h)> (unweighted dA)."""
    for r in range(tl.program_id(0), _valid_rows(counts_ptr, num_experts, E_PAD), tl.num_programs(0)):
        assignment = tl.load(order_ptr + r)
        w = tl.load(weight_ptr + assignment).to(tl.float32)
        r64 = tl.cast(r, tl.int64)
        dot = tl.zeros((BLOCK_F,), dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            fs = f0 + tl.arange(0, BLOCK_F)
            ok = fs < F
            da = tl.load(da_ptr + r64 * stride_da + fs, mask=ok, other=0.0).to(tl.float32)
            h_ptrs = h_ptr + r64 * stride_h + fs
            dh_ptrs = dh_ptr + r64 * stride_dh + fs
            gate = tl.load(h_ptrs, mask=ok, other=0.0).to(tl.float32)
            act = _act(gate, ACT)
            if GATED:
                up = tl.load(h_ptrs + F, mask=ok, other=0.0).to(tl.float32)
                tl.store(dh_ptrs, (w * da * up * _act_grad(gate, ACT)).to(dh_ptr.dtype.element_ty), mask=ok)
                tl.store(dh_ptrs + F, (w * da * act).to(dh_ptr.dtype.element_ty), mask=ok)
                act = act * up
            else:
                tl.store(dh_ptrs, (w * da * _act_grad(gate, ACT)).to(dh_ptr.dtype.element_ty), mask=ok)
            dot += da * act
        if WEIGHT_GRAD:
            tl.store(dweight_ptr + assignment, tl.sum(dot, 0))


# Blocks of 4 warps per SM, all column blocks together: each row is one short copy, so many must be
# in flight to cover memory latency, yet all resident at once (one wave). 16 fill an SM's 2048
# threads at <= 32 registers; the backward kernel's 40-44 registers leave room for 10.
GLUE_PROGRAMS_PER_SM = 16
GLUE_BACKWARD_PROGRAMS_PER_SM = 10


def _row_programs(meta: RoutingMeta, device: torch.device, col_blocks: int = 1,
                  per_sm: int = GLUE_PROGRAMS_PER_SM) -> int:
    """Programs along the rows of a glue launch with ``col_blocks`` column blocks."""
    return persistent_programs(meta.order.numel(), device, max(1, per_sm // col_blocks))


def gather_rows(src: torch.Tensor, meta: RoutingMeta, weight: torch.Tensor | None = None) -> torch.Tensor:
    """[T*K, N] expert-sorted: ``src[order[r] // K]`` (times ``weight[order[r]]``), valid rows only."""
    num_rows, N = meta.order.numel(), src.shape[1]
    out = new_buffer((num_rows, N), src.dtype, src.device)
    block = min(1024, _pow2(N))
    cols = triton.cdiv(N, block)
    _gather_rows_kernel[(_row_programs(meta, src.device, cols), cols)](
        src, out, meta.counts, meta.order, meta.counts if weight is None else weight, meta.num_experts,
        meta.top_k, N, src.stride(0), out.stride(0), E_PAD=_pow2(meta.num_experts), SCALE=weight is not None,
        BLOCK_N=block)
    return out


def act_rows(h: torch.Tensor, meta: RoutingMeta, activation: str) -> torch.Tensor:
    gated = is_gated(activation)
    F = h.shape[1] // 2 if gated else h.shape[1]
    a = new_buffer((h.shape[0], F), h.dtype, h.device)
    block = min(1024, _pow2(F))
    cols = triton.cdiv(F, block)
    _act_rows_kernel[(_row_programs(meta, h.device, cols), cols)](
        h, a, meta.counts, meta.num_experts, F, h.stride(0), a.stride(0),
        E_PAD=_pow2(meta.num_experts), GATED=gated, ACT=ACT_CODES[activation], BLOCK_F=block)
    return a


def act_rows_backward(da: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, meta: RoutingMeta,
                      activation: str, weight_grad: bool):
    """(dh [T*K, U] sorted rows, dweight [T*K] fp32 by assignment, 0 for dropped slots, or None)."""
    F = da.shape[1]
    dh = new_buffer(h.shape, h.dtype, h.device)
    dweight = torch.zeros(meta.order.numel() if weight_grad else 1, dtype=torch.float32, device=h.device)
    _act_rows_backward_kernel[(_row_programs(meta, h.device, per_sm=GLUE_BACKWARD_PROGRAMS_PER_SM),)](
        da, h, dh, dweight, meta.counts, meta.order, weight, meta.num_experts, F,
        da.stride(0), h.stride(0), dh.stride(0), E_PAD=_pow2(meta.num_experts), GATED=is_gated(activation),
        ACT=ACT_CODES[activation], WEIGHT_GRAD=weight_grad, BLOCK_F=min(1024, _pow2(F)))
    return dh, dweight if weight_grad else None


# ----------------------------------------------------------------------------- the layer's steps

def _offsets(meta: RoutingMeta) -> torch.Tensor:
    return torch.cumsum(meta.counts, 0, dtype=torch.int32)


def _slot_rows(meta: RoutingMeta) -> torch.Tensor:
    """Inverse of ``order``: the sorted row of each (token, slot)."""
    slot_row = torch.empty_like(meta.order)
    slot_row[meta.order.long()] = torch.arange(meta.order.numel(), dtype=slot_row.dtype, device=slot_row.device)
    return slot_row


def gather_up(x, w_up, meta, activation, store_h):
    h = torch._grouped_mm(gather_rows(x, meta), w_up.transpose(1, 2), offs=_offsets(meta))
    return (h if store_h else None), act_rows(h, meta, activation)


def down_combine(a, w_down, meta, topk_idx, weight, dtype):
    y = torch._grouped_mm(a, w_down.transpose(1, 2), offs=_offsets(meta))
    return combine(y, topk_idx, weight, dtype, slot_row=_slot_rows(meta))


def down_dgrad(dout, w_down, h, weight, meta, activation, weight_grad):
    da = torch._grouped_mm(gather_rows(dout, meta), w_down, offs=_offsets(meta))
    return act_rows_backward(da, h, weight, meta, activation, weight_grad)


def down_wgrad(dout, a, weight, meta):
    return torch._grouped_mm(gather_rows(dout, meta, weight).t(), a, offs=_offsets(meta))


def up_wgrad(dh, x, meta):
    return torch._grouped_mm(dh.t(), gather_rows(x, meta), offs=_offsets(meta))


def up_dgrad_combine(dh, w_up, meta, topk_idx, dtype):
    buf = torch._grouped_mm(dh, w_up, offs=_offsets(meta))
    return combine(buf, topk_idx, None, dtype, slot_row=_slot_rows(meta))
