"""Triton MoE kernels against their references (interpreter on CPU: fp32/fp16, and bf16 through
tests/ops/conftest.py's gpu_like_bf16; the GPU also runs real bf16)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton

from moekit.ops.activations import up_width
from moekit.ops.moe import grouped_mm, reference, triton_choice, triton_meta, triton_vendor
from moekit.ops.moe import triton as moe_triton
from moekit.ops.moe import triton_kernels as kernels
from moekit.ops.moe import triton_reference as ref_kernels

# The interpreter turns 0-d loop bounds into Python ints through a deprecated NumPy path.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTIVATIONS = ("swiglu", "geglu", "gelu")


def _tile_area(config) -> int:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]


@pytest.fixture(autouse=True, scope="module")
def few_configs_on_gpu():
    """On a GPU each autotuned kernel builds every config for each new specialisation, which over
    this file's dtypes, activations and shapes takes far longer than CI allows: the smallest config
    of each kind here (the kernels' logic; a few-rows call races the two, a larger one takes the
    other tile); benchmarks/gpu_check_moe.py checks the tuned configs at full size,
    test_few_rows_tiles_on_gpu every few-rows tile."""
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cuda":
            for kernel in (kernels._gather_gemm_kernel, kernels._scatter_gemm_kernel, kernels._wgrad_kernel,
                           kernels._wgrad2_kernel):
                plain = [c for c in kernel.configs if not c.kwargs.get("TMA")]
                pinned = []
                for rows_class in (1, 0):
                    smallest = min(kernels._for_rows(plain, rows_class), key=_tile_area)
                    if smallest not in pinned:
                        pinned.append(smallest)
                mp.setattr(kernel, "configs", pinned)
        yield


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel forgets to write shows up."""
    monkeypatch.setattr(triton_meta, "poison_buffers", True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_routing(T, E, K, gen, drop=0.15, skew=False, empty=0):
    """Distinct experts per token; ``empty`` experts get no token; ``skew`` sends most to expert 0/1."""
    live = E - empty
    scores = torch.rand(T, live, generator=gen)
    if skew:
        scores[:, :2] += 2.0 * (torch.rand(T, 1, generator=gen) < 0.8)
    idx = scores.argsort(-1, descending=True)[:, :K] + empty  # experts 0..empty-1 stay empty
    idx = torch.where(torch.rand(T, K, generator=gen) < drop, -1, idx)
    return idx.to(DEVICE), torch.rand(T, K, generator=gen).to(DEVICE)


def make_operands(T, H, F, E, K, activation, dtype, seed, **routing):
    gen = torch.Generator().manual_seed(seed)
    U = up_width(activation, F)
    x = torch.randn(T, H, generator=gen)
    w_up = torch.randn(E, U, H, generator=gen) / H**0.5
    w_down = torch.randn(E, H, F, generator=gen) / F**0.5
    idx, weight = make_routing(T, E, K, gen, **routing)
    return x.to(DEVICE, dtype), idx, weight, w_up.to(DEVICE, dtype), w_down.to(DEVICE, dtype), gen


def check_against_reference(T, H, F, E, K, activation, dtype, seed, tol, **routing):
    x, idx, weight, w_up, w_down, gen = make_operands(T, H, F, E, K, activation, dtype, seed, **routing)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, w_up, w_down)]
    out = moe_triton.routed_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3], activation)
    assert out.dtype == dtype and out.shape == (T, H)
    grad_out = torch.randn(T, H, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))

    ref_dtype = torch.float64 if DEVICE == "cpu" else torch.float32
    ref_leaves = [t.detach().to(ref_dtype).requires_grad_(True) for t in (x, weight, w_up, w_down)]
    ref = reference.routed_experts(ref_leaves[0], idx, ref_leaves[1], ref_leaves[2], ref_leaves[3], activation)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.to(ref_dtype))

    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < tol, rel_err(out, ref)
    for name, g, r in zip(("x", "topk_weight", "w_up", "w_down"), grads, ref_grads):
        assert torch.isfinite(g).all(), f"d{name} has unwritten (NaN) elements"
        assert rel_err(g, r) < tol, (name, rel_err(g, r))
    dropped = idx < 0
    if dropped.any():
        assert (grads[1][dropped] == 0).all()


