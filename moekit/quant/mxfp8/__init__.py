"""MXFP8 (OCP Microscaling v1.0): FP8 elements with one E8M0 power-of-two scale per 32 values.

    from moekit.quant import mxfp8
    t = mxfp8.quantize(x, axis=-1, elem="e4m3", scale_mode="floor")   # -> MXTensor
    y = mxfp8.dequantize(t)                                           # float32 by default
    rows, cols = mxfp8.quantize_both(x2d)                             # one pass, both layouts
    rows, cols = mxfp8.quantize_both(x2d, scale_layout="blocked")     # scales as sm_100 GEMMs read them

Inputs are float32 / bfloat16 / float16; the blocked axis must be a multiple of 32 (pad it
first: padding would need its own bookkeeping in every consumer). `elem` is "e4m3" or "e5m2";
`scale_mode` is "floor" (the spec's rule) or "rceil" (the scale rounded up so nothing
saturates). Scales are `torch.float8_e8m0fnu`. The rules, NaN / Inf handling and the error
bound are in `reference.py`. `scale_layout="blocked"` (2-D input) returns `MXBlockedTensor`s, the
scales in cuBLAS's block-scaling layout (`blocked.py`); `dequantize` takes plain ones. CUDA
tensors run the Triton kernels, others the reference; `backend="reference" | "triton"` forces one.
"""

from __future__ import annotations

import torch

from moekit.quant.formats import backend_module, check_input, check_scale_mode, element_format
from moekit.quant.mxfp8.blocked import MXBlockedTensor, check_scale_layout
from moekit.quant.tensors import MXTensor

__all__ = ["MXTensor", "MXBlockedTensor", "quantize", "quantize_both", "dequantize"]

def _check_format(elem: str, scale_mode: str, scale_layout: str, ndim: int) -> None:
    element_format(elem)
    check_scale_mode(scale_mode)
    check_scale_layout(scale_layout, ndim)


def quantize(x: torch.Tensor, axis: int = -1, elem: str = "e4m3", scale_mode: str = "floor",
             backend: str = "auto", scale_layout: str = "plain") -> MXTensor | MXBlockedTensor:
    check_input(x)
    _check_format(elem, scale_mode, scale_layout, x.ndim)
    return backend_module(__name__, backend, x).quantize(x, axis, elem, scale_mode, scale_layout)


def quantize_both(x: torch.Tensor, elem: str = "e4m3", scale_mode: str = "floor", backend: str = "auto",
                  scale_layout: str = "plain") -> tuple[MXTensor, MXTensor] | tuple[MXBlockedTensor, MXBlockedTensor]:
    """Row-wise (axis 1) and column-wise (axis 0, stored [K, M]) quantization of 2-D `x` [M, K]."""
    check_input(x)
    _check_format(elem, scale_mode, scale_layout, x.ndim)
    return backend_module(__name__, backend, x).quantize_both(x, elem, scale_mode, scale_layout)


def dequantize(t: MXTensor, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    if not isinstance(t, MXTensor):
        raise TypeError(f"mxfp8.dequantize takes an MXTensor, got {type(t).__name__}")
    return backend_module(__name__, backend, t.data).dequantize(t, dtype)
