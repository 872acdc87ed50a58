"""FP8 / MXFP8 routed experts: Triton kernels (interpreter on CPU) vs the plain-PyTorch recipe,
the recipe vs the float64 definition within the documented bound, where its quantization
blocks lie, and input errors."""

import copy
import pickle
from dataclasses import replace

import pytest
import torch

from moekit.ops.moe import fp8, fp8_reference, reference, triton_meta
from moekit.ops.moe.fp8_recipe import recipe
from moekit.ops.moe.weight_cache import WeightCache, clear_all

# Documented in moekit/ops/moe/fp8.py: ||out - ref|| / ||ref|| for outputs and gradients.
BOUND = {"fp8": 0.10, "mxfp8": 0.12}


def _kernel_recipe(name):
    """A recipe as the kernels take it, named as the op's storage choices: "mxfp8" holds MX
    operands as their values (the H200's storage), "mxfp8-bytes" as bytes and scales (sm_100's)."""
    if name == "mxfp8-bytes":
        return recipe("mxfp8")
    r = recipe(name)
    return replace(r, dequantized=r.mx)


def _problem(tokens, hidden, ffn, experts, top_k, activation, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    up = 2 * ffn if activation != "gelu" else ffn
    x = torch.randn(tokens, hidden, generator=g)
    # Distinct experts per token, uneven loads (one expert empty), a few dropped slots.
    scores = torch.rand(tokens, experts, generator=g)
    scores[:, 0] += 0.5
    scores[:, -1] = -1.0
    w, idx = scores.topk(top_k, dim=-1)
    idx = torch.where(torch.rand(idx.shape, generator=g) < 0.1, -1, idx)
    w = w.softmax(-1)
    w_up = torch.randn(experts, up, hidden, generator=g) * hidden**-0.5
    w_down = torch.randn(experts, hidden, ffn, generator=g) * ffn**-0.5
    grad = torch.randn(tokens, hidden, generator=g)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, w, w_up, w_down)]
    return leaves, idx.to(device), grad.to(device=device, dtype=dtype)


def _run(fn, leaves, idx, grad, activation):
    x, w, w_up, w_down = leaves
    out = fn(x, idx, w, w_up, w_down, activation)
    return (out, *torch.autograd.grad(out, leaves, grad))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("recipe_name,activation,hidden", [("fp8", "swiglu", 256), ("mxfp8", "gelu", 128),
                                                            ("fp8", "gelu", 128), ("mxfp8", "swiglu", 128)])
