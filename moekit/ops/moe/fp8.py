"""Routed experts with FP8 (DeepSeek-V3 block scaling) or MXFP8 grouped GEMMs, Triton kernels.

    from moekit.ops.moe import fp8
    out = fp8.routed_experts(x, topk_idx, topk_weight, w_up, w_down, "swiglu")          # "fp8"
    out = fp8.routed_experts_mxfp8(x, topk_idx, topk_weight, w_up, w_down, "swiglu")

The same contract as ``moekit.ops.moe.reference.routed_experts`` (differentiable in x,
topk_weight, w_up, w_down); the six GEMMs of forward + backward take E4M3 operands with block
scales and accumulate in FP32; what stays in high precision: the routing weights, the
activation and its backward, the weighted sum over top-k, and ``topk_weight``'s gradient.
The recipes and where every quantization happens are in ``fp8_recipe`` / ``fp8_reference``.
Hidden and ffn sizes must be multiples of 128.

Error vs the bf16 path: each E4M3 rounding has a relative RMS error of about 2.6 %, and an
output passes through two or three of them, so outputs and gradients differ from the float64
reference by ||err|| / ||ref|| <= 0.10 ("fp8") and <= 0.12 ("mxfp8") on Gaussian data (the
bounds ``tests/ops/test_moe_fp8.py`` asserts); the bf16 path is within 1e-2.

MXFP8 on Hopper (no MX tensor-core instruction before sm_100) keeps every MX operand as its
values in bf16, E4M3 times the block's power-of-two scale, exact, made where the operand is
quantized (``Recipe.dequantized``, ``storage``): the GEMMs are then plain bf16 ones on the same
numbers an MX GEMM multiplies (exact unless a block's amax is under about 2**-118), with FP32
accumulation. Those operands take 2 bytes an element
instead of 1 (the weights' two training layouts: twice the weights' bf16 size while a step runs,
or between calls with ``cache_fp8_weights``). On sm_100+ the two GEMMs of expert-sorted rows by a weight (down
forward, up dgrad) go through ``torch._scaled_grouped_mm`` with E8M0 scales instead
(``fp8_blackwell``): UNTESTED ON HARDWARE (its inputs are checked on the CPU only); set
``MX_SCALED_GROUPED_MM = False`` to keep the Triton kernels there too. Those GEMMs read bytes and
scales, so there every MX operand keeps that storage, and the other four GEMMs dequantize in
their K loops.

Every call quantizes both weights (in training, in both GEMM orientations). A ``WeightCache``
(``weight_cache.py``; ``MoEConfig(cache_fp8_weights=True)``) keeps those forms between calls
while the weights do not change, as in the micro-batches of a gradient-accumulation step and in
inference.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moekit.ops.first_order import refuse_create_graph
from moekit.ops.moe import fp8_blackwell, reference
from moekit.ops.moe import fp8_kernels as kernels
from moekit.ops.moe import triton_kernels as bf16_kernels
from moekit.ops.moe.checks import check_fused_operands
from moekit.ops.moe.fp8_recipe import DIM_MULTIPLE, Recipe, quantize_rows, quantize_weight, quantize_weight_both, recipe
from moekit.ops.moe.triton_meta import RoutingMeta, new_buffer, routing_meta
from moekit.ops.moe.weight_cache import WeightCache

MX_SCALED_GROUPED_MM = True  # sm_100+: MXFP8 row-by-weight GEMMs through torch._scaled_grouped_mm
# MX operands as bf16 values wherever the MX GEMMs above do not run; False keeps E4M3 bytes and
# scales, dequantized inside every GEMM's K loop: the layer's fwd+bwd 1.4-1.75x slower on the H200
# (docs/benchmarks.md), but half the bytes per operand.
MX_AS_VALUES = True


def storage(r: Recipe, device: torch.device) -> Recipe:
    """The recipe with the operand storage this device runs: MX values (``Recipe.dequantized``)
    unless MX tensor-core GEMMs take the bytes and scales."""
    scaled_mm = MX_SCALED_GROUPED_MM and fp8_blackwell.available(device)
    return replace(r, dequantized=r.mx and MX_AS_VALUES and not scaled_mm)


def quantized_rows(x: torch.Tensor, r: Recipe) -> tuple:
    """x [T, K] blocked along K as the kernels read it: (bytes, scales) or (MX values, None)."""
    if r.dequantized:
        return kernels.mx_values(x, r)[0], None
    return quantize_rows(x, r, backend="triton")


def scatter_gemm(src_q, w_q, meta: RoutingMeta, r, dtype) -> torch.Tensor:
    """``fp8_kernels.scatter_gemm``, or on sm_100+ (MX recipe) PyTorch's MXFP8 grouped GEMM."""
    if r.mx and not r.dequantized and MX_SCALED_GROUPED_MM and fp8_blackwell.available(src_q[0].device):
        out = new_buffer((meta.order.numel(), w_q[0].shape[1]), dtype, src_q[0].device)
        return fp8_blackwell.scatter_gemm(src_q, w_q, meta.counts, meta.order, out)
    return kernels.scatter_gemm(src_q, w_q, meta, r, dtype)


