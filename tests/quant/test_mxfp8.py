"""MXFP8: Triton kernels vs the reference (bit for bit), the spec's FLOOR rule by hand, error bound,
the reference against an independent float64 definition, and input validation."""

import math

import pytest
import torch

from moekit.quant import mxfp8
from moekit.quant.formats import element_format
from moekit.quant.mxfp8 import blocked, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ELEMS = ["e4m3", "e5m2"]
MODES = ["floor", "rceil"]
POISONS = (0x5A, 0xA5)  # two, so an unwritten byte cannot match by luck


def _bytes(t):
    return t.view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) == reference, bit for bit


@pytest.mark.parametrize("scale_mode", MODES)
@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_pass_kernel_matches_reference(make_input, assert_same_bits, dtype, elem, scale_mode):
    from moekit.quant.mxfp8 import triton as mx_triton

    # (64, 128) divides the interpreter's tile (no masks: EVEN), the others do not
    for seed, shape in enumerate([(64, 96), (96, 160), (64, 128)]):
        x = make_input(shape, dtype, seed)
        rows, cols = reference.quantize_both(x, elem, scale_mode)
        expected = {"row_data": rows.data, "row_scale": rows.scale,
                    "col_data": cols.data.t(), "col_scale": cols.scale.t()}
        for poison in POISONS:
            out = mx_triton.empty_outputs(*shape, True, True, elem, x.device)
            for buf in out.values():
                buf.fill_(poison)
            mx_triton.launch_quantize(x, out, elem, scale_mode)
            for name, buf in out.items():
                assert_same_bits(buf, _bytes(expected[name]))


# (BLOCK_M, BLOCK_K, num_warps, GROUP_M, PAIRED): row groups of 8, 16 and 32 rows, one or several
# per tile, tiles taller / wider than the input (masked edges); tile orders K-major and in groups
# of row bands, the last group shorter (3 and 4 row bands of 32 in groups of 2, 4 and 8). The
# paired data path (bfloat16 only): one and two 64-column halves, one to eight 32-row warps.
TILES = [(32, 32, 4, 2, False), (64, 64, 2, 1, False), (128, 64, 4, 2, False), (128, 128, 1, 1, False),
         (64, 256, 4, 1, False), (32, 64, 2, 8, False), (32, 64, 2, 4, False), (128, 128, 8, 1, True),
         (256, 64, 8, 1, True), (128, 64, 4, 2, True), (32, 128, 1, 1, True)]


@pytest.mark.parametrize("tile", TILES)
def test_one_pass_kernel_tile_shapes(make_input, assert_same_bits, tile):
    """Every tile split the kernel may use (its row permutation depends on the tile) is exact."""
    from moekit.quant.mxfp8 import triton as mx_triton

    block_m, block_k, warps, group_m, paired = tile
    tiles = {"BLOCK_M": block_m, "BLOCK_K": block_k, "num_warps": warps, "GROUP_M": group_m, "PAIRED": paired}
    cases = [((96, 160), torch.bfloat16), ((128, 96), torch.float32)]
    if paired:  # one input the tile divides (EVEN: no masks), one it does not
        cases = [((96, 160), torch.bfloat16), ((256, 128), torch.bfloat16)]
    for seed, (shape, dtype) in enumerate(cases):
        x = make_input(shape, dtype, 30 + seed)
        rows, cols = reference.quantize_both(x, "e4m3", "rceil")
        expected = {"row_data": rows.data, "row_scale": rows.scale,
                    "col_data": cols.data.t(), "col_scale": cols.scale.t()}
        out = mx_triton.empty_outputs(*shape, True, True, "e4m3", x.device)
        for buf in out.values():
            buf.fill_(POISONS[seed])
        mx_triton.launch_quantize(x, out, "e4m3", "rceil", tiles)
        for name, buf in out.items():
            assert_same_bits(buf, _bytes(expected[name]))


@pytest.mark.parametrize("scale_mode", MODES)
@pytest.mark.parametrize("elem", ELEMS)
def test_paired_path_formats(make_input, assert_same_bits, elem, scale_mode):
    """The paired data path in every element type and scale mode, masked and not."""
    from moekit.quant.mxfp8 import triton as mx_triton

    tiles = {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 2, "PAIRED": True}
    for seed, shape in enumerate([(64, 128), (96, 224)]):
        x = make_input(shape, torch.bfloat16, 50 + seed)
        rows, cols = reference.quantize_both(x, elem, scale_mode)
        expected = {"row_data": rows.data, "row_scale": rows.scale,
                    "col_data": cols.data.t(), "col_scale": cols.scale.t()}
        out = mx_triton.empty_outputs(*shape, True, True, elem, x.device)
        for buf in out.values():
            buf.fill_(POISONS[seed])
        mx_triton.launch_quantize(x, out, elem, scale_mode, tiles)
        for name, buf in out.items():
            assert_same_bits(buf, _bytes(expected[name]))