# (T, H, F, E, K): ragged sizes so every tile edge is masked somewhere
SHAPES = [(10, 24, 20, 4, 2), (33, 32, 48, 6, 1), (17, 40, 16, 8, 3), (48, 16, 40, 3, 2)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp32(shape, activation):
    seed = 3 * SHAPES.index(shape) + ACTIVATIONS.index(activation)
    check_against_reference(*shape, activation, torch.float32, seed=seed, tol=1e-5)


@pytest.mark.parametrize("routing", [dict(skew=True), dict(empty=3), dict(drop=0.6), dict(drop=0.0)])
def test_uneven_loads_fp32(routing):
    check_against_reference(40, 32, 24, 8, 2, "swiglu", torch.float32, seed=7, tol=1e-5, **routing)


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the autotuner races TMA and pointer configs itself")
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_tma_weight_loads_match_reference(monkeypatch, activation):
    """The configs that read weights through TMA descriptors, pinned (ragged N and K tiles)."""
    for kernel in (kernels._gather_gemm_kernel, kernels._scatter_gemm_kernel):
        tma = [triton.Config({**c.kwargs, "TMA": True}, num_warps=c.num_warps, num_stages=c.num_stages)
               for c in kernel.configs]
        monkeypatch.setattr(kernel, "configs", tma)
    check_against_reference(37, 40, 24, 5, 2, activation, torch.float32, seed=17, tol=1e-5, empty=1)


def test_matches_reference_fp16():
    check_against_reference(24, 32, 32, 4, 2, "geglu", torch.float16, seed=3, tol=1e-2)


def test_every_slot_dropped_gives_zero_output_and_grads():
    x, idx, weight, w_up, w_down, _ = make_operands(6, 16, 16, 3, 2, "swiglu", torch.float32, seed=1)
    idx = torch.full_like(idx, -1)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, w_up, w_down)]
    out = moe_triton.routed_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3], "swiglu")
    out.sum().backward()
    assert (out == 0).all()
    assert all((t.grad == 0).all() for t in leaves)


@pytest.mark.parametrize("wanted", [(1,), (0,), (2, 3)])
def test_partial_gradients(wanted):
    """Only some inputs need a gradient: each backward branch alone still matches the reference."""
    x, idx, weight, w_up, w_down, gen = make_operands(18, 24, 20, 4, 2, "swiglu", torch.float32, seed=9)
    operands = [x, weight, w_up, w_down]
    leaves = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(operands)]
    grad_out = torch.randn(x.shape, generator=gen).to(DEVICE)
    out = moe_triton.routed_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3], "swiglu")
    grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out)
    ref_leaves = [t.double().requires_grad_(i in wanted) for i, t in enumerate(operands)]
    ref = reference.routed_experts(ref_leaves[0], idx, ref_leaves[1], ref_leaves[2], ref_leaves[3], "swiglu")
    ref_grads = torch.autograd.grad(ref, [ref_leaves[i] for i in wanted], grad_out.double())
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def test_inference_path_skips_saving_and_matches():
    x, idx, weight, w_up, w_down, _ = make_operands(20, 24, 16, 5, 2, "swiglu", torch.float32, seed=2)
    with torch.no_grad():
        out = moe_triton.routed_experts(x, idx, weight, w_up, w_down, "swiglu")
    ref = reference.routed_experts(x.double(), idx, weight.double(), w_up.double(), w_down.double(), "swiglu")
    assert out.grad_fn is None
    assert rel_err(out, ref) < 1e-5


# ----------------------------------------------------------------------------- kernel by kernel

def _meta_case(activation="swiglu", seed=11, T=21, H=24, F=20, E=5, K=2):
    x, idx, weight, w_up, w_down, gen = make_operands(T, H, F, E, K, activation, torch.float32, seed, empty=1)
    return x, idx, weight, w_up, w_down, gen, triton_meta.routing_meta(idx, E)


def test_routing_meta_is_a_stable_counting_sort():
    _, idx, *_, meta = _meta_case()
    flat = idx.reshape(-1).cpu()
    live = flat[flat >= 0]
    assert torch.equal(meta.counts.cpu().long(), torch.bincount(live, minlength=meta.num_experts))
    key = torch.where(flat < 0, meta.num_experts, flat)
    order = meta.order.cpu().long()
    assert torch.equal(order.sort().values, torch.arange(flat.numel()))  # a permutation
    sorted_key = key[order]
    assert (sorted_key[1:] >= sorted_key[:-1]).all()
    same = sorted_key[1:] == sorted_key[:-1]
    assert (order[1:][same] > order[:-1][same]).all()  # stable


