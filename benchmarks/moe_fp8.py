"""FP8 / MXFP8 vs bf16 MoE layer, forward + backward, at the DESIGN.md shapes (one H200).

One ``moekit.MoE`` layer per shape (router included, bf16 parameters), the same weights and
inputs for every variant in one process; the variants differ only in the dispatcher's
(backend, precision): bf16 ``triton`` and ``grouped_mm``, and ``MoEConfig.precision`` "fp8"
(DeepSeek-V3 1x128 / 128x128) and "mxfp8" (``moekit.ops.moe.fp8``). Prints forward and
forward+backward medians (triton.testing.do_bench), TFLOP/s (6 * tokens * top_k * hidden *
ffn forward, 3x forward+backward) and each variant's speed-up over bf16 triton and grouped_mm.
Target: fp8 >= 1.4x moekit's bf16 path. "fp8-cached" / "mxfp8-cached" keep the quantized weights
between calls (``MoEConfig(cache_fp8_weights=True)``): what a gradient-accumulation micro-batch
after its step's first costs; "fp8" / "mxfp8" quantize the weights on every call, as a step's
first micro-batch (or a step without accumulation) does.

    python benchmarks/moe_fp8.py [--shapes deepseek-v3 mixtral-8x7b] [--variants ...] [--profile] [--sweep]
                                 [--wgrad-sweep] [--recipes fp8 mxfp8] [--values-sweep]

``--profile`` adds each FP8 stage's median time (quantizers, GEMM kernels) for one fwd+bwd;
``--values-sweep`` times the pass that writes MX values (``fp8_kernels.mx_values``: both layouts of a
mixtral-8x7b up-projection weight, rows of a [16384, 7168] activation) under a few tiles, as % of a
device copy, and checks every setting writes the default's bits;
``--sweep`` times fp8 and mxfp8 fwd+bwd under a few (num_warps, num_stages) launch settings;
``--wgrad-sweep`` times the weight gradient alone (both calls of a fwd+bwd) and the layer's fwd+bwd
under each weight-gradient candidate (``fp8_kernels.WGRAD_CANDIDATES``), per recipe, best first,
after comparing each candidate's dW with the default's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

from moekit import MoE, MoEConfig
from moekit.moe.dispatch import LocalDispatcher
from moekit.ops.moe import fp8, fp8_kernels
from moekit.ops.moe.fp8_recipe import RECIPES
from moekit.ops.moe.triton_meta import routing_meta
from moekit.ops.moe.weight_cache import WeightCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_moe import SHAPES  # noqa: E402  (the shape table lives in one place)

# (name, backend, precision, cached, MX as values): the layer's dispatcher is LocalDispatcher(backend,
# precision), its experts keep a WeightCache when cached; "mxfp8-bytes" keeps MX operands as E4M3 bytes
# and scales (fp8.MX_AS_VALUES = False), dequantized inside the GEMMs
VARIANTS = (("triton", "triton", "bf16", False, True), ("grouped_mm", "grouped_mm", "bf16", False, True),
            ("fp8", "triton", "fp8", False, True), ("fp8-cached", "triton", "fp8", True, True),
            ("mxfp8", "triton", "mxfp8", False, True), ("mxfp8-cached", "triton", "mxfp8", True, True),
            ("mxfp8-bytes", "triton", "mxfp8", False, False))
SWEEP = [(8, 3), (8, 4), (8, 2), (4, 3), (4, 4), (16, 3), (16, 2)]
VALUES_SWEEP = [(32, 4), (32, 2), (64, 4), (64, 8), (128, 8)]  # (rows per program, warps)


def run_layer(layer: MoE, x: torch.Tensor, grad_out: torch.Tensor | None):
    out = layer(x)
    if grad_out is None:
        return out
    return torch.autograd.grad(out, [x, *layer.parameters()], grad_out)


def bench(fn, rep: int = 100) -> float:
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


class StageTimer:
    """CUDA-event times of the FP8 op's stages (module functions wrapped while inside)."""

    TARGETS = [(fp8, "quantized_rows"), (fp8, "quantized_weight"), (fp8, "quantize_weight_both")] + [
        (fp8_kernels, n) for n in ("gather_up", "scatter_gemm", "down_dgrad", "act_backward", "gather_cols",
                                   "grouped_wgrad", "weight_grad")
    ] + [(fp8.bf16_kernels, "combine"), (fp8, "routing_meta")]

    def __enter__(self):
        self.events, self.originals = [], {}
        for module, name in self.TARGETS:
            self.originals[(module, name)] = fn = getattr(module, name)
            setattr(module, name, self._timed(name, fn))
        return self

    def __exit__(self, *exc):
        for (module, name), fn in self.originals.items():
            setattr(module, name, fn)

    def _timed(self, name, fn):
        def run(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.events.append((name, start, end))
            return out
        return run

    def totals(self, reps: int) -> dict[str, float]:
        torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for name, start, end in self.events:
            totals[name] = totals.get(name, 0.0) + start.elapsed_time(end) / reps
        return totals


def profile(layer, x, grad_out, precision: str) -> None:
    layer.set_dispatcher(LocalDispatcher("triton", precision))
    run_layer(layer, x, grad_out)
    reps = 5
    with StageTimer() as timer:
        for _ in range(reps):
            run_layer(layer, x, grad_out)
    totals = timer.totals(reps)
    print(f"  {precision} stages (ms per fwd+bwd, nested calls counted in both): " +
          ", ".join(f"{k} {v:.2f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])), flush=True)


def sweep(layer, x, grad_out, precision: str) -> None:
    layer.set_dispatcher(LocalDispatcher("triton", precision))
    saved = dict(fp8_kernels.LAUNCH)
    results = []
    for warps, stages in SWEEP:
        fp8_kernels.LAUNCH.update(num_warps=warps, num_stages=stages)
        try:
            results.append((bench(lambda: run_layer(layer, x, grad_out)), f"{warps}w/{stages}s"))
        except Exception as err:  # out of shared memory / registers
            results.append((float("inf"), f"{warps}w/{stages}s ({type(err).__name__})"))
    fp8_kernels.LAUNCH.clear()
    fp8_kernels.LAUNCH.update(saved)
    print(f"  {precision} launch sweep (fwd+bwd ms, best first): "
          + "  ".join(f"{n} {t:.2f}" for t, n in sorted(results)))


def wgrad_calls(s, r):
    """The two weight-gradient calls of one fwd+bwd at shape s, as (name, a_cols, b_cols): operands
    from ``gather_cols`` of random bf16 rows, uniform random top-k routing (the routing meta too)."""
    idx = torch.rand(s.tokens, s.experts, device="cuda").topk(s.top_k, -1).indices
    meta = routing_meta(idx, s.experts)

    def cols(width):
        return fp8_kernels.gather_cols(torch.randn(s.tokens, width, device="cuda", dtype=torch.bfloat16), meta, r)

    up = 2 * s.ffn  # MoEConfig's default activation, swiglu, is gated
    return meta, [("down", cols(s.hidden), cols(s.ffn)), ("up", cols(up), cols(s.hidden))]


def same_as(got: torch.Tensor, want: torch.Tensor, experts_per_slice: int = 16) -> str:
    if torch.equal(got, want):
        return "bit-equal"
    # A few experts at a time: a float32 difference of deepseek-v3's whole dW would take 28 GB.
    differing, largest = 0, 0.0
    for g, w in zip(got.split(experts_per_slice), want.split(experts_per_slice), strict=True):
        diff = (g.float() - w.float()).abs()
        differing += int((diff > 0).sum())
        largest = max(largest, diff.max().item())
    return (f"DIFFERS: {differing / want.numel():.1e} of elements, "
            f"max {largest / want.abs().max().item():.1e} of max|dW|")


def wgrad_sweep(layer, x, grad_out, s, r) -> None:
    """The weight gradient alone under each candidate that fits both calls (its dW compared with
    the default's first), then the layer's fwd+bwd under it; one table, fastest wgrad first."""
    meta, calls = wgrad_calls(s, r)
    sizes = [(a[0].shape[0], b[0].shape[0]) for _, a, b in calls]  # (P, Q) of each dW

    def wgrad(a_cols, b_cols):
        return fp8_kernels.grouped_wgrad(a_cols, b_cols, meta, r, torch.bfloat16)

    by_rows = sorted({fp8_kernels.wgrad_launch(meta, P, Q, r).name for P, Q in sizes})
    fitting = [c for c in fp8_kernels.WGRAD_CANDIDATES if all(c.fits(P, Q) for P, Q in sizes)]
    flops = sum(2 * s.tokens * s.top_k * P * Q for P, Q in sizes)
    dw_bytes = sum(2 * s.experts * P * Q for P, Q in sizes)
    rows, layer_ms = {}, {}
    try:
        fp8_kernels.wgrad_force = fp8_kernels.WGRAD_DEFAULT.name
        want = [wgrad(a, b) for _, a, b in calls]
        for c in fitting:
            fp8_kernels.wgrad_force = c.name
            checks = [same_as(wgrad(a, b), w) for (_, a, b), w in zip(calls, want, strict=True)]
            times = [bench(lambda a=a, b=b: wgrad(a, b)) for _, a, b in calls]
            rows[c.name] = (times, checks)
        del want
        torch.cuda.empty_cache()
        layer.set_dispatcher(LocalDispatcher("triton", r.name))
        for c in fitting:
            fp8_kernels.wgrad_force = c.name
            layer_ms[c.name] = bench(lambda: run_layer(layer, x, grad_out), rep=500)
    finally:
        fp8_kernels.wgrad_force = None
    print(f"  {r.name} weight gradient at {s.name} ({meta.order.numel() / s.experts:.0f} rows per expert; "
          f"chosen by rows now: {', '.join(by_rows)}; default {fp8_kernels.WGRAD_DEFAULT.name}), best first:")
    print(f"    {'candidate':18s} {'down ms':>8s} {'up ms':>8s} {'wgrad ms':>9s} {'TFLOP/s':>8s} {'dW GB/s':>8s} "
          f"{'layer f+b ms':>12s}  dW vs default (down; up)")
    default_ms = sum(rows[fp8_kernels.WGRAD_DEFAULT.name][0])
    for name, (times, checks) in sorted(rows.items(), key=lambda kv: sum(kv[1][0])):
        total = sum(times)
        print(f"    {name:18s} {times[0]:8.2f} {times[1]:8.2f} {total:9.2f} {flops / total / 1e9:8.0f} "
              f"{dw_bytes / total / 1e6:8.0f} {layer_ms[name]:12.2f}  "
              f"{'; '.join(checks)}  ({default_ms / total:.2f}x default)", flush=True)
    skipped = [c.name for c in fp8_kernels.WGRAD_CANDIDATES if c not in fitting]
    if skipped:
        print(f"    tiles not dividing dW here: {', '.join(skipped)}")


def bench_shape(s, args) -> None:
    cfg = MoEConfig(hidden_size=s.hidden, ffn_hidden_size=s.ffn, num_experts=s.experts, top_k=s.top_k)
    layer = MoE(cfg).to("cuda", torch.bfloat16)
    x = torch.randn(s.tokens, s.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(x)
    flops = 6 * s.tokens * s.top_k * s.hidden * s.ffn
    times = {}
    for variant, backend, precision, cached, as_values in VARIANTS:
        if variant not in args.variants:
            continue
        fp8.MX_AS_VALUES = as_values
        layer.set_dispatcher(LocalDispatcher(backend, precision))
        layer.experts.fp8_weights = WeightCache() if cached else None
        start = time.perf_counter()
        fwd, both = bench(lambda: run_layer(layer, x, None)), bench(lambda: run_layer(layer, x, grad_out))
        times[variant] = both
        layer.experts.fp8_weights = None
        torch.cuda.empty_cache()
        # printed as soon as measured: one shape's variants can take minutes (autotuning at 256 experts)
        ratios = " ".join(f"{times[ref] / both:10.2f}x" if ref in times else f"{'-':>11s}"
                          for ref in ("triton", "grouped_mm"))
        print(f"{s.name:14s} {variant:11s} {fwd:8.2f} {flops / fwd / 1e9:8.0f} {both:9.2f} "
              f"{3 * flops / both / 1e9:8.0f} {ratios}  ({time.perf_counter() - start:.0f} s incl. tuning)", flush=True)
    fp8.MX_AS_VALUES = True
    if args.profile:
        for precision in args.recipes:
            profile(layer, x, grad_out, precision)
    if args.sweep:
        for precision in args.recipes:
            sweep(layer, x, grad_out, precision)
    if args.wgrad_sweep:
        for precision in args.recipes:
            wgrad_sweep(layer, x, grad_out, s, fp8.storage(RECIPES[precision], x.device))
            torch.cuda.empty_cache()


def values_sweep() -> None:
    r = RECIPES["mxfp8"]
    w = torch.randn(8 * 28672, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16384, 7168, device="cuda", dtype=torch.bfloat16)
    copy = bench(lambda: w.clone(), rep=200)
    print(f"MX values pass; device copy of the weight {copy:.3f} ms = {4 * w.numel() / copy / 1e6:.0f} GB/s")
    saved = fp8_kernels.MX_VALUES_TILE, dict(fp8_kernels.MX_VALUES_LAUNCH)
    want = fp8_kernels.mx_values(w, r, True, True)
    try:
        for rows, warps in VALUES_SWEEP:
            fp8_kernels.MX_VALUES_TILE, fp8_kernels.MX_VALUES_LAUNCH = rows, {"num_warps": warps}
            got = fp8_kernels.mx_values(w, r, True, True)
            same = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(got, want, strict=True))
            both = bench(lambda: fp8_kernels.mx_values(w, r, True, True), rep=200)
            alone = bench(lambda: fp8_kernels.mx_values(x, r, True, False), rep=200)
            # bytes: the weight read once and written twice (both layouts), the activation read and written
            print(f"  {rows:3d} rows / {warps} warps: both layouts {both:.3f} ms ({1.5 * copy / both:.0%} of copy), "
                  f"rows alone {4 * x.numel() / alone / 1e6:.0f} GB/s; {'same bits' if same else 'BITS DIFFER'}",
                  flush=True)
    finally:
        fp8_kernels.MX_VALUES_TILE, fp8_kernels.MX_VALUES_LAUNCH = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["deepseek-v3", "mixtral-8x7b"],
                        choices=[s.name for s in SHAPES])
    parser.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS], choices=[v[0] for v in VARIANTS],
                        help="variants to time (ratios need triton / grouped_mm timed first)")
    parser.add_argument("--profile", action="store_true", help="per-stage times of the FP8 op")
    parser.add_argument("--sweep", action="store_true", help="fp8 launch settings sweep")
    parser.add_argument("--wgrad-sweep", action="store_true", help="weight-gradient candidate launches, per recipe")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                        help="the recipes --profile, --sweep and --wgrad-sweep run")
    parser.add_argument("--values-sweep", action="store_true", help="tiles of the MX values pass, then exit")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/moe_fp8.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    if args.values_sweep:
        values_sweep()
        return
    print(f"{'shape':14s} {'variant':11s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'f+b ms':>9s} {'TFLOP/s':>8s} "
          f"{'vs triton':>11s} {'vs grouped':>11s}")
    for s in SHAPES:
        if s.name in args.shapes:
            bench_shape(s, args)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