def test_triton_matches_recipe_reference(monkeypatch, recipe_name, activation, hidden):
    """Same quantization points, same rounding: only the float32 summation order differs, which
    may flip a rare FP8 rounding of an intermediate (a, dh) by one step. 2e-3 is far below one
    quantization's error (3 %), so a wrong or misplaced scale or block fails."""
    monkeypatch.setattr(triton_meta, "poison_buffers", True)  # unwritten elements would show as NaN
    leaves, idx, grad = _problem(40, hidden, 128, 5, 2, activation, seed=1)
    got = _run(lambda *a: fp8.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad, activation)
    want = _run(lambda *a: fp8_reference.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad,
                activation)
    for name, g, w in zip(("out", "dx", "dweight", "dw_up", "dw_down"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert torch.isfinite(g).all(), name
        assert _rel(g, w) < 2e-3, (name, _rel(g, w))
    # Dropped slots get no routing-weight gradient; the empty last expert no weight gradient.
    assert torch.all(got[2][idx < 0] == 0)
    assert torch.all(got[3][-1] == 0) and torch.all(got[4][-1] == 0)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_mx_values_and_mx_bytes_storage_agree(monkeypatch, activation):
    """MX operands held as their values (16-bit GEMMs) or as bytes and scales (dequantized in the
    GEMMs' K loops) are the same numbers: results differ by float32 summation order only."""
    leaves, idx, grad = _problem(70, 256, 256, 5, 2, activation, seed=4)
    runs, value_passes = [], []
    real = fp8.kernels.mx_values
    monkeypatch.setattr(fp8.kernels, "mx_values", lambda *a, **k: value_passes.append(1) or real(*a, **k))
    for as_values in (True, False):
        monkeypatch.setattr(fp8, "MX_AS_VALUES", as_values)
        value_passes.clear()
        runs.append(_run(fp8.routed_experts_mxfp8, leaves, idx, grad, activation))
        assert bool(value_passes) == as_values  # the two runs took different storages
    for name, a, b in zip(("out", "dx", "dweight", "dw_up", "dw_down"), *runs, strict=True):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


def test_weight_cache_keeps_mx_values(monkeypatch):
    """The MX values of the weights (both layouts in training) come from the cache on the next
    micro-batch, and give the uncached results bit for bit."""
    leaves, idx, grad = _problem(40, 128, 128, 5, 2, "swiglu", seed=6)
    weight_passes = []
    real = fp8.kernels.mx_values
    monkeypatch.setattr(fp8.kernels, "mx_values", lambda x, r, rows=True, cols=False: (
        x.shape[0] != leaves[0].shape[0] and weight_passes.append(cols)) or real(x, r, rows, cols))
    cache = WeightCache()
    want = _run(fp8.routed_experts_mxfp8, leaves, idx, grad, "swiglu")
    for expected in ([True, True], []):  # w_up and w_down in both layouts, then nothing
        weight_passes.clear()
        got = _run(lambda *a: fp8.routed_experts_mxfp8(*a, weight_cache=cache), leaves, idx, grad, "swiglu")
        assert weight_passes == expected
        for name, g, w in zip(("out", "dx", "dweight", "dw_up", "dw_down"), got, want, strict=True):
            assert torch.equal(g, w), name


def test_storage_holds_mx_values_unless_mx_gemms_run(monkeypatch):
    from moekit.ops.moe import fp8_blackwell

    cpu = torch.device("cpu")
    assert fp8.storage(recipe("mxfp8"), cpu).dequantized and not fp8.storage(recipe("fp8"), cpu).dequantized
    monkeypatch.setattr(fp8_blackwell, "available", lambda device: True)  # an sm_100 GPU: its MX GEMMs read bytes
    assert not fp8.storage(recipe("mxfp8"), cpu).dequantized
    monkeypatch.setattr(fp8, "MX_SCALED_GROUPED_MM", False)
    assert fp8.storage(recipe("mxfp8"), cpu).dequantized
    monkeypatch.setattr(fp8, "MX_AS_VALUES", False)
    assert not fp8.storage(recipe("mxfp8"), cpu).dequantized


def test_wgrad_over_several_row_tiles_matches_recipe_reference():
    """An expert of about 470 rows: the weight-gradient K loop runs four steps (its scales are
    loaded a step ahead), where the small problems above run one."""
    leaves, idx, grad = _problem(600, 128, 128, 3, 1, "gelu", seed=3)
    got = _run(fp8.routed_experts, leaves, idx, grad, "gelu")
    want = _run(fp8_reference.routed_experts, leaves, idx, grad, "gelu")
    assert idx[idx >= 0].bincount()[0] > 3 * 128
    for name, g, w in zip(("dw_up", "dw_down"), got[3:], want[3:], strict=True):
        assert _rel(g, w) < 2e-3, (name, _rel(g, w))


def _token_axis_to_rows(c, cs, counts, r):
    """Dequantize the wgrad operand layout (``fp8_kernels._store_cols``: [P, tiles * 128] bytes,
    scales [tiles * 128 / block, P]; or MX values and no scales) back to expert-sorted rows
    [sum(counts), P]; the slot rows past each expert's count must be zeros (the weight gradient sums
    over whole slots)."""
    if cs is None:
        values = c.float().t()
    else:
        values = c.view(torch.float8_e4m3fn).float().t() * cs.repeat_interleave(r.block, 0)
    out, tile = [], 0
    for n in counts:
        tiles = -(-n // 128)
        slots = slice(tile * 128, (tile + tiles) * 128)
        assert torch.all(c[:, slots][:, n:] == 0)
        out.append(values[slots][:n])
        tile += tiles
    return torch.cat(out)


@pytest.mark.parametrize("recipe_name,activation,counts,ffn,dtype", [
    ("fp8", "swiglu", [0, 130, 5, 0, 257], 128, torch.float32),
    ("fp8", "gelu", [40, 0, 128], 256, torch.bfloat16),
    ("mxfp8-bytes", "swiglu", [3, 200, 0], 128, torch.float32),
    ("mxfp8-bytes", "gelu", [0, 129], 128, torch.float32),
    ("mxfp8", "swiglu", [3, 200, 0], 128, torch.float32),
])
def test_act_backward_kernel_matches_reference(monkeypatch, recipe_name, activation, counts, ffn, dtype):
    """dh = act'(h) * da quantized both ways (rows for dx, token axis for dW_up), against the
    float64 activation backward quantized by the recipe's reference: uneven and empty experts,
    partial last tiles, dropped slots (rows past the experts' that the kernel must not touch)."""
    from moekit.ops.moe import fp8_kernels
    from moekit.ops.moe.fp8_recipe import dequantize_rows

    monkeypatch.setattr(triton_meta, "poison_buffers", True)
    r = _kernel_recipe(recipe_name)
    g = torch.Generator().manual_seed(sum(counts) + ffn)
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    idx = torch.cat([experts, torch.full((7,), -1)])[torch.randperm(sum(counts) + 7, generator=g)][:, None]
    meta = triton_meta.routing_meta(idx, len(counts))
    assert meta.counts.tolist() == counts
    up = 2 * ffn if activation == "swiglu" else ffn
    da = torch.randn(idx.numel(), ffn, generator=g) * torch.exp2(torch.randint(-4, 4, (idx.numel(), 1), generator=g))
    h = (torch.randn(idx.numel(), up, generator=g) * 2).to(dtype)
    (q, s), (c, cs) = fp8_kernels.act_backward(da, h, meta, activation, r)
    valid = sum(counts)
    want = fp8_reference.activation_backward(h[:valid].double(), da[:valid].double(), activation).float()
    want_q, want_s = fp8.quantize_rows(want, r, backend="reference")
    if s is None:  # MX values
        got = q[:valid].float()
    else:
        got = dequantize_rows(q[:valid], s[:valid], r.block)
        # Float32 vs float64 activation backward: a rare FP8 rounding may flip by one step.
        assert torch.allclose(s[:valid], want_s, rtol=1e-5, atol=0)
    assert _rel(got, dequantize_rows(want_q, want_s, r.block)) < 2e-3
    assert 3e-3 < _rel(got, want) < 0.05
    got_cols = _token_axis_to_rows(c, cs, counts, r)
    assert _rel(got_cols, fp8_reference.qdq_expert_cols(want, counts, r)) < 2e-3
    assert 3e-3 < _rel(got_cols, want) < 0.05


def test_inference_forward_matches_training_forward():
    leaves, idx, _ = _problem(24, 128, 128, 4, 2, "swiglu", seed=2)
    x, w, w_up, w_down = leaves
    train = fp8.routed_experts(x, idx, w, w_up, w_down)
    with torch.no_grad():
        infer = fp8.routed_experts(x, idx, w, w_up, w_down)
    assert torch.equal(train.detach(), infer)


@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_recipe_within_documented_bound_of_float64(recipe_name, activation):
    leaves, idx, grad = _problem(96, 256, 256, 6, 2, activation, seed=3)
    got = _run(lambda *a: fp8_reference.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad,
               activation)
    exact = _run(reference.routed_experts, [t.detach().double().requires_grad_() for t in leaves], idx,
                 grad.double(), activation)
    for name, g, w in zip(("out", "dx", "dweight", "dw_up", "dw_down"), got, exact, strict=True):
        err = _rel(g, w)
        # Above: FP8 rounding really happened (an fp32 path is ~1e-7); below: the documented bound.
        assert 3e-3 < err < BOUND[recipe_name], (name, err)


def test_bf16_inputs_within_bound():
    leaves, idx, grad = _problem(64, 128, 128, 4, 2, "swiglu", dtype=torch.bfloat16, seed=4)
    got = _run(lambda *a: fp8_reference.routed_experts(*a, recipe_name="fp8"), leaves, idx, grad, "swiglu")
    exact = _run(reference.routed_experts, [t.detach().double().requires_grad_() for t in leaves], idx,
                 grad.double(), "swiglu")
    for g, w in zip(got, exact, strict=True):
        assert g.dtype == torch.bfloat16 and _rel(g, w) < BOUND["fp8"]


@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8"])
def test_token_axis_blocks_start_at_each_expert(recipe_name):
    """Expert 0's rows are 2**20 times larger than expert 1's: a block shared across the
    boundary would flush expert 1's values to zero; per-expert blocks keep them to FP8 precision."""
    r = recipe(recipe_name)
    g = torch.Generator().manual_seed(5)
    counts = [r.block + 3, 2 * r.block - 5]
    v = torch.randn(sum(counts), 128, generator=g) + 3.0
    v[: counts[0]] *= 2.0**20
    got = fp8_reference.qdq_expert_cols(v, counts, r)
    rel = ((got - v).abs() / v.abs()).max().item()
    assert 1e-4 < rel <= 2.0**-3


def test_weight_tiles_are_shared_by_forward_and_dgrad_in_fp8_only():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(2, 256, 128, generator=g) * torch.exp2(torch.randint(-6, 6, (2, 256, 1), generator=g).float())
    fwd, bwd = (fp8_reference.qdq_weight(w, recipe("fp8"), axis) for axis in (2, 1))
    assert torch.equal(fwd, bwd.transpose(1, 2))  # one 128 x 128 tile, read both ways
    fwd, bwd = (fp8_reference.qdq_weight(w, recipe("mxfp8"), axis) for axis in (2, 1))
    assert not torch.equal(fwd, bwd.transpose(1, 2))  # MX blocks follow each GEMM's K axis
    assert _rel(fwd, w) < 0.05 and _rel(bwd.transpose(1, 2), w) < 0.05


@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_pass_weight_quantization_gives_both_gemm_layouts(recipe_name, backend):
    from moekit.ops.moe.fp8_recipe import quantize_weight, quantize_weight_both

    g = torch.Generator().manual_seed(11)
    w = torch.randn(3, 128, 256, generator=g) * torch.exp2(torch.randint(-8, 8, (3, 128, 1), generator=g).float())
    r = recipe(recipe_name)
    both = quantize_weight_both(w.bfloat16(), r, backend)
    for (data, scale), axis in zip(both, (2, 1), strict=True):
        want_data, want_scale = quantize_weight(w.bfloat16(), r, axis, "reference")
        assert data.stride(-1) == 1 and torch.equal(data, want_data) and torch.equal(scale, want_scale)


def test_errors_name_the_problem():
    leaves, idx, _ = _problem(8, 128, 128, 4, 2, "swiglu")
    x, w, w_up, w_down = (t.detach() for t in leaves)
    with pytest.raises(ValueError, match="unknown low-precision recipe 'fp4'"):
        fp8.routed_experts(x, idx, w, w_up, w_down, recipe_name="fp4")
    with pytest.raises(ValueError, match="hidden size 96 is not a multiple of 128"):
        fp8.routed_experts(x[:, :96], idx, w, w_up[:, :, :96], w_down[:, :96], "swiglu")
    with pytest.raises(ValueError, match="ffn size 64 is not a multiple of 128"):
        fp8.routed_experts(x, idx, w, torch.cat([w_up[:, :64], w_up[:, 128:192]], 1), w_down[:, :, :64])
    with pytest.raises(TypeError, match="float64"):
        fp8.routed_experts(x.double(), idx, w, w_up.double(), w_down.double())
    with pytest.raises(TypeError, match="must share a dtype"):
        fp8.routed_experts(x.half(), idx, w, w_up, w_down)
    with pytest.raises(ValueError, match="unknown activation"):
        fp8.routed_experts(x, idx, w, w_up, w_down, "relu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8"])
def test_gpu_bf16_matches_recipe_reference(monkeypatch, recipe_name):
    monkeypatch.setattr(triton_meta, "poison_buffers", True)
    leaves, idx, grad = _problem(2048, 1024, 512, 16, 4, "swiglu", dtype=torch.bfloat16, seed=7, device="cuda")
    got = _run(lambda *a: fp8.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad, "swiglu")
    want = _run(lambda *a: fp8_reference.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad, "swiglu")
    for name, g, w in zip(("out", "dx", "dweight", "dw_up", "dw_down"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert _rel(g, w) < 1e-2, (name, _rel(g, w))  # bf16 storage of h / y / dx terms


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8", "mxfp8-bytes"])
@pytest.mark.parametrize("shape,activation", [((10, 128, 128, 4, 2), "swiglu"), ((33, 256, 128, 6, 1), "gelu"),
                                              ((300, 128, 384, 8, 3), "swiglu"), ((130, 384, 256, 3, 2), "gelu")])
def test_gpu_small_ragged_shapes_match_recipe_reference(monkeypatch, recipe_name, shape, activation):
    """Experts with no rows, fewer rows than a row tile and just over one; one-step and odd K loops.
    sm_90 builds can go wrong where the interpreter is right (the linear-attention kernels did).
    "mxfp8-bytes": MX operands kept as bytes and scales (the storage sm_100's MX GEMMs read)."""
    monkeypatch.setattr(triton_meta, "poison_buffers", True)
    if recipe_name == "mxfp8-bytes":
        monkeypatch.setattr(fp8, "MX_AS_VALUES", False)
        recipe_name = "mxfp8"
    leaves, idx, grad = _problem(*shape, activation, dtype=torch.bfloat16, seed=sum(shape), device="cuda")
    got = _run(lambda *a: fp8.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad, activation)
    want = _run(lambda *a: fp8_reference.routed_experts(*a, recipe_name=recipe_name), leaves, idx, grad,
                activation)
    for name, g, w in zip(("out", "dx", "dweight", "dw_up", "dw_down"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert _rel(g, w) < 1e-2, (name, _rel(g, w))
    assert torch.all(got[3][-1] == 0) and torch.all(got[4][-1] == 0)  # the empty last expert


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp8", "mxfp8"])
def test_gpu_layer_with_weight_cache_matches_uncached(monkeypatch, precision):
    """Through the whole MoE layer on the GPU (the CPU layer runs the reference, which keeps no cache):
    a second micro-batch hits the cache and both give the uncached layer's results bit for bit."""
    from moekit import MoE, MoEConfig

    quantized = []  # weights quantized in both training layouts: as bytes and scales, or as MX values
    both, values = fp8.quantize_weight_both, fp8.kernels.mx_values
    monkeypatch.setattr(fp8, "quantize_weight_both", lambda w, *a, **k: quantized.append(w) or both(w, *a, **k))
    monkeypatch.setattr(fp8.kernels, "mx_values", lambda x, r, rows=True, cols=False: (
        cols and quantized.append(x)) or values(x, r, rows, cols))
    kw = dict(hidden_size=256, ffn_hidden_size=256, num_experts=8, top_k=2, precision=precision)
    torch.manual_seed(3)
    plain = MoE(MoEConfig(**kw)).cuda().bfloat16()
    cached = MoE(MoEConfig(cache_fp8_weights=True, **kw)).cuda().bfloat16()
    cached.load_state_dict(plain.state_dict())
    for step in range(2):
        x = torch.randn(2, 96, 256, device="cuda", dtype=torch.bfloat16)
        results, counts = [], []
        for layer in (plain, cached):
            quantized.clear()
            xi = x.clone().requires_grad_()
            out = layer(xi)
            out.float().square().sum().backward()
            results.append((out, xi.grad, layer.experts.w_up.grad.clone(), layer.experts.w_down.grad.clone()))
            counts.append(len(quantized))
        for name, a, b in zip(("out", "dx", "dw_up", "dw_down"), *results, strict=True):
            assert torch.equal(a, b), (step, name)
        assert counts == [2, 2 if step == 0 else 0], (step, counts)  # w_up and w_down, then from the cache


# ----------------------------------------------------------------------------- sm_100 MXFP8 path
# torch._scaled_grouped_mm's MXFP8 kernel needs a B200; on the CPU its meta kernel checks the
# arguments' shapes, dtypes and strides, and an emulation of its documented semantics (below,
# reading scales back out of the cuBLAS block layout) checks the data path end to end.

def _unblock(flat, rows, cols):
    R, C = -(-rows // 128) * 128, -(-cols // 4) * 4
    tiles = flat.view(torch.uint8).reshape(R // 128, C // 4, 32, 4, 4)  # [tile r, tile c, j, i, c]
    return tiles.permute(0, 3, 2, 1, 4).reshape(R, C)[:rows, :cols]  # row 32 i + j


def _emulated_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs, out_dtype):
    from moekit.quant.formats import e8m0_to_float32

    E, K, N = mat_b.shape
    out = torch.zeros(mat_a.shape[0], N, dtype=out_dtype)
    start, scale_row = 0, 0
    for e, end in enumerate(offs.tolist()):
        rows = end - start
        padded = -(-rows // 128) * 128
        flat_a = scale_a[scale_row:scale_row + padded].reshape(-1)
        sa = e8m0_to_float32(_unblock(flat_a, rows, K // 32)).repeat_interleave(32, 1)
        sb = e8m0_to_float32(_unblock(scale_b[e], N, K // 32)).repeat_interleave(32, 1)
        a = mat_a[start:end].float() * sa
        b = mat_b[e].t().float() * sb  # [N, K]
        out[start:end] = (a @ b.t()).to(out_dtype)
        start, scale_row = end, scale_row + padded
    return out


def test_to_blocked_places_each_scale_where_cublas_reads_it():
    from moekit.ops.moe.fp8_blackwell import to_blocked

    g = torch.Generator().manual_seed(8)
    s = torch.randint(0, 255, (200, 7), generator=g, dtype=torch.uint8)
    flat = to_blocked(s.view(torch.float8_e8m0fnu))
    assert flat.dtype == torch.float8_e8m0fnu and flat.numel() == 256 * 8
    b = flat.view(torch.uint8)
    for r, c in [(0, 0), (1, 0), (0, 1), (31, 3), (32, 0), (127, 3), (128, 0), (199, 6), (45, 5)]:
        tile = (r // 128) * 2 + c // 4
        assert b[tile * 512 + (r % 128 % 32) * 16 + (r % 128 // 32) * 4 + c % 4] == s[r, c]
    assert torch.equal(_unblock(flat, 200, 7), s)
    assert torch.all(_unblock(flat, 256, 8)[200:] == 0)  # padding


def test_scaled_grouped_mm_arguments_pass_torch_meta_checks():
    from moekit.ops.moe.fp8_blackwell import mx_grouped_mm_args

    E, N, K, M = 4, 256, 512, 300
    g = torch.Generator().manual_seed(9)
    a = torch.randn(M, K, generator=g).to(torch.float8_e4m3fn)
    w = torch.randn(E, N, K, generator=g).to(torch.float8_e4m3fn)
    a_s = torch.randint(100, 140, (M, K // 32), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    w_s = torch.randint(100, 140, (E, N, K // 32), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    offs = torch.tensor([50, 150, 150, 300], dtype=torch.int32)  # one empty group
    args = mx_grouped_mm_args(a, a_s, w, w_s, offs)
    assert args[1].shape == (E, K, N) and args[1].stride() == (N * K, 1, K)  # column-major b
    assert args[2].shape == (128 + 128 + 256, 16) and args[3].shape == (E, 256 * 16)
    meta = [t.to("meta") for t in args]
    out = torch._scaled_grouped_mm(*meta[:4], offs=meta[4], out_dtype=torch.bfloat16)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="float8_e4m3fn operands"):
        mx_grouped_mm_args(a.float(), a_s, w, w_s, offs)
    with pytest.raises(ValueError, match="offsets must be int32"):
        mx_grouped_mm_args(a, a_s, w, w_s, offs.long())


def test_sm100_mxfp8_path_matches_triton_kernel(monkeypatch):
    """The row-by-weight GEMM through the (emulated) torch._scaled_grouped_mm gives what the
    Triton kernel gives, so the scale conversion, blocking and un-permute are right."""
    from moekit.ops.moe import fp8_blackwell
    from moekit.ops.moe.fp8_recipe import quantize_rows, quantize_weight
    from moekit.ops.moe.triton_meta import routing_meta

    leaves, idx, _ = _problem(40, 128, 256, 4, 2, "gelu", seed=10)
    r = recipe("mxfp8")
    meta = routing_meta(idx, 4)
    a = leaves[0].detach()[meta.order.long() // 2]  # some expert-sorted rows: token rows
    a_q = quantize_rows(a, r)
    w_q = quantize_weight(leaves[3].detach(), r, 1)  # w_down for the dgrad GEMM: [E, F, H] K-major
    want = fp8.kernels.scatter_gemm(a_q, w_q, meta, r, torch.float32)
    monkeypatch.setattr(fp8_blackwell, "available", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _emulated_scaled_grouped_mm)
    got = fp8.scatter_gemm(a_q, w_q, meta, r, torch.float32)
    valid = (idx.reshape(-1) >= 0)
    assert got.shape == want.shape == (80, 256)
    assert _rel(got[valid], want[valid]) < 1e-6


# ----------------------------------------------------------------------------- weight-gradient launches
# fp8_kernels.WGRAD_CANDIDATES: every tile / launch the weight gradient may run with, chosen per
# call by the mean rows per expert. Each must give the float64 dW of its (dequantized) operands.

def _wgrad_problem(counts, P, Q, recipe_name, seed, device="cpu"):
    """Token-axis operands of dW [E, P, Q] made by ``gather_cols`` (top-1 routing with ``counts``
    rows per expert and a few dropped slots; rows of mixed magnitudes), and the float64 dW of
    their dequantized values."""
    from moekit.ops.moe import fp8_kernels

    r = _kernel_recipe(recipe_name)
    g = torch.Generator().manual_seed(seed)
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    idx = torch.cat([experts, torch.full((5,), -1)])[torch.randperm(sum(counts) + 5, generator=g)][:, None]
    meta = triton_meta.routing_meta(idx.to(device), len(counts))
    assert meta.counts.tolist() == counts
    operands, rows = [], []
    for width in (P, Q):
        src = torch.randn(idx.shape[0], width, generator=g) * torch.exp2(torch.randint(-4, 4, (idx.shape[0], 1),
                                                                                       generator=g))
        c, cs = fp8_kernels.gather_cols(src.to(device), meta, r)
        operands.append((c, cs))
        rows.append(_token_axis_to_rows(c.cpu(), None if cs is None else cs.cpu(), counts, r).double())
    want = torch.zeros(len(counts), P, Q, dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts):
        want[e] = rows[0][start:start + n].t() @ rows[1][start:start + n]
        start += n
    return meta, r, operands, want


def _wgrad_error(got, want):
    """Largest |error| of each expert's dW relative to that expert's largest |dW| (1 where the
    expert has no rows: then dW must be exactly zero)."""
    err = (got.double().cpu() - want).abs().amax((1, 2))
    scale = want.abs().amax((1, 2))
    return torch.where(scale > 0, err / scale.clamp_min(1e-300), (err > 0).double())


@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8", "mxfp8-bytes"])
@pytest.mark.parametrize("counts,P,Q", [([0, 130, 5, 0, 257, 64], 256, 256),  # empty, partial, < one K step
                                        ([3, 0, 128, 300], 512, 256)])
def test_every_wgrad_candidate_matches_float64(monkeypatch, recipe_name, counts, P, Q):
    """Every candidate launch: dW within float32 summation error of the float64 product of the
    operands it read (observed 2.5e-7; a wrong scale or a lost K step is O(1)), empty experts
    exactly zero, no unwritten element (poisoned buffers). No bitwise equality between candidates
    here: the interpreter's numpy dots order their sums by the tile's shape (they differ by ~1 ulp)."""
    from moekit.ops.moe import fp8_kernels

    monkeypatch.setattr(triton_meta, "poison_buffers", True)
    meta, r, (a, b), want = _wgrad_problem(counts, P, Q, recipe_name, seed=P + len(counts))
    for candidate in fp8_kernels.WGRAD_CANDIDATES:
        assert candidate.fits(P, Q)
        monkeypatch.setattr(fp8_kernels, "wgrad_force", candidate.name)
        got = fp8_kernels.grouped_wgrad(a, b, meta, r, torch.float32)
        assert got.shape == (len(counts), P, Q) and torch.isfinite(got).all(), candidate.name
        err = _wgrad_error(got, want)
        assert err.max() < 1e-6, (candidate.name, err.tolist())


def _meta_with_rows(rows, experts):
    """Routing metadata whose mean rows per expert is rows / experts (the choice reads only sizes)."""
    return triton_meta.RoutingMeta(torch.zeros(experts, dtype=torch.int32), torch.zeros(rows, dtype=torch.int32),
                                   experts, 8)


@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8"])
def test_wgrad_launch_follows_the_rows_table(recipe_name):
    """Each WGRAD_BY_ROWS entry up to its bound, the default past every bound; a tile that does not
    divide dW is never chosen."""
    from moekit.ops.moe import fp8_kernels

    r = recipe(recipe_name)
    table = fp8_kernels.WGRAD_BY_ROWS[recipe_name]
    last = max([bound for bound, _ in table], default=0)
    assert fp8_kernels.wgrad_launch(_meta_with_rows(64 * (last + 1), 64), 1024, 1024, r) is fp8_kernels.WGRAD_DEFAULT
    for i, (bound, candidate) in enumerate(table):
        if all(b < bound for b, _ in table[:i]):  # not shadowed by an earlier entry
            assert fp8_kernels.wgrad_launch(_meta_with_rows(64 * bound, 64), 1024, 1024, r) is candidate
    # 128 x 384: only tiles of 128 columns or fewer divide it.
    chosen = fp8_kernels.wgrad_launch(_meta_with_rows(64, 64), 128, 384, r)
    assert chosen.fits(128, 384)


# The two dW of one fwd+bwd (down: hidden x ffn, up: 2 * ffn x hidden) at the shapes the H200 swept.
MEASURED_WGRAD_SHAPES = {"deepseek-v3": (256, 256, [(7168, 2048), (4096, 7168)]),  # rows per expert, experts
                         "mixtral-8x7b": (2048, 8, [(4096, 14336), (28672, 4096)])}


@pytest.mark.parametrize("shape", list(MEASURED_WGRAD_SHAPES))
def test_wgrad_launch_at_the_measured_shapes(shape):
    """The sweep's verdict (2026-11-29): mxfp8 takes 128x128/8w/3s from a single row per expert up to
    2048 (deepseek-v3's 256, mixtral-8x7b's 2048 and between), fp8 the default 64x128/4w/3s at every
    row count; past 2048 (unmeasured) mxfp8 goes back to the default, and so it does where 128 does
    not divide dW's rows."""
    from moekit.ops.moe import fp8_kernels

    rows, experts, sizes = MEASURED_WGRAD_SHAPES[shape]
    fp8_recipe, mx_recipe = recipe("fp8"), recipe("mxfp8")
    for mean_rows in (1, rows // 2, rows):
        meta = _meta_with_rows(mean_rows * experts, experts)
        for P, Q in sizes:
            assert fp8_kernels.wgrad_launch(meta, P, Q, mx_recipe).name == "128x128/8w/3s", (mean_rows, P, Q)
            assert fp8_kernels.wgrad_launch(meta, P, Q, fp8_recipe).name == "64x128/4w/3s", (mean_rows, P, Q)
    for mean_rows in (2049, 4096):
        meta = _meta_with_rows(mean_rows * experts, experts)
        for P, Q in sizes:
            assert fp8_kernels.wgrad_launch(meta, P, Q, mx_recipe) is fp8_kernels.WGRAD_DEFAULT
            assert fp8_kernels.wgrad_launch(meta, P, Q, fp8_recipe) is fp8_kernels.WGRAD_DEFAULT
    assert fp8_kernels.wgrad_launch(_meta_with_rows(rows * experts, experts), 192, 256,
                                    mx_recipe) is fp8_kernels.WGRAD_DEFAULT


def test_wgrad_launch_skips_tiles_that_do_not_divide(monkeypatch):
    from moekit.ops.moe import fp8_kernels

    wide = next(c for c in fp8_kernels.WGRAD_CANDIDATES if c.bn == 256)
    monkeypatch.setitem(fp8_kernels.WGRAD_BY_ROWS, "fp8", ((512, wide),))
    r = recipe("fp8")
    assert fp8_kernels.wgrad_launch(_meta_with_rows(512 * 4, 4), 256, 512, r) is wide
    assert fp8_kernels.wgrad_launch(_meta_with_rows(513 * 4, 4), 256, 512, r) is fp8_kernels.WGRAD_DEFAULT
    assert fp8_kernels.wgrad_launch(_meta_with_rows(512 * 4, 4), 256, 384, r) is fp8_kernels.WGRAD_DEFAULT


def test_wgrad_launch_errors_name_the_problem(monkeypatch):
    from moekit.ops.moe import fp8_kernels

    r = recipe("fp8")
    meta = _meta_with_rows(64, 4)
    monkeypatch.setattr(fp8_kernels, "wgrad_force", "96x128/4w/3s")
    with pytest.raises(ValueError, match="unknown weight-gradient launch '96x128/4w/3s'"):
        fp8_kernels.wgrad_launch(meta, 256, 256, r)
    wide = next(c for c in fp8_kernels.WGRAD_CANDIDATES if c.bn == 256)
    monkeypatch.setattr(fp8_kernels, "wgrad_force", wide.name)
    with pytest.raises(ValueError, match=f"{wide.name}: its {wide.bm} x 256 tile does not divide dW's 256 x 384"):
        fp8_kernels.wgrad_launch(meta, 256, 384, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8", "mxfp8-bytes"])
def test_gpu_every_wgrad_candidate_matches_float64(monkeypatch, recipe_name):
    """As the interpreter test, on the GPU (FP8 tensor cores; bf16 ones for MX values) at a
    deepseek-v3-like spread (24 experts of 0 to 400 rows, most under two K steps) and a wider dW;
    equality between the candidates is reported by benchmarks/moe_fp8.py --wgrad-sweep, not asserted here (wgmma
    instructions of different N need not order their in-instruction sums alike). FP8 wgmma keeps
    a partial sum of fewer bits than float32 within each 128-token step (DeepSeek-V3 measured ~14
    on the H800), hence fp8's looser bound; MX multiplies exact bf16 values in float32."""
    from moekit.ops.moe import fp8_kernels

    monkeypatch.setattr(triton_meta, "poison_buffers", True)
    g = torch.Generator().manual_seed(12)
    counts = torch.randint(0, 400, (24,), generator=g)
    counts[[3, 17]] = torch.tensor([0, 1])
    meta, r, (a, b), want = _wgrad_problem(counts.tolist(), 1024, 768, recipe_name, seed=13, device="cuda")
    for candidate in fp8_kernels.WGRAD_CANDIDATES:
        if not candidate.fits(1024, 768):
            continue
        monkeypatch.setattr(fp8_kernels, "wgrad_force", candidate.name)
        got = fp8_kernels.grouped_wgrad(a, b, meta, r, torch.float32)
        err = _wgrad_error(got, want)
        assert err.max() < {"fp8": 2e-3, "mxfp8": 1e-5, "mxfp8-bytes": 1e-5}[recipe_name], (candidate.name,
                                                                                           err.tolist())


def test_weight_cache_quantizes_each_weight_once_per_update(monkeypatch):
    """Gradient-accumulation micro-batches reuse the quantized weights (bit-identical results), an
    in-place update re-quantizes only the weight it changed, an update through ``.data`` (invisible
    to the version counter) needs ``clear_all()``, an optimizer step (fused: no counter bump either)
    empties the cache, and inference caches its own form."""
    calls = []

    def counted(name, real):
        def wrapper(w, *args, **kwargs):
            calls.append((name, tuple(w.shape)))
            return real(w, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(fp8, "quantize_weight_both", counted("both", fp8.quantize_weight_both))
    monkeypatch.setattr(fp8, "quantize_weight", counted("rows", fp8.quantize_weight))
    leaves, idx, grad = _problem(40, 128, 128, 5, 2, "swiglu", seed=2)
    up, down = tuple(leaves[2].shape), tuple(leaves[3].shape)
    cache = WeightCache()

    def cached(*args):
        return fp8.routed_experts(*args, weight_cache=cache)

    def check(expected_calls):  # the cached run's quantizations; its results equal the uncached path's
        calls.clear()
        got = _run(cached, leaves, idx, grad, "swiglu")
        assert calls == expected_calls
        want = _run(fp8.routed_experts, leaves, idx, grad, "swiglu")
        for name, g, w in zip(("out", "dx", "dweight", "dw_up", "dw_down"), got, want, strict=True):
            assert torch.equal(g, w), name

    check([("both", up), ("both", down)])  # a step's first micro-batch quantizes both weights
    check([])  # the next micro-batch reuses them
    with torch.no_grad():
        leaves[2].mul_(1.5)  # what an optimizer step does to w_up
    check([("both", up)])
    leaves[3].data.mul_(0.5)  # bypasses the version counter: the cache cannot see it...
    calls.clear()
    stale = _run(cached, leaves, idx, grad, "swiglu")
    assert calls == [] and not torch.equal(stale[0], _run(fp8.routed_experts, leaves, idx, grad, "swiglu")[0])
    clear_all()  # ...so such an update is followed by clear_all()
    check([("both", up), ("both", down)])
    leaves[3].grad = torch.ones_like(leaves[3])
    version = leaves[3]._version
    torch.optim.AdamW([leaves[3]], lr=0.1, fused=True).step()  # a fused step leaves the counter as it was,
    assert leaves[3]._version == version
    check([("both", up), ("both", down)])  # but every optimizer step empties the caches first
    calls.clear()
    with torch.no_grad():
        first = cached(leaves[0], idx, leaves[1], leaves[2], leaves[3], "swiglu")
        again = cached(leaves[0], idx, leaves[1], leaves[2], leaves[3], "swiglu")
    assert calls == [("rows", up), ("rows", down)] and torch.equal(first, again)
    for copied in (pickle.loads(pickle.dumps(cache)), copy.deepcopy(cache)):  # e.g. torch.save(model)
        assert isinstance(copied, WeightCache) and not copied._entries and cache._entries


@pytest.mark.parametrize("recipe_name", ["fp8", "mxfp8"])
@pytest.mark.parametrize("tokens,dropped", [(0, False), (6, True)])
def test_reference_with_no_routed_rows(recipe_name, tokens, dropped):
    """No tokens (an expert-parallel rank that got none) or every slot dropped: the CPU path gives
    zeros and zero gradients, as the bf16 reference does, instead of a reshape error."""
    (x, w, w_up, w_down), idx, grad = _problem(max(tokens, 1), 128, 128, 3, 2, "swiglu", seed=7)
    x, w, grad = (t[:tokens].detach().requires_grad_(t.requires_grad) for t in (x, w, grad))
    idx = torch.full_like(idx[:tokens], -1) if dropped else idx[:tokens]
    out, dx, dweight, dw_up, dw_down = _run(lambda *a: fp8_reference.routed_experts(*a, recipe_name=recipe_name),
                                            [x, w, w_up, w_down], idx, grad, "swiglu")
    assert out.shape == dx.shape == (tokens, 128) and dweight.shape == (tokens, 2)
    for t in (out, dx, dweight, dw_up, dw_down):
        assert torch.all(t == 0)
    assert dw_up.shape == w_up.shape and dw_down.shape == w_down.shape


def test_double_backward_is_refused():
    """The FP8 backward is made of kernels: under create_graph=True its gradients are constants, and a
    second derivative through them used to leave out the experts' curvature without an error."""
    (x, w, w_up, w_down), idx, _ = _problem(8, 128, 128, 3, 2, "gelu", seed=2)
    out = fp8.routed_experts(x, idx, w, w_up, w_down, "gelu")
    with pytest.raises(RuntimeError, match=r"routed_experts \(fp8\) has no second derivative"):
        torch.autograd.grad(out.pow(2).sum() + (w_up**3).sum(), w_up, create_graph=True)