def test_routing_meta_rejects_bad_indices():
    if DEVICE == "cuda":  # a failed device-side assert ends the process's CUDA context: run it apart
        code = ("import torch; from moekit.ops.moe import triton_meta; "
                "triton_meta.routing_meta(torch.tensor([[0, 5]], device='cuda'), 4); torch.cuda.synchronize()")
        died = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert died.returncode != 0 and "topk_idx entries must lie in [-1, 4)" in died.stderr
    else:
        with pytest.raises(RuntimeError, match=r"topk_idx entries must lie in \[-1, 4\)"):
            triton_meta.routing_meta(torch.tensor([[0, 5]], device=DEVICE), 4)
    with pytest.raises(TypeError, match="topk_idx"):
        triton_meta.routing_meta(torch.tensor([[0.0, 1.0]], device=DEVICE), 4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gather_kernels(activation):
    x, idx, weight, w_up, w_down, gen, meta = _meta_case(activation)
    rows = int(meta.counts.sum())
    h, a = kernels.gather_up(x, w_up, meta, activation, store_h=True)
    h_ref, a_ref = ref_kernels.gather_up(x.double(), w_up.double(), meta, activation)
    assert rel_err(h[:rows], h_ref) < 1e-5 and rel_err(a[:rows], a_ref) < 1e-5

    dout = torch.randn(x.shape, generator=gen).to(DEVICE)
    dh, dweight = kernels.gather_down_dgrad(dout, w_down, h, weight, meta, activation, weight_grad=True)
    dh_ref, dweight_ref = ref_kernels.gather_down_dgrad(dout.double(), w_down.double(), h.double(), weight,
                                                        meta, activation)
    assert rel_err(dh[:rows], dh_ref) < 1e-5
    assert rel_err(dweight, dweight_ref) < 1e-5
    assert (dweight[idx.reshape(-1) < 0] == 0).all()  # dropped slots: never written, zero
    dh_only, none = kernels.gather_down_dgrad(dout, w_down, h, weight, meta, activation, weight_grad=False)
    assert none is None and torch.equal(dh_only[:rows], dh[:rows])


@pytest.mark.parametrize("transpose_w", [True, False])
def test_scatter_gemm(transpose_w):
    x, idx, weight, w_up, w_down, gen, meta = _meta_case()
    w = w_down if transpose_w else w_up  # [E, H, F] used as W^T, or [E, U, H] used as is
    src = torch.randn(idx.numel(), w.shape[2] if transpose_w else w.shape[1], generator=gen).to(DEVICE)
    buf = kernels.scatter_gemm(src, w, meta, transpose_w)
    rows, assignment = ref_kernels.scatter_gemm(src.double(), w.double(), meta, transpose_w)
    assert rel_err(buf[assignment], rows) < 1e-5


@pytest.mark.parametrize("gather_a,gather_b,scaled", [(True, False, True), (False, True, False)])
def test_grouped_wgrad(gather_a, gather_b, scaled):
    x, idx, weight, w_up, w_down, gen, meta = _meta_case()
    n = idx.numel()
    a = torch.randn(x.shape[0] if gather_a else n, 24, generator=gen).to(DEVICE)
    b = torch.randn(x.shape[0] if gather_b else n, 36, generator=gen).to(DEVICE)
    w = weight if scaled else None
    dw = kernels.grouped_wgrad(a, b, meta, gather_a, gather_b, w)
    dw_ref = ref_kernels.grouped_wgrad(a.double(), b.double(), meta, gather_a, gather_b, w)
    assert rel_err(dw, dw_ref) < 1e-5
    assert (dw[0] == 0).all()  # expert 0 is empty: its gradient is written, and zero


@pytest.mark.parametrize("wgrad2", [False, True], ids=["wgrad", "wgrad2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("routing", [dict(skew=True, empty=2), dict(empty=0, drop=0.0)])
def test_both_wgrad_kernels(monkeypatch, wgrad2, dtype, routing):
    """Either wgrad kernel, whatever MOEKIT_TRITON_WGRAD2 says: uneven experts (one with several
    token steps), empty ones, ragged P and Q spanning several tiles, each gather / weighting."""
    monkeypatch.setattr(kernels, "WGRAD2", wgrad2)
    gen = torch.Generator().manual_seed(23)
    deepest = max(c.kwargs["BLOCK_K"] for c in (*kernels.WGRAD_CONFIGS, *kernels.WGRAD2_CONFIGS))
    T, E, K, P, Q = 40 if deepest <= 16 else 600, 6, 2, 37, 45  # the GPU's token steps are up to 128 deep
    idx, weight = make_routing(T, E, K, gen, **routing)
    meta = triton_meta.routing_meta(idx, E)
    assert int(meta.counts.max()) > deepest  # a multi-step token loop, whichever config runs
    n = idx.numel()
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for gather_a, gather_b, w in [(True, False, weight), (False, True, None), (True, True, weight),
                                  (False, False, None)]:
        a = torch.randn(T if gather_a else n, P, generator=gen).to(DEVICE, dtype)
        b = torch.randn(T if gather_b else n, Q, generator=gen).to(DEVICE, dtype)
        dw = kernels.grouped_wgrad(a, b, meta, gather_a, gather_b, w)
        dw_ref = ref_kernels.grouped_wgrad(a.double(), b.double(), meta, gather_a, gather_b, w)
        assert dw.dtype == dtype and dw.shape == (E, P, Q)
        assert rel_err(dw, dw_ref) < tol, (gather_a, gather_b, rel_err(dw, dw_ref))
        empty = meta.counts == 0
        assert (dw[empty] == 0).all()  # written, and zero


def test_combine():
    x, idx, weight, *_, gen, meta = _meta_case()
    buf = torch.randn(idx.numel(), 40, generator=gen).to(DEVICE)
    buf[idx.reshape(-1) < 0] = float("nan")  # dropped rows are never written: never read them
    for w in (weight, None):
        out = kernels.combine(buf, idx, w, torch.float32)
        assert rel_err(out, ref_kernels.combine(buf.double(), idx, w, torch.float64)) < 1e-6


def test_combine_through_a_row_map():
    x, idx, weight, *_, gen, meta = _meta_case()
    sorted_buf = torch.randn(idx.numel(), 40, generator=gen).to(DEVICE)
    slot_row = torch.empty_like(meta.order)
    slot_row[meta.order.long()] = torch.arange(idx.numel(), dtype=slot_row.dtype, device=slot_row.device)
    out = kernels.combine(sorted_buf, idx, weight, torch.float32, slot_row=slot_row)
    by_slot = sorted_buf[slot_row.long()]
    assert rel_err(out, ref_kernels.combine(by_slot.double(), idx, weight, torch.float64)) < 1e-6


# ----------------------------------------------------------------------------- vendor GEMM path

needs_grouped_mm = pytest.mark.skipif(
    grouped_mm.unsupported_reason(torch.empty(1, 4, device=DEVICE), torch.empty(1, 4, 4, device=DEVICE),
                                  torch.empty(1, 4, 4, device=DEVICE)) is not None,
    reason="torch._grouped_mm cannot run fp32 here")


@pytest.fixture
def force(monkeypatch):
    def pin(impl):
        monkeypatch.setattr(triton_choice, "force", impl)
    return pin


@needs_grouped_mm
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("routing", [dict(), dict(empty=3, drop=0.3), dict(skew=True)])
def test_vendor_path_matches_reference(force, activation, routing):
    force("vendor")
    check_against_reference(40, 32, 24, 8, 2, activation, torch.float32, seed=13, tol=1e-5, **routing)


@needs_grouped_mm
def test_vendor_glue_kernels():
    x, idx, weight, w_up, w_down, gen, meta = _meta_case("geglu")
    rows = int(meta.counts.sum())
    for w in (None, weight):
        got = triton_vendor.gather_rows(x, meta, w)[:rows]
        assert rel_err(got, ref_kernels.gather_rows(x.double(), meta, w)) < 1e-6
    h = torch.randn(idx.numel(), w_up.shape[1], generator=gen).to(DEVICE)
    a = triton_vendor.act_rows(h, meta, "geglu")[:rows]
    assert rel_err(a, ref_kernels.act_rows(h.double(), meta, "geglu")) < 1e-6
    da = torch.randn(idx.numel(), w_down.shape[2], generator=gen).to(DEVICE)
    dh, dweight = triton_vendor.act_rows_backward(da, h, weight, meta, "geglu", weight_grad=True)
    dh_ref, dweight_ref = ref_kernels.act_rows_backward(da.double(), h.double(), weight, meta, "geglu")
    assert rel_err(dh[:rows], dh_ref) < 1e-6 and rel_err(dweight, dweight_ref) < 1e-6
    assert (dweight[idx.reshape(-1) < 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_race_times_the_gpu_not_the_host():
    """The race picks by GPU time, as a CUDA-graph replay sees it: a candidate slow to launch but quick
    on the GPU beats one quick to launch but slower on the GPU."""
    import time
    x = torch.zeros(1, device="cuda")

    def slow_launch():  # 0.2 ms of host time (three of them well inside the race's delay), a tiny kernel
        time.sleep(2e-4)
        x.add_(1)

    def slow_gpu():  # a kernel of about 0.05 ms
        torch.cuda._sleep(100_000)

    assert triton_choice._race({"slow_gpu": slow_gpu, "slow_launch": slow_launch}) == "slow_launch"
    assert triton_choice._race({"slow_launch": slow_launch, "slow_gpu": slow_gpu}) == "slow_launch"


def test_choice_pinned_from_the_environment():
    """MOEKIT_MOE_IMPL sets ``force`` when the module is first imported (a torchrun job's ranks)."""
    code = "from moekit.ops.moe import triton_choice; print(triton_choice.force)"
    for value, expected in (("vendor", "vendor"), ("triton", "triton"), ("", "None")):
        env = {**os.environ, "MOEKIT_MOE_IMPL": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_choice_rejects_bad_settings(force):
    with pytest.raises(ValueError, match="unknown MoE step"):
        triton_choice.run("sideways", (), {"triton": lambda: 0}, on_gpu=False)
    force("cublas")
    with pytest.raises(ValueError, match=r"force \(MOEKIT_MOE_IMPL\) must be one of"):
        triton_choice.run("up fwd", (), {"triton": lambda: 0}, on_gpu=False)
    force("vendor")
    with pytest.raises(RuntimeError, match="cannot run these operands"):
        triton_choice.run("up fwd", (), {"triton": lambda: 0}, on_gpu=False)
    force("triton")
    assert triton_choice.run("up fwd", (), {"triton": lambda: 1, "vendor": lambda: 2}, on_gpu=False) == 1
    force(None)  # off the GPU nothing is timed: Triton runs
    assert triton_choice.run("up fwd", (), {"triton": lambda: 1, "vendor": lambda: 2}, on_gpu=False) == 1


# ----------------------------------------------------------------------------- dropped slots, persistent grids

@pytest.fixture(params=["one", "many"], ids=["1-program", "more-programs-than-tiles"])
def programs(request, monkeypatch):
    """Persistent launches pinned to one program looping over every tile, or to more programs
    than tiles (most loop zero times); on a GPU the SM count is what gets pinned."""
    n = 1 if request.param == "one" else 10**6
    monkeypatch.setattr(kernels, "CPU_PROGRAMS", n)
    monkeypatch.setattr(kernels, "_sm_count", lambda index: n)
    return n


def test_persistent_programs_are_capped(monkeypatch):
    monkeypatch.setattr(kernels, "_sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)
    assert kernels.persistent_programs(10**6, gpu) == 132 * kernels.PROGRAMS_PER_SM
    assert kernels.persistent_programs(100, gpu) == 100  # never more than the worst-case tiles
    assert kernels.persistent_programs(10**6, gpu, per_sm=16) == 132 * 16
    assert kernels.persistent_programs(10**6, torch.device("cpu")) == kernels.CPU_PROGRAMS
    assert kernels.persistent_programs(0, torch.device("cpu")) == 1


IMPLS = ["triton", pytest.param("vendor", marks=needs_grouped_mm)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("drop", [0.5, 0.9])
def test_many_dropped_slots_match_reference(force, programs, impl, drop):
    """Half or nine tenths of the slots dropped (expert parallelism, capacity limits), forward and
    backward, on either implementation and either extreme of the program count."""
    force(impl)
    check_against_reference(40, 24, 20, 6, 3, "swiglu", torch.float32, seed=31, tol=1e-5, drop=drop, empty=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_slot_dropped_on_either_implementation(force, programs, impl):
    force(impl)
    x, idx, weight, w_up, w_down, _ = make_operands(12, 16, 16, 4, 2, "geglu", torch.float32, seed=6)
    idx = torch.full_like(idx, -1)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, w_up, w_down)]
    out = moe_triton.routed_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3], "geglu")
    out.backward(torch.randn_like(out))
    assert (out == 0).all()
    assert all((t.grad == 0).all() for t in leaves)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_single_expert(force, impl, activation):
    force(impl)
    check_against_reference(30, 24, 20, 1, 1, activation, torch.float32, seed=8, tol=1e-5, drop=0.4)


def _dropped_case(drop, seed=41, activation="swiglu", T=36, H=24, F=20, E=5, K=3):
    """Uneven counts (two busy experts, one empty) with ``drop`` of the slots dropped."""
    x, idx, weight, w_up, w_down, gen = make_operands(T, H, F, E, K, activation, torch.float32, seed,
                                                      drop=drop, skew=True, empty=1)
    return x, idx, weight, w_up, w_down, gen, triton_meta.routing_meta(idx, E)


def _defined_rows_match(got: torch.Tensor, ref: torch.Tensor, rows: int):
    """The first ``rows`` sorted rows match the reference; the rest stay unwritten (NaN poison)."""
    if rows:
        assert rel_err(got[:rows], ref) < 1e-5
    assert got[rows:].isnan().all(), "a row of a dropped slot was written"


@pytest.mark.parametrize("drop", [0.5, 0.9, 1.0])
def test_kernels_touch_no_dropped_row(programs, drop):
    """Each row-tiled kernel and vendor glue kernel, uneven counts, many (or all) slots dropped:
    defined rows match the reference, no row of a dropped slot is written."""
    x, idx, weight, w_up, w_down, gen, meta = _dropped_case(drop)
    rows = int(meta.counts.sum())
    dropped = idx.reshape(-1) < 0
    assert (rows == 0) == (drop == 1.0) and dropped.sum() > idx.numel() * drop / 2
    h, a = kernels.gather_up(x, w_up, meta, "swiglu", store_h=True)
    h_ref, a_ref = ref_kernels.gather_up(x.double(), w_up.double(), meta, "swiglu")
    _defined_rows_match(h, h_ref, rows)
    _defined_rows_match(a, a_ref, rows)

    h = torch.where(h.isnan(), torch.randn(h.shape, generator=gen).to(DEVICE), h)  # defined everywhere
    dout = torch.randn(x.shape, generator=gen).to(DEVICE)
    dh, dweight = kernels.gather_down_dgrad(dout, w_down, h, weight, meta, "swiglu", weight_grad=True)
    dh_ref, dweight_ref = ref_kernels.gather_down_dgrad(dout.double(), w_down.double(), h.double(), weight, meta,
                                                        "swiglu")
    _defined_rows_match(dh, dh_ref, rows)
    assert (dweight[dropped] == 0).all()
    if rows:
        assert rel_err(dweight, dweight_ref) < 1e-5

    src = torch.randn(idx.numel(), w_down.shape[2], generator=gen).to(DEVICE)
    buf = kernels.scatter_gemm(src, w_down, meta, transpose_w=True)
    buf_ref, assignment = ref_kernels.scatter_gemm(src.double(), w_down.double(), meta, transpose_w=True)
    if rows:
        assert rel_err(buf[assignment], buf_ref) < 1e-5
    assert buf[dropped].isnan().all(), "a dropped slot's row of the scatter buffer was written"

    if grouped_mm.unsupported_reason(x, w_up, w_down) is None:  # the vendor path's glue
        for w in (None, weight):
            _defined_rows_match(triton_vendor.gather_rows(x, meta, w), ref_kernels.gather_rows(x.double(), meta, w),
                                rows)
        _defined_rows_match(triton_vendor.act_rows(h, meta, "swiglu"),
                            ref_kernels.act_rows(h.double(), meta, "swiglu"), rows)
        da = torch.randn(idx.numel(), w_down.shape[2], generator=gen).to(DEVICE)
        dh, dweight = triton_vendor.act_rows_backward(da, h, weight, meta, "swiglu", weight_grad=True)
        dh_ref, dweight_ref = ref_kernels.act_rows_backward(da.double(), h.double(), weight, meta, "swiglu")
        _defined_rows_match(dh, dh_ref, rows)
        assert (dweight[dropped] == 0).all()


def test_results_do_not_depend_on_the_program_count(monkeypatch):
    """The persistent loop only changes which program computes a tile, never how: bit-identical
    results whether one program does every tile or each tile has its own."""
    x, idx, weight, w_up, w_down, gen, meta = _dropped_case(0.5, seed=43)
    dout = torch.randn(x.shape, generator=gen).to(DEVICE)
    results = []
    for n in (1, 2, 10**6):
        monkeypatch.setattr(kernels, "CPU_PROGRAMS", n)
        monkeypatch.setattr(kernels, "_sm_count", lambda index, n=n: n)
        h, a = kernels.gather_up(x, w_up, meta, "swiglu", store_h=True)
        dh, dweight = kernels.gather_down_dgrad(dout, w_down, h, weight, meta, "swiglu", weight_grad=True)
        buf = kernels.scatter_gemm(dh, w_up, meta, transpose_w=False)
        results.append([t.nan_to_num(nan=1234.5) for t in (h, a, dh, dweight, buf)])
    for other in results[1:]:
        assert all(torch.equal(r, o) for r, o in zip(results[0], other))


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_are_named():
    x, idx, weight, w_up, w_down, _ = make_operands(8, 16, 16, 3, 2, "swiglu", torch.float32, seed=4)
    with pytest.raises(TypeError, match="share a dtype"):
        moe_triton.routed_experts(x.half(), idx, weight, w_up, w_down)
    with pytest.raises(TypeError, match="dtype"):
        moe_triton.routed_experts(x.double(), idx, weight, w_up.double(), w_down.double())
    with pytest.raises(ValueError, match="w_up has 32 rows"):
        moe_triton.routed_experts(x, idx, weight, w_up, w_down, "gelu")
    with pytest.raises(ValueError, match="unknown activation"):
        moe_triton.routed_experts(x, idx, weight, w_up, w_down, "relu")
    with pytest.raises(TypeError, match="topk_weight"):
        moe_triton.routed_experts(x, idx, idx, w_up, w_down)


# ----------------------------------------------------------------------------- GPU (bf16)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("routing", [dict(), dict(skew=True), dict(empty=5)])
def test_bf16_on_gpu(activation, routing):
    check_against_reference(512, 256, 384, 16, 4, activation, torch.bfloat16, seed=5, tol=1e-2, **routing)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [*SHAPES, (300, 64, 100, 8, 2)])
def test_bf16_small_ragged_shapes_on_gpu(shape):
    """Small and ragged dims in bf16 on the GPU: sm_90 builds can go wrong where the interpreter is right
    (the linear-attention kernels did at 16- and 32-wide tiles)."""
    check_against_reference(*shape, "swiglu", torch.bfloat16, seed=SHAPES.index(shape) if shape in SHAPES else 11,
                            tol=1e-2, skew=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(16, 200, 136, 64, 8), (40, 96, 80, 8, 2)])
def test_few_rows_tiles_on_gpu(monkeypatch, force, shape):
    """Decode-sized calls (a few rows per expert) may take tiles of their own: each of them, pinned
    in turn on the fused kernels (not the vendor path), in bf16 against the reference, forward and
    backward."""
    force("triton")
    T, _, _, E, K = shape
    assert kernels.rows_class(T * K, E) > 0
    few = [c for c in kernels.GEMM_CONFIGS if c.kwargs["BLOCK_M"] <= kernels.FEW_ROWS_MAX_BLOCK_M]
    assert few
    for config in few:
        for kernel in (kernels._gather_gemm_kernel, kernels._scatter_gemm_kernel):
            monkeypatch.setattr(kernel, "configs", [config])
        check_against_reference(*shape, "swiglu", torch.bfloat16, seed=config.kwargs["BLOCK_N"], tol=1e-2, skew=True)


def test_calls_are_tuned_by_row_count(monkeypatch):
    """Up to FEW_ROWS_PER_EXPERT rows per expert, each power of two of the row count is its own
    tuning class, racing every tile; larger calls share class 0 and race only the tiles of more
    than FEW_ROWS_MAX_BLOCK_M rows (all tiles where a list has none of those)."""
    assert [kernels.rows_class(rows, 64) for rows in (1, 8, 100, 128, 1000, 1024, 1025, 10**6)] == \
        [1, 8, 128, 128, 1024, 1024, 0, 0]
    configs = kernels._configs([(128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (16, 64, 128, 4, 4), (32, 64, 128, 4, 4)],
                               tma=False)
    assert kernels._for_rows(configs, 2) == configs
    assert [c.kwargs["BLOCK_M"] for c in kernels._for_rows(configs, 0)] == [128, 64]
    assert kernels._for_rows(configs[2:3], 0) == configs[2:3]
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    args = {"counts_ptr": torch.zeros(3, dtype=torch.int32), "a_ptr": torch.zeros(2, dtype=torch.bfloat16),
            "TMA_OK": 0}
    assert kernels._prune(configs, {**args, "ROWS_CLASS": 4}) == configs
    assert kernels._prune(configs, {**args, "ROWS_CLASS": 0}) == configs[:2]
    assert (kernels.min_block_n(configs, 1), kernels.min_block_n(configs, 0)) == (64, 128)
    # The partials buffer of the down dgrad has a row for each column tile of any config it may take.
    for tuning_class in (0, 1):
        for fp32 in (False, True):
            args = {**args, "a_ptr": torch.zeros(2, dtype=torch.float32 if fp32 else torch.bfloat16),
                    "ROWS_CLASS": tuning_class}
            widest = max(triton.cdiv(1000, c.kwargs["BLOCK_N"]) for c in kernels._prune(configs, args))
            assert widest <= triton.cdiv(1000, kernels.min_block_n(configs, tuning_class))


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs real bf16: test_bf16_on_gpu")
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_bf16_in_the_interpreter_computing_like_the_gpu(activation, gpu_like_bf16):
    """tests/ops/conftest.py's gpu_like_bf16 makes the interpreter's bf16 dots and casts the GPU's."""
    check_against_reference(40, 64, 48, 4, 2, activation, torch.bfloat16, seed=9, tol=1e-2, skew=True)


def test_float32_operands_take_half_deep_tiles(monkeypatch):
    """4-byte operands: every tile at half BLOCK_K (same shared-memory bytes as bf16), duplicates
    dropped; 16-bit operands keep the configs as they are."""
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    configs = kernels._configs([(128, 256, 64, 8, 3), (128, 256, 32, 8, 3), (64, 128, 16, 4, 4)])
    counts = torch.zeros(3, dtype=torch.int32)
    wide = kernels._fit_operands(configs, {"counts_ptr": counts, "a_ptr": torch.zeros(2, dtype=torch.float32)})
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in wide] == [(256, 32), (256, 16), (128, 16)]
    assert all(c.num_warps == o.num_warps and c.num_stages == o.num_stages for c, o in zip(wide, configs))
    narrow = kernels._fit_operands(configs, {"counts_ptr": counts, "a_ptr": torch.zeros(2, dtype=torch.bfloat16)})
    assert narrow == configs


def test_double_backward_is_refused():
    """The backward is made of kernels: under create_graph=True the gradient it returns is a constant,
    and a second derivative through it used to leave out the experts' curvature without an error."""
    x, idx, weight, w_up, w_down, _ = make_operands(8, 16, 16, 3, 2, "swiglu", torch.float32, seed=9)
    w_up.requires_grad_(True)
    out = moe_triton.routed_experts(x, idx, weight, w_up, w_down)
    with pytest.raises(RuntimeError, match=r"routed_experts \(triton\) has no second derivative"):
        torch.autograd.grad(out.pow(2).sum() + (w_up**3).sum(), w_up, create_graph=True)
    out = moe_triton.routed_experts(x, idx, weight, w_up, w_down)  # a plain backward still runs
    (g,) = torch.autograd.grad(out.pow(2).sum(), w_up)
    ref = reference.routed_experts(x, idx, weight, w_up, w_down)
    (g_ref,) = torch.autograd.grad(ref.pow(2).sum(), w_up)
    assert rel_err(g, g_ref) < 1e-5
