"""MoE layer speed: moekit Triton vs sort + torch._grouped_mm vs a Hugging Face-style expert loop.

One ``moekit.MoE`` per DESIGN.md shape (router included), bf16, the same weights and inputs for
every backend in one process. Prints forward and forward+backward medians (triton.testing
.do_bench), TFLOP/s (6 * tokens * top_k * hidden * ffn forward, 3x that forward+backward), the
share of a bf16 8192^3 torch.matmul measured in the same run, and the ratio to grouped_mm.

    python benchmarks/moe_layer.py [--check] [--shapes olmoe ...] [--no-loop]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from moekit import MoE, MoEConfig
from moekit.moe.dispatch import LocalDispatcher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_moe import SHAPES  # noqa: E402  (the shape table lives in one place)

BACKENDS = ("triton", "grouped_mm", "reference")


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


def bench_shape(s, device, peak: float, verify: bool, no_loop: bool) -> bool:
    """Print one row per backend; False if the --check comparison failed."""
    cfg = MoEConfig(hidden_size=s.hidden, ffn_hidden_size=s.ffn, num_experts=s.experts, top_k=s.top_k)
    layer = MoE(cfg).to(device, torch.bfloat16)
    x = torch.randn(s.tokens, s.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(x)
    ok = check(layer, x, grad_out) if verify else True
    flops = 6 * s.tokens * s.top_k * s.hidden * s.ffn
    times = {}
    for backend in BACKENDS[:2] if no_loop else BACKENDS:
        layer.set_dispatcher(LocalDispatcher(backend))
        slow = backend == "reference"
        fwd = bench(lambda: run_layer(layer, x, None), slow)
        both = bench(lambda: run_layer(layer, x, grad_out), slow)
        times[backend] = (fwd, both)
        vs = times["grouped_mm"][1] / both if "grouped_mm" in times else float("nan")
        tflops = 3 * flops / both / 1e9
        print(f"{s.name:14s} {backend:11s} {fwd:8.2f} {flops / fwd / 1e9:8.0f} {both:11.2f} {tflops:8.0f} "
              f"{100 * tflops / peak:6.0f}% {vs:13.2f}x", flush=True)
    ratio = times["grouped_mm"][1] / times["triton"][1]
    print(f"{s.name:14s} triton fwd+bwd speed-up over grouped_mm: {ratio:.2f}x", flush=True)
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="first verify triton against the reference")
    p.add_argument("--shapes", nargs="*", default=[s.name for s in SHAPES])
    p.add_argument("--no-loop", action="store_true", help="skip the (slow) Hugging Face-style loop")
    args = p.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    peak = gemm_tflops(device)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 8192^3 matmul: {peak:.0f} TFLOP/s")
    header = f"{'shape':14s} {'backend':11s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s} " \
             f"{'% gemm':>7s} {'vs grouped_mm':>14s}"
    print(header)
    failed = False
    for s in (s for s in SHAPES if s.name in args.shapes):
        failed |= not bench_shape(s, device, peak, args.check, args.no_loop)
        torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
