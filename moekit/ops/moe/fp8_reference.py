"""The FP8 / MXFP8 routed-expert recipe in plain PyTorch: the definition `fp8.py` must match.

Every GEMM operand is quantized (`fp8_recipe`), dequantized to float32 and multiplied in
float32, which is what the kernels compute with FP8 tensor-core products and per-block scales
(up to float32 summation order). The dataflow, which fixes where each rounding happens:

    forward   h = Q(x)[token] @ Q(w_up[e])^T                    fp32; kept as h.to(x.dtype)
              a = act(h)                                         fp32, quantized twice:
                  Q_rows(a) for the down GEMM, Q_cols(w * a) for dW_down
              y = Q_rows(a) @ Q(w_down[e])^T                     stored in x.dtype
              out[t] = sum_k w[t, k] * y[t, k]                   fp32 sum, x.dtype
    backward  dw[t, k] = <dout[t], y[t, k]>                      fp32, no quantization
              da = (Q(dout)[token] @ Q(w_down[e])) * w          fp32
              dh = act'(h) da                                    fp32, quantized twice
              dW_down[e] = Q_cols(dout[token])^T Q_cols(w * a)
              dW_up[e]   = Q_cols(dh)^T Q_cols(x[token])
              dx[t] = sum_k Q_rows(dh) @ Q(w_up[e])             each term in x.dtype, fp32 sum

Q_rows blocks along features (1 x block), Q_cols along each expert's rows (block x 1, blocks
starting at the expert's first row), weights as the recipe says. Index -1 means no expert.
Slow on purpose (a loop over experts); any device, float32 / bfloat16 / float16 inputs.
"""

from __future__ import annotations

import torch

from moekit.ops.activations import GATED, apply_activation, is_gated
from moekit.ops.first_order import refuse_create_graph
from moekit.ops.moe.fp8_recipe import Recipe, dequantize_rows, quantize_rows, quantize_weight, recipe
from moekit.ops.moe.triton_meta import routing_meta_torch


def qdq_rows(v: torch.Tensor, r: Recipe) -> torch.Tensor:
    return dequantize_rows(*quantize_rows(v, r, backend="reference"), r.block)


def qdq_weight(w: torch.Tensor, r: Recipe, reduce_axis: int) -> torch.Tensor:
    """Dequantized weight, oriented [E, N, K] for a GEMM reducing over `reduce_axis`."""
    data, scale = quantize_weight(w, r, reduce_axis, backend="reference")
    scale = scale.repeat_interleave(r.weight_rows, 1).repeat_interleave(r.block, 2)
    return data.view(torch.float8_e4m3fn).float() * scale


def qdq_expert_cols(v: torch.Tensor, counts: list[int], r: Recipe) -> torch.Tensor:
    """Quantize-dequantize [rows, P] (expert-sorted) in blocks of r.block rows per expert."""
    out, start = [], 0
    for c in counts:
        seg = v[start:start + c]
        if c == 0:
            continue
        padded = torch.cat([seg, seg.new_zeros((-c) % r.block, seg.shape[1])])
        out.append(qdq_rows(padded.t().contiguous(), r).t()[:c])
        start += c
    return torch.cat(out) if out else v


def activation_backward(h: torch.Tensor, da: torch.Tensor, activation: str) -> torch.Tensor:
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        (dh,) = torch.autograd.grad(apply_activation(h, activation), h, da)
    return dh


class _Routing:
    """Expert-sorted rows of the valid assignments: expert, token, assignment, per-expert counts."""

    def __init__(self, topk_idx: torch.Tensor, num_experts: int):
        meta = routing_meta_torch(topk_idx, num_experts)  # independent of the kernels it checks
        self.counts = meta.counts.tolist()
        self.assignment = meta.order[: sum(self.counts)].long()
        self.token = self.assignment // topk_idx.shape[1]
        self.expert = torch.repeat_interleave(torch.arange(num_experts, device=topk_idx.device), meta.counts.long())

    def per_expert(self):
        start = 0
        for e, c in enumerate(self.counts):
            yield e, slice(start, start + c)
            start += c


def _grouped(rows: torch.Tensor, w: torch.Tensor, routing: _Routing) -> torch.Tensor:
    """out[r] = rows[r] @ w[expert(r)]^T, w [E, N, K] (a loop over experts)."""
    out = rows.new_zeros(rows.shape[0], w.shape[1])
    for e, s in routing.per_expert():
        out[s] = rows[s] @ w[e].t()
    return out


