"""Routed-expert computation behind one signature, with a backend per device.

``routed_experts(x [T, H], topk_idx [T, K], topk_weight [T, K], w_up [E, U, H], w_down [E, H, F])``
returns ``[T, H]``: each token's weighted sum of its experts' FFN outputs. ``U`` is ``2F`` for
gated activations (gate rows first, then up rows) and ``F`` for plain GELU. An index of -1
means "no expert" (a dropped assignment or padding).

``precision`` "fp8" / "mxfp8" runs the grouped GEMMs on E4M3 operands with block scales
(``fp8.py``: Triton on CUDA; ``fp8_reference.py``, the same numerics in plain PyTorch, elsewhere
or with ``backend="reference"``).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from moekit.ops.moe import grouped_mm, reference
from moekit.ops.moe.checks import check_operands
from moekit.ops.moe.weight_cache import WeightCache

_warned: set[str] = set()


def _triton_available(x: torch.Tensor) -> bool:
    return x.is_cuda and importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> str:
    """Map "auto" to a concrete backend, and fall back (with one warning) where one cannot run."""
    if backend == "auto":
        if x.dtype == torch.float64:
            return "reference"
        if _triton_available(x) and _triton_impl() is not None:
            return "triton"
        return "grouped_mm" if grouped_mm.unsupported_reason(x, w_up, w_down) is None else "reference"
    if backend == "grouped_mm":
        reason = grouped_mm.unsupported_reason(x, w_up, w_down)
        if reason is not None:
            if reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"moekit: grouped_mm backend unavailable ({reason}); using reference",
                              stacklevel=3)
            return "reference"
    if backend == "triton" and (not _triton_available(x) or _triton_impl() is None):
        raise RuntimeError("moekit: backend='triton' needs a CUDA tensor and triton installed "
                           f"(got device {x.device}); use backend='auto' to pick what is available")
    return backend


def _triton_impl():
    """The Triton backend module, or None while it is not built (kept lazy: importing triton is slow)."""
    if importlib.util.find_spec("moekit.ops.moe.triton") is None:
        return None
    return importlib.import_module("moekit.ops.moe.triton")


# Opaque to torch.compile: dynamo cannot trace the Triton launches (per-step launch choice tables,
# autotuners), nor fake-run torch._grouped_mm in float32; a compiled model runs the experts eagerly
# between its compiled graphs.
@torch.compiler.disable
def routed_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "swiglu",
    backend: str = "auto",
    precision: str = "bf16",
    weight_cache: WeightCache | None = None,
) -> torch.Tensor:
    """``weight_cache`` keeps the FP8 Triton path's quantized weights between calls (the reference
    path, slow on purpose, quantizes on every call)."""
    check_operands(x, topk_idx, topk_weight, w_up, w_down, activation)
    if precision != "bf16":
        return _low_precision(x, topk_idx, topk_weight, w_up, w_down, activation, backend, precision, weight_cache)
    chosen = resolve_backend(backend, x, w_up, w_down)
    impl = {"reference": reference, "grouped_mm": grouped_mm}.get(chosen) or _triton_impl()
    return impl.routed_experts(x, topk_idx, topk_weight, w_up, w_down, activation)


def _low_precision(x, topk_idx, topk_weight, w_up, w_down, activation, backend, precision, weight_cache):
    if precision not in ("fp8", "mxfp8"):
        raise ValueError(f"routed_experts: unknown precision {precision!r}; choose from bf16, fp8, mxfp8")
    if backend == "grouped_mm":
        raise ValueError(f"routed_experts: precision {precision!r} runs on the 'triton' (GPU) or 'reference' "
                         "backends, not 'grouped_mm'")
    if backend == "reference" or not _triton_available(x):
        if backend == "triton":
            resolve_backend(backend, x, w_up, w_down)  # raises the clear "needs a CUDA tensor" error
        from moekit.ops.moe import fp8_reference

        return fp8_reference.routed_experts(x, topk_idx, topk_weight, w_up, w_down, activation, precision)
    from moekit.ops.moe import fp8

    impl = fp8.routed_experts if precision == "fp8" else fp8.routed_experts_mxfp8
    return impl(x, topk_idx, topk_weight, w_up, w_down, activation, weight_cache=weight_cache)
