"""FP8 element formats and the E8M0 scale format (and the backend choice), shared by every quantizer in `moekit.quant`.

Constants follow the OCP 8-bit floating point spec (OFP8) and the OCP Microscaling spec v1.0:

| elem   | torch dtype          | max normal | emax | mantissa bits | min normal exp | NaN byte |
| ------ | -------------------- | ---------- | ---- | ------------- | -------------- | -------- |
| "e4m3" | torch.float8_e4m3fn  | 448        | 8    | 3             | -6             | 0x7F     |
| "e5m2" | torch.float8_e5m2    | 57344      | 15   | 2             | -14            | 0x7F     |

Casts to an element type saturate (finite values beyond max normal become +-max normal) and
round to nearest, ties to even. A block holding NaN or Inf has all its element bytes set to the
canonical NaN 0x7F (both element types decode 0x7F as NaN) so the encoding is deterministic.

Scales of MX tensors are E8M0 (an unsigned, biased power-of-two exponent: byte b means
2**(b - 127); 0xFF means NaN), stored as `torch.float8_e8m0fnu` (present since torch 2.7).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ElementFormat:
    name: str
    dtype: torch.dtype
    max_normal: float
    emax: int  # exponent of the largest normal: max_normal = 1.75 * 2**emax for both types
    mantissa_bits: int
    min_normal_exp: int
    nan_byte: int = 0x7F


ELEMENT_FORMATS = {
    "e4m3": ElementFormat("e4m3", torch.float8_e4m3fn, 448.0, 8, 3, -6),
    "e5m2": ElementFormat("e5m2", torch.float8_e5m2, 57344.0, 15, 2, -14),
}

SCALE_MODES = ("floor", "rceil")
BACKENDS = ("auto", "reference", "triton")
SUPPORTED_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

E8M0_DTYPE = torch.float8_e8m0fnu
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E8M0_MIN_EXP = -127  # byte 0x00
E8M0_MAX_EXP = 127  # byte 0xFE


def element_format(elem: str) -> ElementFormat:
    try:
        return ELEMENT_FORMATS[elem]
    except KeyError:
        raise ValueError(f"unknown FP8 element type {elem!r}; expected one of {sorted(ELEMENT_FORMATS)}") from None


def check_scale_mode(scale_mode: str) -> None:
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; expected one of {list(SCALE_MODES)}")


def check_input(x: torch.Tensor, what: str = "input") -> None:
    """Quantizers take float32 / bfloat16 / float16 (float64 would be rounded twice on the way)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(
            f"{what} has dtype {x.dtype}; quantization takes float32, bfloat16 or float16 "
            "(cast float64 to float32 first)"
        )


def normalize_axis(axis: int, ndim: int) -> int:
    if ndim == 0:
        raise ValueError("cannot quantize a 0-d tensor: it has no axis to block")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}-d tensor")
    return axis % ndim


def check_divisible(size: int, block: int, what: str) -> None:
    """Blocks never straddle an edge: pad the tensor yourself if a size is not a multiple."""
    if size % block != 0:
        raise ValueError(f"{what} has length {size}, which is not a multiple of the block size {block}; "
                         "pad it to a multiple first")


def e8m0_to_float32(scale: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 bytes (a float8_e8m0fnu or uint8 tensor) to float32 powers of two; 0xFF -> NaN."""
    b = scale.view(torch.uint8).to(torch.int32)
    # 2**-127 is a float32 subnormal (bit 22 set); every other exponent is a normal float32.
    bits = torch.where(b == 0, torch.full_like(b, 1 << 22), b << 23)
    out = bits.view(torch.float32)
    return torch.where(b == E8M0_NAN, torch.full_like(out, float("nan")), out)


def backend_module(package: str, backend: str, t: torch.Tensor):
    """The ``reference`` or ``triton`` module of the quantizer ``package`` that handles ``t``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    # An empty tensor (no tokens) has nothing to launch: the reference returns its empty result.
    if backend == "reference" or t.numel() == 0 or (backend == "auto" and t.device.type != "cuda"):
        return importlib.import_module(f"{package}.reference")
    return importlib.import_module(f"{package}.triton")  # imported lazily: importing triton is slow