def quantized_weight(w: torch.Tensor, r, training: bool, cache: WeightCache | None, name: str) -> tuple:
    """(forward-orientation quantization, dgrad orientation or None outside training) of a weight."""
    def make():
        if r.dequantized:  # [E, A, B] as [E * A, B]: blocks of 32 rows never straddle two experts
            E, A, B = w.shape
            rows, cols = kernels.mx_values(w.reshape(E * A, B), r, rows=True, cols=training)
            dgrad = (cols.view(B, E, A).transpose(0, 1), None) if training else None
            return (rows.view(E, A, B), None), dgrad
        if training:  # both orientations from one read, the dgrad one kept for backward
            return quantize_weight_both(w, r, backend="triton")
        return quantize_weight(w, r, 2, backend="triton"), None
    return make() if cache is None else cache.get(name, w, (r, training), make)


class FP8RoutedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weight, w_up, w_down, activation, recipe_name, training, cache):
        r = storage(recipe(recipe_name), x.device)
        meta = routing_meta(topk_idx, w_up.shape[0])
        weight = topk_weight.detach().float().contiguous()
        w_up_q, w_up_t = quantized_weight(w_up, r, training, cache, "w_up")
        w_down_q, w_down_t = quantized_weight(w_down, r, training, cache, "w_down")
        h, a_rows, a_cols = kernels.gather_up(quantized_rows(x, r), w_up_q, weight, meta,
                                              activation, r, x.dtype, save=training)
        y = scatter_gemm(a_rows, w_down_q, meta, r, x.dtype)
        out = bf16_kernels.combine(y, topk_idx, weight, x.dtype)
        if training:
            ctx.save_for_backward(x, topk_idx, weight, h, y, *a_cols, meta.counts, meta.order, *w_up_t, *w_down_t)
            ctx.activation, ctx.recipe, ctx.weight_dtype = activation, r, topk_weight.dtype
            ctx.weight_dtypes = (w_up.dtype, w_down.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        # kernels and no-grad ops: no graph to differentiate
        refuse_create_graph("routed_experts (fp8)", "precision='bf16' with backend='reference'")
        x, topk_idx, weight, h, y, a_c, a_cs, counts, order, *weights_t = ctx.saved_tensors
        w_up_t, w_down_t = tuple(weights_t[:2]), tuple(weights_t[2:])
        r = ctx.recipe
        meta = RoutingMeta(counts, order, w_up_t[0].shape[0], topk_idx.shape[1])
        need_x, _, need_w, need_up, need_down, *_ = ctx.needs_input_grad
        dout = dout.contiguous()
        dx = dweight = dw_up = dw_down = None
        if need_w:
            dweight = kernels.weight_grad(y, dout, topk_idx).to(ctx.weight_dtype)
        if need_down:
            dw_down = kernels.grouped_wgrad(kernels.gather_cols(dout, meta, r), (a_c, a_cs), meta, r,
                                            ctx.weight_dtypes[1])
        if need_x or need_up:
            dh_rows, dh_cols = kernels.down_dgrad(quantized_rows(dout, r), w_down_t, h, weight,
                                                  meta, ctx.activation, r)
            if need_up:
                dw_up = kernels.grouped_wgrad(dh_cols, kernels.gather_cols(x, meta, r), meta, r,
                                              ctx.weight_dtypes[0])
            if need_x:
                dx = bf16_kernels.combine(scatter_gemm(dh_rows, w_up_t, meta, r, x.dtype), topk_idx, None, x.dtype)
        return dx, None, dweight, dw_up, dw_down, None, None, None, None


def check_operands(x, topk_idx, topk_weight, w_up, w_down, activation) -> None:
    """Errors naming the problem for what the FP8 kernels cannot take."""
    check_fused_operands("fp8", x, topk_idx, topk_weight, w_up, w_down, activation)
    ffn = w_down.shape[2]
    for name, size in (("hidden", x.shape[1]), ("ffn", ffn)):
        if size % DIM_MULTIPLE:
            raise ValueError(f"routed_experts (fp8): {name} size {size} is not a multiple of {DIM_MULTIPLE} "
                             "(the FP8 kernels work in whole 128-wide blocks)")


def routed_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
    recipe_name: str = "fp8",
    weight_cache: WeightCache | None = None,
) -> torch.Tensor:
    """Same contract as ``moekit.ops.moe.reference.routed_experts``, GEMMs in `recipe_name`
    ("fp8": 1x128 / 128x128 block scales; "mxfp8": MX blocks of 32, E8M0 scales); the weights'
    quantized forms come from `weight_cache` where it has them."""
    recipe(recipe_name)
    check_operands(x, topk_idx, topk_weight, w_up, w_down, activation)
    if x.shape[0] == 0:  # no tokens: nothing to launch
        return reference.routed_experts(x, topk_idx, topk_weight, w_up, w_down, activation)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weight, w_up, w_down))
    return FP8RoutedExperts.apply(x.contiguous(), topk_idx.contiguous(), topk_weight, w_up.contiguous(),
                                  w_down.contiguous(), activation, recipe_name, training, weight_cache)


def routed_experts_mxfp8(x, topk_idx, topk_weight, w_up, w_down, activation: str = "swiglu",
                         weight_cache: WeightCache | None = None) -> torch.Tensor:
    """``routed_experts`` in the MXFP8 recipe (same signature as the other backends)."""
    return routed_experts(x, topk_idx, topk_weight, w_up, w_down, activation, "mxfp8", weight_cache)
