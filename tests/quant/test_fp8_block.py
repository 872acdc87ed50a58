"""FP8 block-scaled quantization: Triton vs reference (bit for bit), hand-worked values,
NaN / Inf tiles, error bound, input validation."""

import pytest
import torch

from moekit.quant import fp8_block
from moekit.quant.formats import element_format
from moekit.quant.fp8_block import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ELEMS = ["e4m3", "e5m2"]
# (block, input shape): DeepSeek's two, plus small ones whose tiles overhang the edges.
CASES = [((1, 128), (2, 20, 384)), ((128, 128), (256, 256)), ((4, 32), (24, 96)), ((1, 32), (40, 96))]


def _bytes(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(make_input, assert_same_bits, assert_same_values, case, dtype, elem):
    from moekit.quant.fp8_block import triton as block_triton

    block, shape = CASES[case]
    x = make_input(shape, dtype, case)
    want = reference.quantize(x, block, elem)
    x2 = x.reshape(-1, shape[-1])
    for poison in (-1.0, -2.0):  # negative: never a legitimate scale; two, so nothing matches by luck
        data = torch.full(x2.shape, int(-poison) * 0x55, dtype=torch.uint8)
        scale = torch.full((x2.shape[0] // block[0], shape[-1] // block[1]), poison)
        block_triton.launch_quantize(x2, data, scale, block, elem)
        assert_same_bits(data, _bytes(want.data).reshape(x2.shape))
        assert_same_values(scale, want.scale.reshape(scale.shape))
    got = fp8_block.quantize(x, block, elem, backend="triton")
    assert got.block == want.block and got.elem == want.elem and got.scale.shape == want.scale.shape
    assert_same_bits(got.data, want.data)
    for dtype_out in (torch.float32, torch.bfloat16):
        assert_same_values(fp8_block.dequantize(got, dtype_out, backend="triton"),
                           reference.dequantize(want, dtype_out))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hand_worked_activation_tiles(backend):
    """Block (1, 128), e4m3: scale = amax / 448, element = sat_rne(V * (1 / scale))."""
    x = torch.zeros(1, 640)
    x[0, :3] = torch.tensor([896.0, -3.0, 1.0])  # scale 2.0: V * 0.5
    x[0, 128:130] = torch.tensor([448.0, 2.0**-9])  # scale 1.0
    # tile 2 (256..383) all zero: scale floor 2**-126
    x[0, 384:386] = torch.tensor([7.0, -1.0])  # scale 7 / 448 = 2**-6: V * 64
    x[0, 512:514] = torch.tensor([1.0, 0.25])  # scale fl(1 / 448), not a power of two
    t = fp8_block.quantize_activation(x, backend=backend)
    expected_scale = torch.tensor([[2.0, 1.0, 2.0**-126, 2.0**-6, 1 / 448]], dtype=torch.float32)
    assert torch.equal(t.scale, expected_scale)
    got = _bytes(t.data)[0]
    assert got[:3].tolist() == [0x7E,  # 448: exp 0b1111, mantissa 0b110
                                0xBC,  # -1.5: sign, exp 0b0111, mantissa 0b100
                                0x30]  # 0.5: exp 0b0110
    assert got[128:130].tolist() == [0x7E, 0x01]  # 448; 2**-9 the smallest subnormal
    assert got[384:386].tolist() == [0x7E, 0xE8]  # 448; -64 = -2**6: exp 0b1101
    assert got[512:514].tolist() == [0x7E,  # 1 * ~448 rounds to 448
                                     0x6E]  # 0.25 * ~448 = ~112 = 1.75 * 2**6: exp 0b1101, 0b110
    untouched = torch.ones(640, dtype=torch.bool)
    for i in [0, 1, 2, 128, 129, 384, 385, 512, 513]:
        untouched[i] = False
    assert torch.all(got[untouched] == 0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("elem", ELEMS)
def test_nan_and_inf_tiles(make_input, backend, elem):
    x = make_input((256, 256), torch.float32, 3, specials=False)
    x[5, 130], x[200, 7] = float("nan"), -float("inf")
    act = fp8_block.quantize_activation(x, elem, backend=backend)
    bad = torch.zeros(256, 2, dtype=torch.bool)
    bad[5, 1] = bad[200, 0] = True
    assert torch.equal(act.scale.isnan(), bad)
    bad_elems = bad.repeat_interleave(128, dim=1)
    assert torch.all(_bytes(act.data)[bad_elems] == 0x7F)
    assert torch.equal(fp8_block.dequantize(act, backend=backend).isnan(), bad_elems)
    w = fp8_block.quantize_weight(x, elem, backend=backend)
    assert torch.equal(w.scale.isnan(), torch.tensor([[False, True], [True, False]]))


@pytest.mark.parametrize("elem", ELEMS)
def test_weight_tiles_of_a_stacked_expert_tensor(make_input, assert_same_bits, elem):
    w = make_input((2, 128, 256), torch.bfloat16, 4, specials=False)
    t = fp8_block.quantize_weight(w, elem, backend="triton")
    assert t.data.shape == w.shape and t.scale.shape == (2, 1, 2) and t.block == (128, 128)
    for e in range(2):  # each expert's matrix is quantized on its own
        one = reference.quantize(w[e], (128, 128), elem)
        assert_same_bits(t.data[e], one.data)
        assert_same_bits(t.scale[e], one.scale)


@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
def test_round_trip_error_within_documented_bound(block, elem):
    fmt = element_format(elem)
    g = torch.Generator().manual_seed(23)
    x = torch.randn(256, 512, generator=g) * torch.exp2(torch.randint(-30, 30, (256, 1), generator=g).float())
    t = reference.quantize(x, block, elem)
    err = (reference.dequantize(t).double() - x.double()).abs()
    scale = t.scale.double().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    rel = 2.0 ** -(fmt.mantissa_bits + 1) * (1 + 2.0**-22)
    bound = rel * x.double().abs() + scale * 2.0 ** (fmt.min_normal_exp - fmt.mantissa_bits - 1)
    assert torch.all(err <= bound)
    assert (err / bound).max() > 0.5


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_inputs_give_empty_results(backend):
    """No tokens (an expert-parallel rank that got none, a batch with every slot dropped) is legitimate
    input: empty data and scales of the right shapes, not a reshape error."""
    cases = [((0, 128), (1, 128), (0, 1)), ((0, 4, 128), (1, 128), (0, 4, 1)), ((2, 0, 128), (1, 128), (2, 0, 1)),
             ((0, 128, 256), (128, 128), (0, 1, 2))]
    for shape, block, scale_shape in cases:
        x = torch.empty(shape, dtype=torch.bfloat16)
        t = fp8_block.quantize(x, block, backend=backend)
        assert t.data.shape == shape and t.data.dtype == torch.float8_e4m3fn
        assert t.scale.shape == scale_shape and t.scale.dtype == torch.float32
        y = fp8_block.dequantize(t, torch.bfloat16, backend=backend)
        assert y.shape == shape and y.dtype == torch.bfloat16
    t, t_t = fp8_block.quantize_both(torch.empty(0, 128, 256), backend=backend)
    assert t.data.shape == (0, 128, 256) and t_t.data.shape == (0, 256, 128) and t_t.scale.shape == (0, 2, 1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_is_rejected_clearly(backend):
    x = torch.randn(4, 256)
    with pytest.raises(TypeError, match="int64"):
        fp8_block.quantize_activation(torch.ones(4, 256, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match=r"\[..., M, K\]"):
        fp8_block.quantize_activation(torch.randn(256), backend=backend)
    with pytest.raises(ValueError, match="dim -1 has length 200"):
        fp8_block.quantize_activation(torch.randn(4, 200), backend=backend)
    with pytest.raises(ValueError, match="dim -2 has length 4"):
        fp8_block.quantize_weight(x, backend=backend)
    with pytest.raises(ValueError, match="two positive ints"):
        fp8_block.quantize(x, block=(0, 128), backend=backend)
    with pytest.raises(ValueError, match="unknown FP8 element type"):
        fp8_block.quantize(x, elem="fp8", backend=backend)
    with pytest.raises(TypeError, match="BlockScaledTensor"):
        fp8_block.dequantize(x, backend=backend)


def test_triton_rejects_blocks_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fp8_block.quantize(torch.randn(3, 96), block=(3, 96), backend="triton")
    t = fp8_block.quantize(torch.randn(3, 96), block=(3, 96), backend="reference")
    assert t.scale.shape == (1, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
def test_gpu_kernel_matches_reference(make_input, assert_same_bits, assert_same_values, block, dtype, elem):
    x = make_input((1024, 2048 + 128), dtype, 31).cuda()
    got = fp8_block.quantize(x, block, elem, backend="triton")
    want = fp8_block.quantize(x, block, elem, backend="reference")
    assert_same_bits(got.data, want.data)
    assert_same_values(got.scale, want.scale)
    assert_same_values(fp8_block.dequantize(got, backend="triton"), fp8_block.dequantize(want, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_both_writes_the_transpose_in_the_same_pass(make_input, assert_same_bits, assert_same_values,
                                                             dtype):
    w = make_input((2, 256, 384), dtype, 12)
    for backend in ("reference", "triton"):
        t, t_t = fp8_block.quantize_both(w, backend=backend)
        want, want_t = reference.quantize(w, (128, 128)), reference.quantize(w.transpose(1, 2), (128, 128))
        assert_same_bits(t.data, want.data)
        assert_same_bits(t_t.data, want_t.data)
        assert t_t.data.is_contiguous() and t_t.data.shape == (2, 384, 256)
        assert_same_values(t.scale, want.scale)
        assert_same_values(t_t.scale, want_t.scale)
    with pytest.raises(ValueError, match="square block"):
        fp8_block.quantize_both(w, (1, 128))


@pytest.mark.parametrize("block", [(128, 128), (32, 32), (4, 4), (2, 2)])  # (2, 2): two passes, no words
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_both_other_square_blocks(make_input, assert_same_bits, assert_same_values, block, dtype):
    w = make_input((3, 2 * block[0], 4 * block[0]), dtype, 14)
    t, t_t = fp8_block.quantize_both(w, block, "e5m2", backend="triton")
    want, want_t = reference.quantize(w, block, "e5m2"), reference.quantize(w.transpose(1, 2), block, "e5m2")
    assert_same_bits(t.data, want.data)
    assert_same_bits(t_t.data, want_t.data)
    assert_same_values(t_t.scale, want_t.scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_quantize_both_matches_reference(make_input, assert_same_bits, assert_same_values, dtype, elem):
    w = make_input((3, 512, 1024 + 128), dtype, 32).cuda()
    t, t_t = fp8_block.quantize_both(w, elem=elem, backend="triton")
    want, want_t = (reference.quantize(v, (128, 128), elem) for v in (w, w.transpose(1, 2)))
    for got, ref in ((t, want), (t_t, want_t)):
        assert_same_bits(got.data, ref.data)
        assert_same_values(got.scale, ref.scale)


def test_int64_offset_path_matches_reference(monkeypatch, make_input, assert_same_bits, assert_same_values):
    """Inputs past 2^31 elements take int64 offsets (too large to test directly): forced on here."""
    from moekit.quant.fp8_block import triton as block_triton

    monkeypatch.setattr(block_triton, "needs_index_64", lambda x: True)
    w = make_input((2, 256, 384), torch.bfloat16, 13)
    t, t_t = fp8_block.quantize_both(w, (128, 128), backend="triton")
    want, want_t = reference.quantize(w, (128, 128)), reference.quantize(w.transpose(1, 2), (128, 128))
    assert_same_bits(t.data, want.data)
    assert_same_bits(t_t.data, want_t.data)
    assert_same_values(t.scale, want.scale)
    assert_same_values(fp8_block.dequantize(t, backend="triton"), fp8_block.dequantize(want, backend="reference"))
