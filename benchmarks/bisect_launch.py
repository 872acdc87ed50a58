"""Which linear-attention kernel breaks under a launch setting (a GPU build problem, not indexing),
and what the setting does to the op's time.

On the H200 (Triton 3.6) the profiler's setting {4 warps, 1 stage, BK 128, BV 32} for every kernel
gave delta_rule a non-finite result and gated_delta_rule an illegal memory access, while the
interpreter, with bounds-checked loads, matched float64. This script applies a setting to one
kernel's ``triton_layout.LAUNCH`` entry at a time (and to all at once), each in its own process (an
illegal memory access ends the CUDA context), runs one forward + backward and compares every result
with the default table's on the same inputs:

    python benchmarks/bisect_launch.py [--ops delta_rule,gated_delta_rule] \
        [--setting num_warps=4,num_stages=1,BK=128,BV=32] [--kernels wy_bwd,dqk_delta,...]

Prints one line per (op, kernel): "ok" with the largest relative difference and the forward +
backward time (mean of 10 after a warm-up call) under the default table and under the setting,
"differs", "non-finite" or the error that ended the process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

KERNELS = ("state_fwd_delta", "state_bwd_delta", "state_bwd_delta_intra", "dqk_delta", "wy_fwd", "wy_bwd",
           "dv_local_delta", "output_fwd", "dv_local")
TOLERANCE = 2e-2  # bf16 results of two launch settings differ by summation order only
REPS = 10


def run_one(op: str, kernel: str, setting: dict) -> str:
    """In this process: the op's results under the default table, then with ``setting`` on ``kernel``
    (or on every kernel for "ALL"), compared."""
    import torch
    import torch.nn.functional as F
    from linear_attention import bench_ms  # benchmarks/linear_attention.py (this script's folder)

    from moekit.ops import linear_attention as la
    from moekit.ops.linear_attention import triton_layout

    gen = torch.Generator("cuda").manual_seed(0)
    B, T, H, D = 4, 2048, 16, 128

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    inputs = {"q": randn(B, T, H, D), "k": F.normalize(randn(B, T, H, D), dim=-1), "v": randn(B, T, H, D),
              "beta": torch.sigmoid(randn(B, T, H))}
    if op == "gated_delta_rule":
        inputs["g"] = F.logsigmoid(randn(B, T, H) + 2)
    inputs = {n: t.bfloat16() for n, t in inputs.items()}

    def results() -> list[torch.Tensor]:
        leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
        with la.finite_checks_skipped():  # a non-finite result is what we look for here
            o, s = getattr(la, op)(**leaves, output_final_state=True, backend="triton")
        (o.float().sum() + s.sum()).backward()
        return [o, s] + [leaves[n].grad for n in leaves]

    want = results()
    want_ms = bench_ms(results, REPS)
    if kernel == "ALL":
        triton_layout.LAUNCH.clear()
        triton_layout.LAUNCH["*"] = setting
    else:
        triton_layout.LAUNCH[kernel] = setting
    got = results()
    torch.cuda.synchronize()
    if not all(torch.isfinite(g).all() for g in got):
        return "non-finite"
    worst = max(((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()
                for g, w in zip(got, want, strict=True))
    verdict = f"{'ok' if worst < TOLERANCE else 'differs'} (max rel. difference {worst:.1e})"
    return f"{verdict:38s} {want_ms:6.2f} -> {bench_ms(results, REPS):6.2f} ms"


def parse_setting(text: str) -> dict:
    setting = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in ("num_warps", "num_stages", "BK", "BV", "maxnreg") or not value.isdigit():
            raise SystemExit(f"bad --setting item {item!r}: want num_warps|num_stages|BK|BV|maxnreg=INT")
        setting[key] = int(value)
    return setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="delta_rule,gated_delta_rule")
    parser.add_argument("--setting", default="num_warps=4,num_stages=1,BK=128,BV=32")
    parser.add_argument("--kernels", default=",".join(("ALL",) + KERNELS))
    parser.add_argument("--one", nargs=2, metavar=("OP", "KERNEL"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    setting = parse_setting(args.setting)
    if args.one:
        print(run_one(*args.one, setting), flush=True)
        return
    for op in args.ops.split(","):
        for kernel in args.kernels.split(","):
            child = subprocess.run([sys.executable, __file__, "--setting", args.setting, "--one", op, kernel],
                                   capture_output=True, text=True, timeout=300)
            lines = (child.stdout + child.stderr).strip().splitlines()
            verdict = lines[-1] if child.returncode == 0 and lines else \
                next((ln for ln in reversed(lines) if "Error" in ln), f"exit {child.returncode}")
            print(f"{op:18s} {kernel:16s} {verdict}", flush=True)


if __name__ == "__main__":
    main()
