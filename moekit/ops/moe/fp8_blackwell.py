"""MXFP8 grouped GEMM through ``torch._scaled_grouped_mm`` (sm_100+; UNTESTED ON HARDWARE).

Blackwell has MX tensor-core instructions; PyTorch reaches them through
``torch._scaled_grouped_mm(a, b, scale_a, scale_b, offs=...)`` with E4M3 operands and E8M0
scales (its FBGEMM MXFP8 kernel, "2d-3d" case: a [M, K] row-major with row groups ending at
``offs``, b [E, K, N] column-major). The scales go in cuBLAS's block-scaling-factor layout
(``to_blocked``, defined in ``moekit.quant.mxfp8.blocked``): 128 x 4 tiles of the [rows, K / 32]
scale matrix, each stored as 32 x 16, rows padded to a multiple of 128 and columns to a multiple
of 4 -- a weight per expert ([E, round_up(N, 128) * round_up(K / 32, 4)]), an activation per row
group ([sum_g round_up(M_g, 128), round_up(K / 32, 4)]).

moekit's sm_90 path (``fp8_kernels``) never calls this: Hopper has no MX instruction. The
layouts here are checked on the CPU (against PyTorch's meta kernel for this op, which
validates shapes, dtypes and strides), never on a B200: treat the first GPU run as a test.
Building the activation scales reads the group sizes on the host (one sync).
"""

from __future__ import annotations

import torch

from moekit.quant.formats import E8M0_DTYPE
from moekit.quant.mxfp8.blocked import SCALE_TILE_COLS, round_up, to_blocked


def weight_scales(scale: torch.Tensor) -> torch.Tensor:
    """Per-expert weight scales [E, N, K / 32] -> [E, round_up(N, 128) * round_up(K / 32, 4)]."""
    return torch.stack([to_blocked(s) for s in scale])


def activation_scales(scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row-grouped scales [M, K / 32] (groups end at ``offsets``) -> each group blocked on its
    own, stacked: [sum_g round_up(M_g, 128), round_up(K / 32, 4)]."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    cols = round_up(scale.shape[1], SCALE_TILE_COLS)
    parts = [to_blocked(scale[s:e]).view(-1, cols) for s, e in zip(starts, ends, strict=True) if e > s]
    return torch.cat(parts) if parts else scale.new_zeros(0, cols)


def mx_grouped_mm_args(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                       offsets: torch.Tensor) -> tuple:
    """Arguments of ``torch._scaled_grouped_mm`` for out[r] = a[r] @ w[e(r)]^T.

    a [M, K] float8_e4m3fn rows sorted by group, a_scale [M, K / 32] E8M0; w [E, N, K]
    float8_e4m3fn (K contiguous), w_scale [E, N, K / 32] E8M0; offsets [E] int32 group ends.
    """
    if a.dtype != torch.float8_e4m3fn or w.dtype != torch.float8_e4m3fn:
        raise TypeError(f"MXFP8 grouped GEMM takes float8_e4m3fn operands, got {a.dtype} and {w.dtype}")
    if a_scale.dtype != E8M0_DTYPE or w_scale.dtype != E8M0_DTYPE:
        raise TypeError(f"MXFP8 grouped GEMM takes {E8M0_DTYPE} scales, got {a_scale.dtype} and {w_scale.dtype}")
    if a.shape[1] != w.shape[2] or a.shape[1] % 32 or a_scale.shape != (a.shape[0], a.shape[1] // 32):
        raise ValueError(f"MXFP8 grouped GEMM: a {tuple(a.shape)} / a_scale {tuple(a_scale.shape)} / w "
                         f"{tuple(w.shape)} do not fit (K a multiple of 32, one scale per 32 values)")
    if offsets.dtype != torch.int32 or offsets.shape != (w.shape[0],):
        raise ValueError(f"MXFP8 grouped GEMM: offsets must be int32 [{w.shape[0]}], got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    return (a.contiguous(), w.contiguous().transpose(1, 2), activation_scales(a_scale, offsets),
            weight_scales(w_scale), offsets)


def mx_grouped_mm(a, a_scale, w, w_scale, offsets, out_dtype=torch.bfloat16) -> torch.Tensor:
    """out [M, N] = a[r] @ w[e(r)]^T per row group, MXFP8 (sm_100+ only; untested on hardware)."""
    mat_a, mat_b, scale_a, scale_b, offs = mx_grouped_mm_args(a, a_scale, w, w_scale, offsets)
    return torch._scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs=offs, out_dtype=out_dtype)


def available(device: torch.device) -> bool:
    return (device.type == "cuda" and hasattr(torch, "_scaled_grouped_mm")
            and torch.cuda.get_device_capability(device) >= (10, 0))


def float32_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales (as the MX kernels keep them) -> E8M0 bytes; NaN -> 0xFF."""
    bits = scale.contiguous().view(torch.int32)
    exp = torch.where(bits == 1 << 22, 0, (bits >> 23) & 0xFF)  # 2**-127 is the subnormal 1 << 22
    return torch.where(scale.isnan(), 0xFF, exp).to(torch.uint8).view(E8M0_DTYPE)


def scatter_gemm(src_q, w_q, counts: torch.Tensor, order: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``fp8_kernels.scatter_gemm`` for the "mxfp8" recipe through ``mx_grouped_mm``: expert-sorted
    rows (uint8 data, float32 power-of-two scales) times the expert's weight, each result row
    written to ``out`` at its (token, slot) place ``order[r]``."""
    (a, a_scale), (w, w_scale) = src_q, w_q
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    valid = int(offsets[-1]) if offsets.numel() else 0
    rows = mx_grouped_mm(a[:valid].view(torch.float8_e4m3fn), float32_to_e8m0(a_scale[:valid]),
                         w.view(torch.float8_e4m3fn), float32_to_e8m0(w_scale), offsets, out.dtype)
    out[order[:valid].long()] = rows
    return out
