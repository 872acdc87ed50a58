"""Routed experts as fused Triton kernels (forward and backward); see ``triton_kernels``.

Forward: up-projection with the token gather in its prologue and the activation in its
epilogue -> down-projection writing each assignment's row at its (token, slot) place ->
weighted sum over K. Backward: down dgrad with the weighting, the activation backward and the
routing-weight gradient fused (so the down-projection's output is not kept), both weight
gradients grouped along the token axis, up dgrad scattered and summed over K like the forward.
Each GEMM step may instead run on ``torch._grouped_mm`` with Triton glue (``triton_vendor``),
where that is faster for the shape (``triton_choice`` decides).
Routing metadata stays on the device: past the first call for a shape (when both
implementations are timed), nothing here waits for the GPU.
"""

from __future__ import annotations

import torch
import triton

from moekit.ops.first_order import refuse_create_graph
from moekit.ops.moe import reference, triton_choice, triton_vendor
from moekit.ops.moe import triton_kernels as kernels
from moekit.ops.moe.checks import check_fused_operands
from moekit.ops.moe.triton_meta import RoutingMeta, routing_meta


class RoutedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weight, w_up, w_down, activation, store_h):
        meta = routing_meta(topk_idx, w_up.shape[0])
        weight = topk_weight.detach().float().contiguous()
        step = _Steps(x, topk_idx, w_up, w_down, activation, meta)
        h, a = step("up fwd", lambda k: k.gather_up(x, w_up, meta, activation, store_h=store_h))
        out = step("down fwd", lambda k: k.down_combine(a, w_down, meta, topk_idx, weight, x.dtype))
        if store_h:
            ctx.save_for_backward(x, topk_idx, weight, w_up, w_down, h, a, meta.counts, meta.order)
            ctx.activation = activation
            ctx.weight_dtype = topk_weight.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        # kernels and no-grad ops: no graph to differentiate
        refuse_create_graph("routed_experts (triton)", "backend='reference' or 'grouped_mm'")
        x, topk_idx, weight, w_up, w_down, h, a, counts, order = ctx.saved_tensors
        meta = RoutingMeta(counts, order, w_up.shape[0], topk_idx.shape[1])
        need_x, _, need_w, need_up, need_down, _, _ = ctx.needs_input_grad
        dout = dout.contiguous()
        step = _Steps(x, topk_idx, w_up, w_down, ctx.activation, meta)
        dx = dweight = dw_up = dw_down = None
        if need_down:
            dw_down = step("down wgrad", lambda k: k.down_wgrad(dout, a, weight, meta))
        if need_x or need_up or need_w:
            dh, dweight = step("down dgrad", lambda k: k.down_dgrad(dout, w_down, h, weight, meta, ctx.activation,
                                                                   weight_grad=need_w))
            if need_w:
                dweight = dweight.view(topk_idx.shape).to(ctx.weight_dtype)
            if need_up:
                dw_up = step("up wgrad", lambda k: k.up_wgrad(dh, x, meta))
            if need_x:
                dx = step("up dgrad", lambda k: k.up_dgrad_combine(dh, w_up, meta, topk_idx, x.dtype))
        return dx, None, dweight, dw_up, dw_down, None, None


class _TritonSteps:
    """The layer's steps on the fused Triton kernels (``triton_vendor`` has the same functions)."""

    gather_up = staticmethod(kernels.gather_up)

    @staticmethod
    def down_combine(a, w_down, meta, topk_idx, weight, dtype):
        return kernels.combine(kernels.scatter_gemm(a, w_down, meta, transpose_w=True), topk_idx, weight, dtype)

    down_dgrad = staticmethod(kernels.gather_down_dgrad)

    @staticmethod
    def down_wgrad(dout, a, weight, meta):
        return kernels.grouped_wgrad(dout, a, meta, gather_a=True, gather_b=False, weight=weight)

    @staticmethod
    def up_wgrad(dh, x, meta):
        return kernels.grouped_wgrad(dh, x, meta, gather_a=False, gather_b=True)

    @staticmethod
    def up_dgrad_combine(dh, w_up, meta, topk_idx, dtype):
        return kernels.combine(kernels.scatter_gemm(dh, w_up, meta, transpose_w=False), topk_idx, None, dtype)


class _Steps:
    """Runs a step on the implementation ``triton_choice`` picks for this layer shape."""

    def __init__(self, x, topk_idx, w_up, w_down, activation, meta: RoutingMeta):
        # Mean rows per expert, to a power of two: a new token count of the same class reuses the choice.
        rows_class = triton.next_power_of_2(x.shape[0] * meta.top_k // meta.num_experts + 1)
        self.key = (rows_class, tuple(w_up.shape), tuple(w_down.shape), meta.top_k, activation, x.dtype, x.device)
        self.on_gpu = x.is_cuda
        self.impls = {"triton": _TritonSteps}
        if triton_vendor.supported(x, w_up, w_down):
            self.impls["vendor"] = triton_vendor

    def __call__(self, name, fn):
        candidates = {impl: (lambda m=m: fn(m)) for impl, m in self.impls.items()}
        return triton_choice.run(name, self.key, candidates, self.on_gpu)


def _check(x, topk_idx, topk_weight, w_up, w_down, activation) -> None:
    check_fused_operands("triton", x, topk_idx, topk_weight, w_up, w_down, activation)


def routed_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    """Same contract as ``moekit.ops.moe.reference.routed_experts``; differentiable in x,
    topk_weight, w_up and w_down."""
    _check(x, topk_idx, topk_weight, w_up, w_down, activation)
    if x.shape[0] == 0:  # no tokens: nothing to launch
        return reference.routed_experts(x, topk_idx, topk_weight, w_up, w_down, activation)
    # The pre-activation is kept only when a backward can follow (not at inference).
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weight, w_up, w_down))
    return RoutedExperts.apply(x.contiguous(), topk_idx.contiguous(), topk_weight, w_up.contiguous(),
                               w_down.contiguous(), activation, training)