def _grouped_wgrad(a: torch.Tensor, b: torch.Tensor, routing: _Routing, num_experts: int) -> torch.Tensor:
    dw = a.new_zeros(num_experts, a.shape[1], b.shape[1])
    for e, s in routing.per_expert():
        dw[e] = a[s].t() @ b[s]
    return dw


def _sum_slots(rows: torch.Tensor, routing: _Routing, topk_idx: torch.Tensor, weight, dtype) -> torch.Tensor:
    """out[t] = sum over valid slots of (weight) * rows(t, k), in float32, then `dtype`."""
    T, K = topk_idx.shape
    buf = torch.zeros(T * K, rows.shape[1], device=rows.device)
    buf[routing.assignment] = rows.to(dtype).float()
    buf = buf.view(T, K, rows.shape[1])  # not -1: T may be 0
    if weight is not None:
        buf = buf * torch.where(topk_idx >= 0, weight, 0)[..., None]
    return buf.sum(1).to(dtype)


class FP8RoutedExpertsReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weight, w_up, w_down, activation, recipe_name):
        r = recipe(recipe_name)
        routing = _Routing(topk_idx, w_up.shape[0])
        weight = topk_weight.detach().float()
        w_row = weight.reshape(-1)[routing.assignment, None]
        h = _grouped(qdq_rows(x.float(), r)[routing.token], qdq_weight(w_up, r, 2), routing)
        a = apply_activation(h, activation)
        y = _grouped(qdq_rows(a, r), qdq_weight(w_down, r, 2), routing).to(x.dtype)
        ctx.save_for_backward(x, topk_idx, weight, w_up, w_down, h.to(x.dtype), y,
                              qdq_expert_cols(w_row * a, routing.counts, r))
        ctx.routing, ctx.recipe, ctx.activation = routing, r, activation
        ctx.weight_dtype = topk_weight.dtype
        return _sum_slots(y, routing, topk_idx, weight, x.dtype)

    @staticmethod
    def backward(ctx, dout):
        # kernels and no-grad ops: no graph to differentiate
        refuse_create_graph("routed_experts (fp8 reference)", "precision='bf16'")
        x, topk_idx, weight, w_up, w_down, h, y, a_cols = ctx.saved_tensors
        routing, r = ctx.routing, ctx.recipe
        E = w_up.shape[0]
        dout32 = dout.float()
        y_slots = torch.zeros(topk_idx.numel(), y.shape[1], device=y.device)
        y_slots[routing.assignment] = y.float()
        dweight = (y_slots.view(*topk_idx.shape, y.shape[1]) * dout32[:, None, :]).sum(-1)
        dweight = torch.where(topk_idx >= 0, dweight, 0).to(ctx.weight_dtype)
        w_row = weight.reshape(-1)[routing.assignment, None]
        da = _grouped(qdq_rows(dout32, r)[routing.token], qdq_weight(w_down, r, 1), routing) * w_row
        dh = activation_backward(h.float(), da, ctx.activation)
        dw_down = _grouped_wgrad(qdq_expert_cols(dout32[routing.token], routing.counts, r), a_cols, routing, E)
        dw_up = _grouped_wgrad(qdq_expert_cols(dh, routing.counts, r),
                               qdq_expert_cols(x.float()[routing.token], routing.counts, r), routing, E)
        dx_rows = _grouped(qdq_rows(dh, r), qdq_weight(w_up, r, 1), routing)
        dx = _sum_slots(dx_rows, routing, topk_idx, None, x.dtype)
        return dx, None, dweight, dw_up.to(w_up.dtype), dw_down.to(w_down.dtype), None, None


def routed_experts(x, topk_idx, topk_weight, w_up, w_down, activation: str = "swiglu", recipe_name: str = "fp8"):
    """Same contract as `moekit.ops.moe.reference.routed_experts`, in the low-precision recipe
    `recipe_name` ("fp8" or "mxfp8"); differentiable in x, topk_weight, w_up and w_down."""
    is_gated(activation)  # raises on an unknown activation
    return FP8RoutedExpertsReference.apply(x, topk_idx, topk_weight, w_up, w_down, activation, recipe_name)


__all__ = ["routed_experts", "qdq_rows", "qdq_weight", "qdq_expert_cols", "GATED"]
