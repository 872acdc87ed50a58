"""Routed experts at decode sizes: moekit's Triton kernels vs sort + torch._grouped_mm.

Decoding a batch of B tokens routed top-k over E experts gives each expert about B * k / E rows,
so a step reads every expert's weights once and computes little: it is bound by that read. Per
(shape, batch) this prints the routed-expert forward's time (router excluded; the call replayed
from a CUDA graph, as ``FastDecoder`` runs it), the used experts' weight bytes over that time, that
rate against a device-to-device copy's in the same run (bytes read plus written per second, so a
read-only stream can pass 100%), and moekit's speed-up over grouped_mm. Each result is checked
against the float32 reference first.

    python benchmarks/moe_decode.py [--shapes linear-moe-a0.3b-2b ...] [--batches 1 16 64] [--impl triton]

The "triton" rows are moekit's Triton backend as a model runs it: each GEMM step on the fused kernel
or on ``torch._grouped_mm`` with Triton glue, whichever ``triton_choice`` timed faster on the first
call. ``--impl triton`` (or ``vendor``) pins every step instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from moekit.ops import moe as moe_ops
from moekit.ops.moe import triton_choice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_moe import SHAPES, TOL, Shape, make_routing  # noqa: E402  (shapes and bf16 tolerance in one place)

# The experts of one linear-moe-a0.3b-2b layer (moekit/configs), the model benchmarks/generation.py decodes.
DECODE_SHAPES = [Shape("linear-moe-a0.3b-2b", 16, 1024, 896, 64, 8), *SHAPES]
BACKENDS = ("triton", "grouped_mm")


def replayed(fn):
    """``fn`` captured in a CUDA graph after two eager calls (tuning, first-call choices), and a
    function replaying it."""
    fn()
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(nbytes: int, device) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read + write counted once each)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * nbytes / ms / 1e6


def bench_shape(s: Shape, batch: int, device, copy_gbs: float) -> bool:
    torch.manual_seed(0)  # the routing draws from the default generator
    gen = torch.Generator(device=device).manual_seed(0)
    w_up = torch.randn(s.experts, 2 * s.ffn, s.hidden, device=device, generator=gen).div_(s.hidden**0.5).bfloat16()
    w_down = torch.randn(s.experts, s.hidden, s.ffn, device=device, generator=gen).div_(s.ffn**0.5).bfloat16()
    x = torch.randn(batch, s.hidden, device=device, generator=gen, dtype=torch.bfloat16)
    idx, weight = make_routing("uniform", Shape(s.name, batch, s.hidden, s.ffn, s.experts, s.top_k), device)
    # Bytes the step must read: the weights of every expert that got a row.
    used = torch.zeros(s.experts, dtype=torch.bool, device=device)
    used[idx[idx >= 0]] = True
    nbytes = int(used.sum()) * (w_up[0].numel() + w_down[0].numel()) * 2
    ref = moe_ops.routed_experts(x.float(), idx, weight, w_up.float(), w_down.float(), backend="reference")
    times, ok = {}, True
    for backend in BACKENDS:
        out = torch.empty_like(x)

        def step(backend=backend, out=out):
            out.copy_(moe_ops.routed_experts(x, idx, weight, w_up, w_down, backend=backend))

        replay = replayed(step)
        replay()
        torch.cuda.synchronize()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        ok &= err < TOL
        times[backend] = do_bench(replay, warmup=10, rep=200, return_mode="median")
        gbs = nbytes / times[backend] / 1e6
        print(f"{s.name:20s} {batch:6d} {backend:11s} {times[backend] * 1e3:9.1f} {gbs:8.0f} "
              f"{100 * gbs / copy_gbs:6.1f}% {'ok' if err < TOL else f'FAIL rel_err={err:.1e}'}", flush=True)
    print(f"{s.name:20s} {batch:6d} {'triton / grouped_mm speed-up':32s} {times['grouped_mm'] / times['triton']:.2f}x")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=[s.name for s in DECODE_SHAPES],
                   choices=[s.name for s in DECODE_SHAPES])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--impl", choices=["auto", *triton_choice.IMPLEMENTATIONS], default="auto",
                   help="pin every GEMM step of the triton rows to the fused kernels or to torch._grouped_mm + glue")
    args = p.parse_args()
    if args.impl != "auto":
        triton_choice.force = args.impl
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/moe_decode.py needs a CUDA GPU")
    device = torch.device("cuda")
    copy_gbs = copy_bandwidth(1 << 30, device)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | device copy {copy_gbs:.0f} GB/s")
    print(f"{'shape':20s} {'batch':>6s} {'backend':11s} {'us':>9s} {'GB/s':>8s} {'copy':>7s}")
    ok = True
    for s in (s for s in DECODE_SHAPES if s.name in args.shapes):
        for batch in args.batches:
            ok &= bench_shape(s, batch, device, copy_gbs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