def test_paired_path_reads_unaligned_views(make_input, assert_same_bits):
    """A bfloat16 view at an odd element offset cannot be read as int32 pairs: it is copied first."""
    from moekit.quant.mxfp8 import triton as mx_triton

    base = make_input((64, 129), torch.bfloat16, 60)
    x = base[:, 1:97]  # odd offset, odd row stride
    rows, cols = reference.quantize_both(x, "e4m3", "floor")
    out = mx_triton.empty_outputs(64, 96, True, True, "e4m3", x.device)
    mx_triton.launch_quantize(x, out, "e4m3", "floor", {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 1, "PAIRED": True})
    for name, want in [("row_data", rows.data), ("row_scale", rows.scale), ("col_data", cols.data.t()),
                       ("col_scale", cols.scale.t())]:
        assert_same_bits(out[name], _bytes(want))


def test_paired_path_rejects_what_it_cannot_do(make_input):
    from moekit.quant.mxfp8 import triton as mx_triton

    tiles = {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 1, "PAIRED": True}
    x = make_input((32, 64), torch.float32, 61)
    with pytest.raises(ValueError, match="PAIRED tiles need both layouts of bfloat16"):
        mx_triton.launch_quantize(x, mx_triton.empty_outputs(32, 64, True, True, "e4m3", x.device), "e4m3", "floor",
                                  tiles)
    x = x.to(torch.bfloat16)
    with pytest.raises(ValueError, match="PAIRED tiles need"):
        mx_triton.launch_quantize(x, mx_triton.empty_outputs(32, 64, True, False, "e4m3", x.device), "e4m3", "floor",
                                  tiles)
    with pytest.raises(ValueError, match="BLOCK_K >= 64"):
        mx_triton.launch_quantize(x, mx_triton.empty_outputs(32, 64, True, True, "e4m3", x.device), "e4m3", "floor",
                                  dict(tiles, BLOCK_K=32))


def test_tile_order_past_the_grid_limit():
    """Groups of row bands grow (by doubling) only as far as CUDA's 65535 limit on the grid's
    second axis needs, for tuned and hand-picked tiles alike; the grid covers every tile."""
    from moekit.quant.mxfp8 import triton as mx_triton

    configs = [mx_triton._config(64, 64, 2), mx_triton._config(64, 64, 2, group_m=16)]
    flags = {"ROWWISE": True, "COLWISE": True, "IS_BF16": True}
    assert mx_triton._fit_groups(configs, {"M": 64 * 65535, "K": 64}, **flags) == configs
    fitted = mx_triton._fit_groups(configs, {"M": 64 * 65535 + 1, "K": 64}, **flags)
    assert [c.kwargs["GROUP_M"] for c in fitted] == [2, 16]
    assert (fitted[0].num_warps, fitted[0].kwargs["BLOCK_M"]) == (2, 64)
    for m, k, group, want in [(64 * 65535 * 3, 96, 1, 4), (100, 96, 8, 8), (64 * 4 * 65535 + 64, 64, 4, 8)]:
        tiles = {"BLOCK_M": 64, "BLOCK_K": 64, "GROUP_M": group}
        got = mx_triton._fitted_group(m, tiles)
        assert got == want
        n_k, groups = mx_triton._grid(m, k, dict(tiles, GROUP_M=got))
        assert groups <= 65535 and n_k == got * -(-k // 64) and groups * got >= -(-m // 64)


def test_paired_tiles_fall_back_where_they_do_not_apply():
    """Autotune candidates: the paired tiles stay paired for both layouts of bfloat16 and run the
    general path otherwise, a tile the list already holds dropped."""
    from moekit.quant.mxfp8 import triton as mx_triton

    configs = [mx_triton._config(128, 128, 8, 104, paired=True), mx_triton._config(256, 64, 8, paired=True),
               mx_triton._config(128, 128, 8), mx_triton._config(128, 128, 8, 112)]
    assert mx_triton._fit_groups(configs, {"M": 4096, "K": 4096}, ROWWISE=True, COLWISE=True, IS_BF16=True) == configs
    for flags in ({"ROWWISE": True, "COLWISE": True, "IS_BF16": False},
                  {"ROWWISE": False, "COLWISE": True, "IS_BF16": True}):
        fitted = mx_triton._fit_groups(configs, {"M": 4096, "K": 4096}, **flags)
        # the paired 128x128 falls back without its register limit: the general 128x128 already listed
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["PAIRED"], c.maxnreg) for c in fitted] == [
            (128, 128, False, None), (256, 64, False, None), (128, 128, False, 112)]


