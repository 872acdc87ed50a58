"""FP8 block-scaled quantization, DeepSeek-V3 style: one float32 scale (amax / max_normal) per
(1, 128) tile of an activation and per (128, 128) tile of a weight.

    from moekit.quant import fp8_block
    a = fp8_block.quantize_activation(x)     # [..., M, K], block (1, 128)
    w = fp8_block.quantize_weight(weight)    # [..., N, K], block (128, 128)
    t = fp8_block.quantize(x, block=(1, 128), elem="e4m3")
    y = fp8_block.dequantize(a)              # float32 by default
    w, w_t = fp8_block.quantize_both(weight) # and of weight^T, in one pass (square blocks)

Inputs are float32 / bfloat16 / float16 with at least two dims, and the last two must be
multiples of the block (pad first). The rules, NaN / Inf handling and the error bound are in
`reference.py`. CUDA tensors run the Triton kernel (power-of-two blocks), others the reference;
`backend="reference" | "triton"` forces one.
"""

from __future__ import annotations

import torch

from moekit.quant.formats import backend_module, check_input, element_format
from moekit.quant.fp8_block import reference
from moekit.quant.fp8_block.reference import ACTIVATION_BLOCK, WEIGHT_BLOCK
from moekit.quant.tensors import BlockScaledTensor

__all__ = ["ACTIVATION_BLOCK", "WEIGHT_BLOCK", "BlockScaledTensor", "quantize", "quantize_activation",
           "quantize_weight", "quantize_both", "dequantize"]

def quantize(x: torch.Tensor, block: tuple[int, int] = ACTIVATION_BLOCK, elem: str = "e4m3",
             backend: str = "auto") -> BlockScaledTensor:
    check_input(x)
    element_format(elem)
    reference.check_block(x, block)
    return backend_module(__name__, backend, x).quantize(x, block, elem)


def quantize_activation(x: torch.Tensor, elem: str = "e4m3", backend: str = "auto") -> BlockScaledTensor:
    return quantize(x, ACTIVATION_BLOCK, elem, backend)


def quantize_weight(w: torch.Tensor, elem: str = "e4m3", backend: str = "auto") -> BlockScaledTensor:
    return quantize(w, WEIGHT_BLOCK, elem, backend)


def quantize_both(x: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK, elem: str = "e4m3",
                  backend: str = "auto") -> tuple[BlockScaledTensor, BlockScaledTensor]:
    """(quantize(x, block), quantize(x^T, block)) [..., M, K] / [..., K, M] in one pass over x.
    With a square block the two share their tiles, so the second is the first transposed."""
    check_input(x)
    element_format(elem)
    reference.check_block(x, block)
    if block[0] != block[1]:
        raise ValueError(f"quantize_both needs a square block (its tiles serve both layouts), got {block}")
    return backend_module(__name__, backend, x).quantize_both(x, block, elem)


def dequantize(t: BlockScaledTensor, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    if not isinstance(t, BlockScaledTensor):
        raise TypeError(f"fp8_block.dequantize takes a BlockScaledTensor, got {type(t).__name__}")
    return backend_module(__name__, backend, t.data).dequantize(t, dtype)
