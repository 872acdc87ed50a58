"""cuBLAS's block-scaling-factor layout of MX scales ("blocked"), what MX GEMMs on sm_100 read.

The [rows, cols] E8M0 scale matrix of a 2-D MX tensor (rows: the data's other axis, cols: one
per block of 32 along the quantized axis) is padded with zeros to multiples of 128 rows and 4
columns and cut into 128 x 4 tiles, stored one after another (row-major over tiles), 512 bytes
each: element (r, c) of a tile at byte (r % 32) * 16 + (r // 32) * 4 + c. `to_blocked` is the
definition; the Triton kernels write it directly (`scale_layout="blocked"`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.quant.formats import E8M0_DTYPE
from moekit.quant.tensors import MXParts, MXTensor

SCALE_TILE_ROWS, SCALE_TILE_COLS = 128, 4
SCALE_LAYOUTS = ("plain", "blocked")


@dataclass(frozen=True)
class MXBlockedTensor(MXParts):
    """An MXFP8 tensor whose scales are in the blocked layout: `data` as `MXTensor.data` (2-D);
    `scale` flat E8M0 [round_up(rows, 128) * round_up(cols, 4)], as `to_blocked` returns it for
    the [rows, cols] scale matrix (for axis 0, the scales of the transposed data: rows = K)."""


def check_scale_layout(scale_layout: str, ndim: int) -> None:
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"unknown scale_layout {scale_layout!r}; expected one of {list(SCALE_LAYOUTS)}")
    if scale_layout == "blocked" and ndim != 2:
        raise ValueError(f"scale_layout='blocked' takes a 2-D tensor (the layout of one scale matrix), "
                         f"got a {ndim}-d one; reshape it to 2-D first")


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def blocked_numel(rows: int, cols: int) -> int:
    """Bytes of the blocked layout of a [rows, cols] scale matrix (padding included)."""
    return round_up(rows, SCALE_TILE_ROWS) * round_up(cols, SCALE_TILE_COLS)


def to_blocked(scale: torch.Tensor) -> torch.Tensor:
    """[rows, cols] E8M0 scales -> the flat blocked layout of the zero-padded matrix."""
    rows, cols = scale.shape
    padded = scale.view(torch.uint8).new_zeros(round_up(rows, SCALE_TILE_ROWS), round_up(cols, SCALE_TILE_COLS))
    padded[:rows, :cols] = scale.view(torch.uint8)
    tiles = padded.view(padded.shape[0] // 128, 128, padded.shape[1] // 4, 4).permute(0, 2, 1, 3)
    # a tile's rows r = 32 * i + j: [i, j, c] -> [j, i, c]
    blocked = tiles.reshape(-1, 4, 32, 4).transpose(1, 2)
    return blocked.reshape(-1).view(E8M0_DTYPE)


def from_plain(t: MXTensor) -> MXBlockedTensor:
    """The same 2-D MX tensor with its scales blocked (the reference for the kernels' blocked output)."""
    if t.data.ndim != 2:
        raise ValueError(f"blocked scales need a 2-D MX tensor, got shape {tuple(t.data.shape)}")
    return MXBlockedTensor(t.data, to_blocked(t.scale.movedim(t.axis, -1)), t.axis, t.elem, t.scale_mode, t.block)