@pytest.mark.parametrize("scale_mode", MODES)
@pytest.mark.parametrize("elem", ELEMS)
def test_public_api_layouts_match_reference(make_input, assert_same_bits, assert_same_values, elem, scale_mode):
    """quantize_both, quantize along every axis (row kernel, in-place column kernel), dequantize."""
    x = make_input((64, 96), torch.bfloat16, 7)
    got = mxfp8.quantize_both(x, elem, scale_mode, backend="triton")
    want = reference.quantize_both(x, elem, scale_mode)
    cases = list(zip(got, want, strict=True))
    x3 = make_input((3, 64, 40), torch.float32, 8)
    for xi, axis in [(x, 0), (x, -1), (x3, 1), (x3.transpose(1, 2), 2)]:
        cases.append((mxfp8.quantize(xi, axis, elem, scale_mode, backend="triton"),
                      reference.quantize(xi, axis, elem, scale_mode)))
    for g, w in cases:
        assert (g.axis, g.elem, g.scale_mode) == (w.axis, w.elem, w.scale_mode)
        assert g.data.dtype == element_format(elem).dtype and g.scale.dtype == torch.float8_e8m0fnu
        assert g.data.stride(g.axis) == 1 and g.scale.stride(g.axis) == 1
        assert_same_bits(g.data, w.data)
        assert_same_bits(g.scale, w.scale)
        for dtype in (torch.float32, torch.bfloat16):
            assert_same_values(mxfp8.dequantize(g, dtype, backend="triton"), reference.dequantize(w, dtype))


def test_column_layout_is_transposed_storage(make_input):
    x = make_input((64, 96), torch.bfloat16, 3)
    for backend in ("reference", "triton"):
        rows, cols = mxfp8.quantize_both(x, backend=backend)
        assert rows.data.shape == cols.data.shape == (64, 96)
        assert rows.scale.shape == (64, 3) and cols.scale.shape == (2, 96)
        assert rows.data.is_contiguous() and cols.data.t().is_contiguous() and cols.scale.t().is_contiguous()


# ---------------------------------------------------------------------------------------------
# Blocked scales (cuBLAS's layout): the kernels' direct stores == to_blocked(reference scales)

BLOCKED_TILE = {"BLOCK_M": 128, "BLOCK_K": 128, "num_warps": 8}


def _blocked_input(make_input, shape, dtype, seed):
    """`make_input` data (outliers, NaN / Inf, a row-wise zero block) plus a column-wise zero block."""
    x = make_input(shape, dtype, seed)
    x[32:64, 96:99] = 0.0
    return x


def _blocked_expected(x, elem, scale_mode, rowwise, colwise):
    rows, cols = (blocked.from_plain(t) for t in reference.quantize_both(x, elem, scale_mode))
    expected = {}
    if rowwise:
        expected |= {"row_data": rows.data, "row_scale": rows.scale}
    if colwise:
        expected |= {"col_data": cols.data.t(), "col_scale": cols.scale}
    return expected


