"""Low-precision formats: MXFP8 (`mxfp8`) and DeepSeek-style FP8 block scaling (`fp8_block`).

Each has a plain-PyTorch reference (the definition) and Triton kernels that match it bit for
bit; element-type constants live in `formats`, the result containers in `tensors`.
"""

from moekit.quant import fp8_block, mxfp8
from moekit.quant.tensors import BlockScaledTensor, MXTensor

__all__ = ["BlockScaledTensor", "MXTensor", "fp8_block", "mxfp8"]
