"""MoE layer speed: moekit Triton vs sort + torch._grouped_mm vs a Hugging Face-style expert loop.

One ``moekit.MoE`` per DESIGN.md shape (router included), bf16, the same weights and inputs for
every backend in one process. Prints forward and forward+backward medians (triton.testing
.do_bench), TFLOP/s (6 * tokens * top_k * hidden * ffn forward, 3x that forward+backward), the
share of a bf16 8192^3 torch.matmul measured in the same run, and the ratio to grouped_mm.
The rows ``triton-fp8`` / ``triton-mxfp8`` (``--precisions``) run the same layer with
``precision="fp8"`` / ``"mxfp8"`` routed-expert GEMMs; a last line per shape gives their
forward+backward speed-up over the bf16 Triton row (``benchmarks/moe_fp8.py`` profiles them).

    python benchmarks/moe_layer.py [--check] [--shapes olmoe ...] [--no-loop] [--precisions fp8 mxfp8] [--profile]

``--profile`` prints, instead of the table, each step's time (forward and backward of
``routed_experts`` on uniform routing) on the fused Triton kernels and on the vendor grouped
GEMM with its glue, beside ``torch._grouped_mm`` alone on pre-permuted rows, and which one the
backend picks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from moekit import MoE, MoEConfig
from moekit.moe.dispatch import LocalDispatcher
from moekit.ops.moe import triton as moe_triton
from moekit.ops.moe import triton_choice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_moe import SHAPES, make_routing  # noqa: E402  (the shape table lives in one place)

BACKENDS = ("triton", "grouped_mm", "reference")
LOW_PRECISIONS = ("fp8", "mxfp8")  # rows on the Triton backend


def bench(fn, slow: bool) -> float:
    """Median ms; the expert loop is slow at 256 experts, so it gets a few reps only."""
    return do_bench(fn, warmup=5 if slow else 25, rep=50 if slow else 200, return_mode="median")


def gemm_tflops(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / bench(lambda: a @ b, slow=False) / 1e9


def run_layer(layer: MoE, x: torch.Tensor, grad_out: torch.Tensor | None):
    """Forward, and with ``grad_out`` the backward too; returns (output, grads) without
    accumulating into .grad (that add would be timed too)."""
    out = layer(x)
    if grad_out is None:
        return out, ()
    params = [p for p in layer.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out, [x, *params], grad_out)


def check(layer: MoE, x, grad_out) -> bool:
    results = {}
    for backend in ("triton", "reference"):
        layer.set_dispatcher(LocalDispatcher(backend))
        out, grads = run_layer(layer, x, grad_out)
        results[backend] = [out.detach(), *grads]
    ok = True
    names = ["out", "dx", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    for name, got, ref in zip(names, results["triton"], results["reference"]):
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        ok &= err < 1e-2
        print(f"  check {name:22s} rel_err={err:.2e} {'ok' if err < 1e-2 else 'FAIL'}")
    return ok


def bench_shape(s, device, peak: float, verify: bool, no_loop: bool, precisions=()) -> bool:
    """Print one row per backend (and per low precision); False if the --check comparison failed."""
    cfg = MoEConfig(hidden_size=s.hidden, ffn_hidden_size=s.ffn, num_experts=s.experts, top_k=s.top_k)
    layer = MoE(cfg).to(device, torch.bfloat16)
    x = torch.randn(s.tokens, s.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(x)
    ok = check(layer, x, grad_out) if verify else True
    flops = 6 * s.tokens * s.top_k * s.hidden * s.ffn
    times = {}
    rows = [(backend, "bf16") for backend in (BACKENDS[:2] if no_loop else BACKENDS)]
    for backend, precision in rows + [("triton", p) for p in precisions]:
        layer.set_dispatcher(LocalDispatcher(backend, precision))
        slow = backend == "reference"
        label = backend if precision == "bf16" else f"{backend}-{precision}"
        times[label] = (bench(lambda: run_layer(layer, x, None), slow),
                        bench(lambda: run_layer(layer, x, grad_out), slow))
    for backend, (fwd, both) in times.items():  # printed once grouped_mm's time is known
        tflops = 3 * flops / both / 1e9
        print(f"{s.name:14s} {backend:12s} {fwd:8.2f} {flops / fwd / 1e9:8.0f} {both:11.2f} {tflops:8.0f} "
              f"{100 * tflops / peak:6.0f}% {times['grouped_mm'][1] / both:13.2f}x", flush=True)
    ratio = times["grouped_mm"][1] / times["triton"][1]
    print(f"{s.name:14s} triton fwd+bwd speed-up over grouped_mm: {ratio:.2f}x", flush=True)
    for p in precisions:
        print(f"{s.name:14s} triton-{p} fwd+bwd speed-up over bf16 triton: "
              f"{times['triton'][1] / times[f'triton-{p}'][1]:.2f}x", flush=True)
    return ok


# ----------------------------------------------------------------------------- --profile

class StepTimer:
    """Wraps each step of the Triton backend (``triton_choice.run``) and the routing metadata
    with CUDA events; labels say which implementation ran."""

    def __init__(self):
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.originals = {}

    def __enter__(self):
        for module, name in ((triton_choice, "run"), (moe_triton, "routing_meta")):
            self.originals[(module, name)] = getattr(module, name)
        run, meta = self.originals[(triton_choice, "run")], self.originals[(moe_triton, "routing_meta")]
        triton_choice.run = lambda step, key, candidates, on_gpu: self._timed(
            f"{step} [{triton_choice.choose(step, key, candidates, on_gpu)}]", run, step, key, candidates, on_gpu)
        moe_triton.routing_meta = lambda *args: self._timed("routing meta", meta, *args)
        return self

    def __exit__(self, *exc):
        for (module, name), fn in self.originals.items():
            setattr(module, name, fn)

    def _timed(self, label, fn, *args):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        self.events.append((label, start, end))
        return out

    def medians(self) -> dict[str, float]:
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {}
        for label, start, end in self.events:
            times.setdefault(label, []).append(start.elapsed_time(end))
        return {label: sorted(ts)[len(ts) // 2] for label, ts in times.items()}


def _vendor_gemms(s, x, idx, w_up, w_down, dout):
    """The six grouped GEMMs alone, as ``torch._grouped_mm`` on pre-permuted rows (no glue)."""
    order = torch.sort(idx.reshape(-1), stable=True).indices
    offs = torch.cumsum(torch.bincount(idx.reshape(-1), minlength=s.experts), 0).to(torch.int32)
    token = order // s.top_k
    xs, ds = x[token], dout[token]
    a = torch.randn(xs.shape[0], s.ffn, device=x.device, dtype=x.dtype)
    dh = torch.randn(xs.shape[0], 2 * s.ffn, device=x.device, dtype=x.dtype)
    gmm = torch._grouped_mm
    return {
        "up fwd": lambda: gmm(xs, w_up.transpose(1, 2), offs=offs),
        "down fwd": lambda: gmm(a, w_down.transpose(1, 2), offs=offs),
        "down dgrad": lambda: gmm(ds, w_down, offs=offs),
        "down wgrad": lambda: gmm(ds.t(), a, offs=offs),
        "up wgrad": lambda: gmm(dh.t(), xs, offs=offs),
        "up dgrad": lambda: gmm(dh, w_up, offs=offs),
    }


def profile_shape(s, device, passes: int = 10) -> None:
    """Per-step medians of ``passes`` forward+backward runs on uniform routing (bf16), with every
    step pinned to Triton, then to the vendor GEMM, then as ``triton_choice`` picks."""
    torch.manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(s.tokens, s.hidden, device=device, dtype=dt, requires_grad=True)
    w_up = (torch.randn(s.experts, 2 * s.ffn, s.hidden, device=device) * s.hidden**-0.5).to(dt).requires_grad_()
    w_down = (torch.randn(s.experts, s.hidden, s.ffn, device=device) * s.ffn**-0.5).to(dt).requires_grad_()
    idx, weight = make_routing("uniform", s, device)
    weight.requires_grad_(True)
    dout = torch.randn_like(x)

    def step():
        out = moe_triton.routed_experts(x, idx, weight, w_up, w_down, "swiglu")
        return torch.autograd.grad(out, (x, weight, w_up, w_down), dout)

    totals, steps = {}, {}
    for impl in ("triton", "vendor", None):
        triton_choice.force = impl
        for _ in range(3):  # compiling, autotuning and the choice's timing happen here
            step()
        totals[impl or "auto"] = bench(step, slow=False)
        with StepTimer() as timer:
            for _ in range(passes):
                step()
        steps.update(timer.medians())
    triton_choice.force = None
    gemm_only = {label: bench(fn, slow=False) for label, fn in _vendor_gemms(
        s, x.detach(), idx, w_up.detach(), w_down.detach(), dout).items()}
    rows = s.tokens * s.top_k
    size = {"up fwd": 2, "down fwd": 1, "down dgrad": 1, "down wgrad": 1, "up wgrad": 2, "up dgrad": 2}
    print(f"\n{s.name}: routed_experts fwd+bwd ms (do_bench median): "
          + ", ".join(f"{k} {v:.2f}" for k, v in totals.items()))
    print(f"  step (median of {passes})  {'triton ms':>9s} {'TFLOP/s':>7s} {'vendor ms':>9s} {'TFLOP/s':>7s} "
          f"{'gemm-only ms':>12s} {'TFLOP/s':>7s}  auto picks")
    print(f"  {'routing meta':22s} {steps.get('routing meta', float('nan')):9.3f}")
    for label, mult in size.items():
        flop = 2 * rows * mult * s.ffn * s.hidden
        tri, ven = steps.get(f"{label} [triton]", float("nan")), steps.get(f"{label} [vendor]", float("nan"))
        picks = [impl for key, impl in triton_choice.chosen().items() if key[0] == label]
        print(f"  {label:22s} {tri:9.3f} {flop / tri / 1e9:7.0f} {ven:9.3f} {flop / ven / 1e9:7.0f} "
              f"{gemm_only[label]:12.3f} {flop / gemm_only[label] / 1e9:7.0f}  {','.join(picks) or '-'}",
              flush=True)
    print("  (down fwd and up dgrad include the combine over top-k; vendor steps include their glue)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="first verify triton against the reference")
    p.add_argument("--shapes", nargs="*", default=[s.name for s in SHAPES])
    p.add_argument("--no-loop", action="store_true", help="skip the (slow) Hugging Face-style loop")
    p.add_argument("--precisions", nargs="*", default=list(LOW_PRECISIONS), choices=LOW_PRECISIONS,
                   help="low-precision rows on the Triton backend (none: bf16 backends only)")
    p.add_argument("--profile", action="store_true",
                   help="time each Triton kernel (forward and backward) beside the cuBLAS grouped GEMM it replaces")
    args = p.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    peak = gemm_tflops(device)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 8192^3 matmul: {peak:.0f} TFLOP/s")
    if args.profile:
        for s in (s for s in SHAPES if s.name in args.shapes):
            profile_shape(s, device)
            torch.cuda.empty_cache()
        return 0
    header = f"{'shape':14s} {'backend':12s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s} " \
             f"{'% gemm':>7s} {'vs grouped_mm':>14s}"
    print(header)
    failed = False
    for s in (s for s in SHAPES if s.name in args.shapes):
        failed |= not bench_shape(s, device, peak, args.check, args.no_loop, args.precisions)
        torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