@pytest.mark.parametrize("scale_mode", MODES)
@pytest.mark.parametrize("elem", ELEMS)
def test_blocked_scales_match_reference(make_input, assert_same_bits, elem, scale_mode):
    """Both layouts (the launch's default config: the general path; and the paired path for
    bfloat16), row-wise only and column-wise only, on shapes a 128 x 128 tile divides and on
    shapes it does not (masked data, scale padding written as zeros)."""
    from moekit.quant.mxfp8 import triton as mx_triton

    # the paired tile as a register-limited candidate launches it (the interpreter ignores the limit)
    paired = mx_triton.config_tiles(mx_triton._config(128, 128, 8, 104, paired=True))
    runs = [(True, True, None), (True, True, paired), (True, False, None), (False, True, None)]
    cases = [((128, 256), torch.bfloat16), ((160, 224), torch.bfloat16), ((96, 416), torch.float32),
             ((160, 96), torch.float16)]
    for seed, (shape, dtype) in enumerate(cases):
        x = _blocked_input(make_input, shape, dtype, 70 + seed)
        for rowwise, colwise, tiles in runs:
            if tiles is not None and dtype != torch.bfloat16:
                continue  # the paired path reads bfloat16 only
            out = mx_triton.empty_outputs(*shape, rowwise, colwise, elem, x.device, "blocked")
            for buf in out.values():
                buf.fill_(POISONS[seed % 2])
            mx_triton.launch_quantize(x, out, elem, scale_mode, tiles, scale_layout="blocked")
            expected = _blocked_expected(x, elem, scale_mode, rowwise, colwise)
            assert out.keys() == expected.keys()
            for name, buf in out.items():
                assert_same_bits(buf, _bytes(expected[name]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_blocked_public_api(make_input, assert_same_bits, backend):
    """quantize_both / quantize(axis 0, 1) with scale_layout="blocked": the plain tensors' data, the
    scales as to_blocked lays them out (flat, padded to 128 rows x 4 columns of the scale matrix)."""
    x = _blocked_input(make_input, (160, 224), torch.bfloat16, 80)
    got = mxfp8.quantize_both(x, "e4m3", "floor", backend=backend, scale_layout="blocked")
    got += (mxfp8.quantize(x, 1, backend=backend, scale_layout="blocked"),
            mxfp8.quantize(x, 0, backend=backend, scale_layout="blocked"))
    plain = reference.quantize_both(x, "e4m3", "floor")
    for g, p in zip(got, plain + plain, strict=True):
        assert isinstance(g, mxfp8.MXBlockedTensor)
        assert (g.axis, g.elem, g.scale_mode, g.block) == (p.axis, p.elem, p.scale_mode, p.block)
        assert g.scale.dtype == torch.float8_e8m0fnu and g.scale.ndim == 1
        assert_same_bits(g.data, p.data)
        assert g.data.stride(g.axis) == 1
        scales = p.scale.movedim(p.axis, -1)  # [rows, cols] of the scale matrix: [160, 7] and [224, 5]
        assert g.scale.numel() == blocked.blocked_numel(*scales.shape) == 256 * 8  # both pad to [256, 8]
        # spot checks of the layout: (r, c) in tile (r // 128, c // 4), at (r % 32) * 16 + (r // 32 % 4) * 4 + c % 4
        tiles_per_row = -(-scales.shape[1] // 4)
        for r, c in [(0, 0), (33, 1), (127, 3), (128, 4), (159, scales.shape[1] - 1)]:
            at = ((r // 128) * tiles_per_row + c // 4) * 512 + (r % 32) * 16 + (r // 32 % 4) * 4 + c % 4
            assert _bytes(g.scale)[at] == _bytes(scales)[r, c]
        assert_same_bits(g.scale, blocked.to_blocked(scales))


def test_blocked_int64_offsets(monkeypatch, make_input, assert_same_bits):
    from moekit.quant.mxfp8 import triton as mx_triton

    monkeypatch.setattr(mx_triton, "needs_index_64", lambda x: True)
    x = _blocked_input(make_input, (160, 224), torch.bfloat16, 81)
    for tiles in (None, dict(BLOCKED_TILE, PAIRED=True)):
        out = mx_triton.empty_outputs(160, 224, True, True, "e4m3", x.device, "blocked")
        mx_triton.launch_quantize(x, out, "e4m3", "floor", tiles, scale_layout="blocked")
        expected = _blocked_expected(x, "e4m3", "floor", True, True)
        for name, buf in out.items():
            assert_same_bits(buf, _bytes(expected[name]))


def test_blocked_scales_reject_what_they_cannot_do(make_input):
    from moekit.quant.mxfp8 import triton as mx_triton

    x = make_input((128, 128), torch.bfloat16, 82)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match="scale_layout='blocked' takes a 2-D tensor"):
            mxfp8.quantize(x.reshape(2, 64, 128), -1, backend=backend, scale_layout="blocked")
        with pytest.raises(ValueError, match="unknown scale_layout 'cublas'"):
            mxfp8.quantize_both(x, backend=backend, scale_layout="cublas")
        with pytest.raises(TypeError, match="MXTensor"):
            mxfp8.dequantize(mxfp8.quantize(x, backend=backend, scale_layout="blocked"), backend=backend)
    out = mx_triton.empty_outputs(128, 128, True, True, "e4m3", x.device, "blocked")
    with pytest.raises(ValueError, match="blocked scales need 128x128 tiles"):
        mx_triton.launch_quantize(x, out, "e4m3", "floor", {"BLOCK_M": 256, "BLOCK_K": 64, "num_warps": 8},
                                  scale_layout="blocked")
    with pytest.raises(ValueError, match="blocked scales need a 2-D MX tensor"):
        blocked.from_plain(reference.quantize(x.reshape(2, 64, 128)))


def test_blocked_autotune_candidates_are_whole_scale_tiles():
    from moekit.quant.mxfp8 import triton as mx_triton

    assert mx_triton.BLOCKED_CONFIGS
    for config in [*mx_triton.BLOCKED_CONFIGS, mx_triton.BLOCKED_ROW_CONFIG]:
        assert (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]) == (128, 128)


def test_config_tiles_keep_the_register_limit():
    """`config_tiles` gives `launch_quantize` the candidate's build, ptxas's register limit included."""
    from moekit.quant.mxfp8 import triton as mx_triton

    assert mx_triton.config_tiles(mx_triton._config(128, 128, 8, 104, paired=True)) == {
        "BLOCK_M": 128, "BLOCK_K": 128, "GROUP_M": 1, "PAIRED": True, "num_warps": 8, "maxnreg": 104}
    assert "maxnreg" not in mx_triton.config_tiles(mx_triton._config(256, 64, 8, group_m=8))


# ---------------------------------------------------------------------------------------------
# The FLOOR rule by hand (OCP MX v1.0 6.3): s = floor(log2(amax)) - emax, P_i = sat_rne(V_i / 2**s),
# scale byte = s + 127. E4M3: bias 7, emax 8, max 448 = 1.75 * 2**8, min subnormal 2**-9.
# E5M2: bias 15, emax 15, min subnormal 2**-16. Byte = sign | exponent field | mantissa.

HAND_CASES = [
    # (elem, mode, {index: value}, scale byte, {index: element byte}); unlisted values are 0.0 -> 0x00
    ("e4m3", "floor",
     {0: 3.0, 1: 1.0, 2: -0.5, 3: 1.0625, 4: 1.1875, 5: 2.0**-16, 6: 2.0**-17, 7: -3 * 2.0**-17},
     # amax 3: floor(log2 3) = 1, s = 1 - 8 = -7, byte 120 = 0x78; V / 2**s = V * 128
     0x78,
     {0: 0x7C,  # 384 = 1.5 * 2**8: exp 8+7 = 0b1111, mantissa 0b100
      1: 0x70,  # 128 = 2**7: exp 0b1110
      2: 0xE8,  # -64 = -2**6: sign, exp 0b1101
      3: 0x70,  # 136 = 1.0625 * 2**7, halfway 1.000 / 1.125: ties to even -> 1.000
      4: 0x72,  # 152 = 1.1875 * 2**7, halfway 1.125 / 1.250: ties to even -> 1.250 (0b010)
      5: 0x01,  # 2**-9: smallest subnormal
      6: 0x00,  # 2**-10: halfway 0 / 2**-9 -> 0
      7: 0x82}),  # -1.5 * 2**-9: halfway 1 / 2 subnormal steps -> 2, negative
    ("e4m3", "floor", {0: 3.75, 1: -3.5, 2: 0.25},
     0x78,  # floor(log2 3.75) = 1 -> s = -7 again
     {0: 0x7E,  # 480 > 448 saturates to 448 = 1.75 * 2**8: 0b1111, 0b110
      1: 0xFE,  # -448
      2: 0x60}),  # 32 = 2**5: exp 0b1100
    ("e4m3", "rceil", {0: 3.75, 1: -3.5, 2: 0.25},
     0x79,  # rceil: s = ceil(log2(3.75 / 448)) = ceil(-6.9) = -6 -> byte 121; V * 64
     {0: 0x77,  # 240 = 1.875 * 2**7: 0b1110, 0b111 (no saturation)
      1: 0xF6,  # -224 = -1.75 * 2**7
      2: 0x58}),  # 16 = 2**4: exp 0b1011
    ("e4m3", "rceil", {0: 3.5, 1: 1.0},
     0x78,  # 3.5 / 448 = 2**-7 exactly: ceil keeps s = -7; V * 128
     {0: 0x7E,  # 448 exactly, the largest normal
      1: 0x70}),
    ("e4m3", "rceil", {0: 3.5 + 2.0**-20, 1: 1.0},
     0x79,  # just above 1.75 * 2**1: s = -6; V * 64
     {0: 0x76,  # 224.0002 rounds to 224 = 1.75 * 2**7: 0b1110, 0b110
      1: 0x68}),  # 64 = 2**6: exp 0b1101
    ("e5m2", "floor", {0: 3.0, 1: 1.0, 2: 2.0**-30},
     0x71,  # s = 1 - 15 = -14 -> byte 113; V * 2**14
     {0: 0x7A,  # 1.5 * 2**15: exp 15+15 = 0b11110, mantissa 0b10
      1: 0x74,  # 2**14: exp 0b11101
      2: 0x01}),  # 2**-16: smallest E5M2 subnormal
    ("e4m3", "floor", {3: -0.0},
     0x00,  # all zero: log2(0) = -inf, clamped to the E8M0 minimum s = -127
     {3: 0x80}),  # -0.0 keeps its sign
    ("e4m3", "floor", {0: 2.0**-130, 1: 2.0**-133},
     0x00,  # floor(log2 2**-130) - 8 = -138, clamped to -127; V * 2**127
     {0: 0x20,  # 2**-3: exp -3+7 = 0b0100
      1: 0x08}),  # 2**-6: smallest normal, exp 0b0001
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", range(len(HAND_CASES)))
def test_floor_and_rceil_rules_by_hand(backend, case):
    elem, mode, values, scale_byte, elem_bytes = HAND_CASES[case]
    x = torch.zeros(1, 32)
    for i, v in values.items():
        x[0, i] = v
    t = mxfp8.quantize(x, -1, elem, mode, backend=backend)
    assert _bytes(t.scale).tolist() == [[scale_byte]]
    expected = [elem_bytes.get(i, 0x00) for i in range(32)]
    assert _bytes(t.data)[0].tolist() == expected


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("elem", ELEMS)
def test_nan_and_inf_blocks(make_input, backend, elem):
    """A block with NaN or +-Inf: scale 0xFF (NaN), elements 0x7F; it decodes to NaN, others do not."""
    x = make_input((64, 96), torch.float32, 11, specials=False)
    x[2, 40], x[9, 3], x[33, 95] = float("nan"), float("inf"), -float("inf")
    rows, cols = mxfp8.quantize_both(x, elem, backend=backend)
    for t, bad in [(rows, [(2, 1), (9, 0), (33, 2)]), (cols, [(0, 40), (0, 3), (1, 95)])]:
        scale = _bytes(t.scale)
        expect_bad = torch.zeros_like(scale, dtype=torch.bool)
        for i, j in bad:
            expect_bad[i, j] = True
        assert torch.equal(scale == 0xFF, expect_bad)
        block_bad = expect_bad.repeat_interleave(32, dim=t.axis)
        assert torch.all(_bytes(t.data)[block_bad] == 0x7F)
        assert torch.equal(mxfp8.dequantize(t, backend=backend).isnan(), block_bad)


# ---------------------------------------------------------------------------------------------
# Reference vs an independent float64 definition; round-trip error bound


def _nearest_even_fp8_bytes(v: torch.Tensor, elem: str) -> torch.Tensor:
    """Saturating round-to-nearest-even of float64 `v` by search over all finite FP8 values."""
    fmt = element_format(elem)
    top = 0x7E if elem == "e4m3" else 0x7B  # largest finite positive byte
    grid = torch.arange(top + 1, dtype=torch.uint8).view(fmt.dtype).double()
    mag = v.abs().clamp(max=fmt.max_normal)
    hi = torch.searchsorted(grid, mag).clamp(max=top)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    return (pick | (torch.signbit(v).long() << 7)).to(torch.uint8)


@pytest.mark.parametrize("scale_mode", MODES)
@pytest.mark.parametrize("elem", ELEMS)
def test_reference_against_float64_definition(make_input, elem, scale_mode):
    fmt = element_format(elem)
    x = make_input((64, 256), torch.float32, 5, specials=False)
    t = reference.quantize(x, -1, elem, scale_mode)
    blocks = x.double().reshape(64, 8, 32)
    amax = blocks.abs().amax(-1)
    with torch.no_grad():
        log2 = torch.log2(amax) if scale_mode == "floor" else torch.log2(amax / fmt.max_normal)
    exp = (log2.floor() - fmt.emax) if scale_mode == "floor" else log2.ceil()
    exp = exp.nan_to_num(neginf=-1e9).clamp(-127, 127).long()  # log2(0) = -inf: all-zero block
    assert torch.equal(_bytes(t.scale).long(), exp + 127)
    scaled = blocks * torch.exp2(-exp.double())[..., None]
    assert torch.equal(_bytes(t.data), _nearest_even_fp8_bytes(scaled, elem).reshape(64, 256))


@pytest.mark.parametrize("scale_mode", MODES)
@pytest.mark.parametrize("elem", ELEMS)
def test_round_trip_error_within_documented_bound(elem, scale_mode):
    fmt = element_format(elem)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(128, 256, generator=g) * torch.exp2(torch.randint(-40, 40, (128, 1), generator=g).float())
    t = reference.quantize(x, -1, elem, scale_mode)
    err = (reference.dequantize(t).double() - x.double()).abs()
    s = (_bytes(t.scale).double() - 127).repeat_interleave(32, dim=1)
    rel = 2.0 ** -(fmt.mantissa_bits + 1) if scale_mode == "rceil" else 1 / 8
    bound = rel * x.double().abs() + torch.exp2(s + fmt.min_normal_exp - fmt.mantissa_bits - 1)
    assert torch.all(err <= bound)
    assert (err / bound).max() > 0.5  # the bound is tight enough to mean something
    rel_err = err.norm() / x.double().norm()
    assert rel_err < (0.05 if elem == "e4m3" else 0.1)


def test_floor_saturates_and_rceil_does_not():
    g = torch.Generator().manual_seed(17)
    x = torch.randn(64, 256, generator=g)
    for elem in ELEMS:
        fmt = element_format(elem)
        floor = reference.quantize(x, -1, elem, "floor")
        rceil = reference.quantize(x, -1, elem, "rceil")
        at_max_floor = (floor.data.double().abs() == fmt.max_normal).sum()
        # Saturation: |V| / 2**s beyond max normal. rceil has none; floor has some on random data.
        s = (_bytes(rceil.scale).double() - 127).repeat_interleave(32, dim=1)
        assert torch.all(x.double().abs() * torch.exp2(-s) <= fmt.max_normal)
        s = (_bytes(floor.scale).double() - 127).repeat_interleave(32, dim=1)
        assert (x.double().abs() * torch.exp2(-s) > fmt.max_normal).sum() > 0
        assert at_max_floor > 0


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_inputs_give_empty_results(backend):
    """No rows to quantize is legitimate input: empty data and scales of the right shapes."""
    for shape, axis, scale_shape in [((0, 64), -1, (0, 2)), ((64, 0), 0, (2, 0)), ((3, 0, 64), 2, (3, 0, 2))]:
        t = mxfp8.quantize(torch.empty(shape, dtype=torch.bfloat16), axis, backend=backend)
        assert t.data.shape == shape and t.data.dtype == torch.float8_e4m3fn
        assert t.scale.shape == scale_shape and t.scale.dtype == torch.float8_e8m0fnu
        assert mxfp8.dequantize(t, backend=backend).shape == shape
    rows, cols = mxfp8.quantize_both(torch.empty(0, 64), backend=backend)
    assert rows.data.shape == cols.data.shape == (0, 64)
    assert rows.scale.shape == (0, 2) and cols.scale.shape == (0, 64)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_is_rejected_clearly(backend):
    x = torch.randn(4, 64)
    with pytest.raises(TypeError, match="int32"):
        mxfp8.quantize(torch.ones(4, 64, dtype=torch.int32), backend=backend)
    with pytest.raises(TypeError, match="float64"):
        mxfp8.quantize(x.double(), backend=backend)
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        mxfp8.quantize(torch.randn(4, 40), backend=backend)
    with pytest.raises(ValueError, match="axis 0 has length 4"):
        mxfp8.quantize(x, axis=0, backend=backend)
    with pytest.raises(ValueError, match="unknown FP8 element type 'e3m4'"):
        mxfp8.quantize(x, elem="e3m4", backend=backend)
    with pytest.raises(ValueError, match="unknown scale_mode 'ceil'"):
        mxfp8.quantize(x, scale_mode="ceil", backend=backend)
    with pytest.raises(ValueError, match="out of range"):
        mxfp8.quantize(x, axis=2, backend=backend)
    with pytest.raises(ValueError, match="0-d"):
        mxfp8.quantize(torch.tensor(1.0), backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        mxfp8.quantize_both(torch.randn(2, 32, 64), backend=backend)
    with pytest.raises(TypeError, match="MXTensor"):
        mxfp8.dequantize(x, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        mxfp8.quantize(x, backend="cuda")


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernels (hardware FP8 casts) against the reference


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scale_mode", MODES)
@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernels_match_reference(make_input, assert_same_bits, assert_same_values, dtype, elem, scale_mode):
    # 2048 + 96 columns leave partial tiles (masked); 2048 divides every tile (EVEN, unmasked)
    for seed, shape in enumerate([(1024, 2048 + 96), (1024, 2048)]):
        x = make_input(shape, dtype, 21 + seed).cuda()
        got = mxfp8.quantize_both(x, elem, scale_mode, backend="triton")
        want = mxfp8.quantize_both(x, elem, scale_mode, backend="reference")
        for g, w in zip(got, want, strict=True):
            assert_same_bits(g.data, w.data)
            assert_same_bits(g.scale, w.scale)
            assert_same_values(mxfp8.dequantize(g, backend="triton"), mxfp8.dequantize(w, backend="reference"))
        assert math.prod(got[0].scale.shape) == x.numel() // 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_every_tuned_tile_matches_reference(make_input, assert_same_bits):
    """The autotuner keeps one config per shape: every candidate must be exact, masked or not."""
    from moekit.quant.mxfp8 import triton as mx_triton

    for seed, shape in enumerate([(512, 1024 + 96), (512, 1024)]):
        x = make_input(shape, torch.bfloat16, 40 + seed).cuda()
        rows, cols = reference.quantize_both(x, "e4m3", "rceil")
        expected = {"row_data": rows.data, "row_scale": rows.scale,
                    "col_data": cols.data.t(), "col_scale": cols.scale.t()}
        for config in mx_triton.BOTH_CONFIGS:
            out = mx_triton.empty_outputs(*shape, True, True, "e4m3", x.device)
            for buf in out.values():
                buf.fill_(POISONS[seed])
            mx_triton.launch_quantize(x, out, "e4m3", "rceil", mx_triton.config_tiles(config))
            for name, buf in out.items():
                assert_same_bits(buf, _bytes(expected[name]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scale_mode", MODES)
@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_blocked_scales_match_reference(make_input, assert_same_bits, dtype, elem, scale_mode):
    """Every blocked candidate (compiled: inline PTX, 16-byte vectors), both layouts and each alone."""
    from moekit.quant.mxfp8 import triton as mx_triton

    for seed, shape in enumerate([(1024, 2048 + 96), (1024 + 32, 2048), (1024, 2048)]):
        x = _blocked_input(make_input, shape, dtype, 90 + seed).cuda()
        runs = [(True, True, mx_triton.config_tiles(c)) for c in mx_triton.BLOCKED_CONFIGS]
        runs += [(True, True, None), (True, False, None), (False, True, None)]
        for rowwise, colwise, tiles in runs:
            if tiles is not None and tiles["PAIRED"] and dtype != torch.bfloat16:
                continue
            out = mx_triton.empty_outputs(*shape, rowwise, colwise, elem, x.device, "blocked")
            for buf in out.values():
                buf.fill_(POISONS[seed % 2])
            mx_triton.launch_quantize(x, out, elem, scale_mode, tiles, scale_layout="blocked")
            expected = _blocked_expected(x.cpu(), elem, scale_mode, rowwise, colwise)
            for name, buf in out.items():
                assert_same_bits(buf.cpu(), _bytes(expected[name]))


def test_int64_offsets_for_views_that_reach_past_int32():
    """The kernels read a view at row * stride: a column slice of a large activation can hold fewer
    than 2^31 elements yet address past 2^31, where int32 offsets wrap (meta tensors: no memory)."""
    from moekit.quant.triton_utils import needs_index_64

    big = torch.empty(2**24, 192, dtype=torch.bfloat16, device="meta")
    assert needs_index_64(big)  # 3 * 2^30 elements
    assert needs_index_64(big[:, :64])  # 2^30 elements, last one at (2^24 - 1) * 192 + 63
    assert not needs_index_64(big[: 2**23, :64])  # last one at (2^23 - 1) * 192 + 63 < 2^31
    assert not needs_index_64(torch.empty(2**24, 64, device="meta"))
    assert not needs_index_64(torch.empty(0, 2**20, device="meta"))


def test_int64_offset_path_matches_reference(monkeypatch, make_input, assert_same_bits, assert_same_values):
    """Inputs past 2^31 elements take int64 offsets (too large to test directly): forced on here."""
    from moekit.quant.mxfp8 import triton as mx_triton

    monkeypatch.setattr(mx_triton, "needs_index_64", lambda x: True)
    x = make_input((64, 96), torch.bfloat16, 11)
    for g, w in zip(mxfp8.quantize_both(x, "e4m3", "floor", backend="triton"),
                    reference.quantize_both(x, "e4m3", "floor"), strict=True):
        assert_same_bits(g.data, w.data)
        assert_same_bits(g.scale, w.scale)
        assert_same_values(mxfp8.dequantize(g, torch.float32, backend="triton"), reference.dequantize(w, torch.float32))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
@pytest.mark.parametrize("shape", [(96, 256), (37, 384)])
def test_moe_mx_values_are_dequantized_quantizations(monkeypatch, make_input, assert_same_values, device, shape):
    """The MoE kernels' MX operands held as values (``fp8_kernels.mx_values``): exactly the reference
    quantization dequantized, blocked along rows, and along columns (stored transposed) where the
    rows fill whole blocks; then rounded to the values' dtype (bf16 on the GPU: exact but for
    values below bf16's normal range)."""
    from moekit.ops.moe import triton_meta
    from moekit.ops.moe.fp8_kernels import MX_VALUES_DTYPE, mx_values
    from moekit.ops.moe.fp8_recipe import recipe

    monkeypatch.setattr(triton_meta, "poison_buffers", True)  # an unwritten element would stay NaN

    # float32 in the interpreter, whose bf16 -> float32 cast gets bf16 subnormals wrong
    x = make_input(shape, torch.bfloat16 if device == "cuda" else torch.float32, 60 + shape[0])
    cols = shape[0] % 32 == 0
    got_rows, got_cols = mx_values(x.to(device), recipe("mxfp8"), rows=True, cols=cols)
    for axis, got in ((1, got_rows), (0, got_cols)):
        if got is None:
            continue
        want = mxfp8.dequantize(mxfp8.quantize(x, axis, "e4m3", "floor", backend="reference"), backend="reference")
        got = got if axis == 1 else got.t()
        assert got.dtype == MX_VALUES_DTYPE
        assert_same_values(got.cpu(), want.to(MX_VALUES_DTYPE))
    assert cols == (got_cols is not None)
    if cols:
        assert got_cols.is_contiguous()  # [N, M]: what the wgrad and dgrad GEMMs read
