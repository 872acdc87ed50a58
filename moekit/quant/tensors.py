"""The two quantized-tensor containers: MX (E8M0 power-of-two scales) and FP8 block-scaled."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MXParts:
    """The fields of the MX tensor types. They differ in how `scale` is laid out, so code takes
    one of them (`MXTensor`, `mxfp8.MXBlockedTensor`), never this base."""

    data: torch.Tensor
    scale: torch.Tensor
    axis: int
    elem: str
    scale_mode: str
    block: int = 32

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


@dataclass(frozen=True)
class MXTensor(MXParts):
    """MXFP8 tensor: `data` (FP8) has the input's shape; `scale` (float8_e8m0fnu) has it too,
    except that dimension `axis` is `block` times shorter (one scale per block of 32 along it).

    Both tensors store `axis` innermost in memory (it has stride 1), which is what a GEMM that
    reduces over `axis` wants: for a 2-D input quantized along axis 0 they are transposed views
    of contiguous [K, M] and [K, M / 32] buffers.
    """


@dataclass(frozen=True)
class BlockScaledTensor:
    """FP8 tensor with one float32 scale per `block` = (rows, cols) tile of its last two dims
    (DeepSeek-V3 style: (1, 128) for activations, (128, 128) for weights).

    `data` (FP8) has the input's shape [..., M, K]; `scale` is float32 [..., M / rows, K / cols];
    an element decodes as data * scale.
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]
    elem: str

    @property
    def shape(self) -> torch.Size:
        return self.data.shape
