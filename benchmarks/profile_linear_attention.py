"""Per-kernel GPU times of the Triton linear-attention ops under several launch settings.

For each op and length (B*T fixed, the shapes of benchmarks/linear_attention.py), one forward +
backward is profiled (torch.profiler, CUDA kernels) under each launch setting: most apply to every
kernel at once through ``triton_layout.LAUNCH["*"]`` (a kernel's time depends only on its own
setting, so one pass per setting gives every kernel's column); the others replace a few kernels'
entries of the default table. Prints a table per op (microseconds
per kernel, one column per setting, the forward+backward total last) and each kernel's fastest
setting. A setting a kernel cannot launch with (e.g. shared memory) prints as "-" for that op.
GLA runs its tensor-core score path (MOEKIT_GLA_TC's) unless --gla-scalar. ``--fla`` profiles
flash-linear-attention's kernels on the same inputs instead (its own settings; its gated ops'
backward refuses to run on Hopper with Triton < 3.7.1).

    python benchmarks/profile_linear_attention.py [--lengths 2048,32768] [--ops gla,...] [--settings default,...]
    python benchmarks/profile_linear_attention.py --fla [--ops linear_attn,delta_rule]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moekit.ops.linear_attention import triton_gla, triton_layout

sys.path.insert(0, str(Path(__file__).parent))
from kernel_profile import kernel_times as kernel_times_of  # noqa: E402
from linear_attention import OPS, bench_ms, make_inputs  # noqa: E402

REPS = 3
# name -> launch entries: with "*", that setting for every kernel (the default table dropped);
# otherwise the named kernels' entries replaced in the default table. "BK"/"BV": the sequential
# state kernels' tiles.
SETTINGS = {
    "default": {},
    "w4s1": {"*": {"num_warps": 4, "num_stages": 1, "BK": 64, "BV": 64}},
    "w4s2": {"*": {"num_warps": 4, "num_stages": 2, "BK": 64, "BV": 64}},
    "w4s3": {"*": {"num_warps": 4, "num_stages": 3, "BK": 64, "BV": 64}},
    "w8s1": {"*": {"num_warps": 8, "num_stages": 1, "BK": 64, "BV": 64}},
    "w8s2": {"*": {"num_warps": 8, "num_stages": 2, "BK": 64, "BV": 64}},
    "w8s3": {"*": {"num_warps": 8, "num_stages": 3, "BK": 64, "BV": 64}},
    "w2s2": {"*": {"num_warps": 2, "num_stages": 2, "BK": 32, "BV": 64}},
    "w8s2v32": {"*": {"num_warps": 8, "num_stages": 2, "BK": 128, "BV": 32}},
    # the delta rule's state kernels alone (bisect_launch.py checks these settings' results)
    "sb_w4v64": {"state_bwd_delta": {"num_warps": 4, "num_stages": 2, "BV": 64}},
    "sb_w8v64": {"state_bwd_delta": {"num_warps": 8, "num_stages": 2, "BV": 64}},
    "sb_w8v128": {"state_bwd_delta": {"num_warps": 8, "num_stages": 2, "BV": 128}},
    "sf_w4v16": {"state_fwd_delta": {"num_warps": 4, "num_stages": 2, "BV": 16}},
    "sf_w8v64": {"state_fwd_delta": {"num_warps": 8, "num_stages": 2, "BV": 64}},
    # deeper pipelines and 2 warps (fla's state kernels autotune over these); each computed the same
    # results as the default in bisect_launch.py (delta_rule, T = 2048)
    "sf_w2s4v32": {"state_fwd_delta": {"num_warps": 2, "num_stages": 4, "BV": 32}},
    "sf_w4s3v32": {"state_fwd_delta": {"num_warps": 4, "num_stages": 3, "BV": 32}},
    "sf_w2s3v64": {"state_fwd_delta": {"num_warps": 2, "num_stages": 3, "BV": 64}},
    "sb_w2s4v32": {"state_bwd_delta": {"num_warps": 2, "num_stages": 4, "BV": 32}},
    "sb_w4s3v32": {"state_bwd_delta": {"num_warps": 4, "num_stages": 3, "BV": 32}},
    "sb_w4s3v64": {"state_bwd_delta": {"num_warps": 4, "num_stages": 3, "BV": 64}},
    # the delta rule's per-chunk kernels (fla's dq/dk/dw autotunes over warps, stages and tiles)
    "dq_w4s2": {"dqk_delta": {"num_warps": 4, "num_stages": 2}},
    "dq_w4s3": {"dqk_delta": {"num_warps": 4, "num_stages": 3}},
    "dq_w8s3": {"dqk_delta": {"num_warps": 8, "num_stages": 3, "maxnreg": 128}},
    "dq_w8k128": {"dqk_delta": {"num_warps": 8, "num_stages": 2, "BK": 128}},
    "dq_w8v32": {"dqk_delta": {"num_warps": 8, "num_stages": 2, "maxnreg": 128, "BV": 32}},
    "wb_w4s2": {"wy_bwd": {"num_warps": 4, "num_stages": 2, "BK": 64, "BV": 64}},
    "wb_w8s1": {"wy_bwd": {"num_warps": 8, "num_stages": 1, "BK": 64, "BV": 64}},
    "wb_w4s3": {"wy_bwd": {"num_warps": 4, "num_stages": 3, "BK": 64, "BV": 64}},
    "wb_w8s2": {"wy_bwd": {"num_warps": 8, "num_stages": 2, "BK": 64, "BV": 64}},
    "wb_w4s2k32": {"wy_bwd": {"num_warps": 4, "num_stages": 2, "BK": 32, "BV": 32}},
    "of_w4v128": {"output_fwd": {"num_warps": 4, "num_stages": 2, "BV": 128}},
    "of_w8v128": {"output_fwd": {"num_warps": 8, "num_stages": 2, "BV": 128}},
    "of_w8v128s1": {"output_fwd": {"num_warps": 8, "num_stages": 1, "BV": 128}},
    "of_w8v64": {"output_fwd": {"num_warps": 8, "num_stages": 2}},
    "of_w4v64s3": {"output_fwd": {"num_warps": 4, "num_stages": 3}},
    "of_w4v128s1": {"output_fwd": {"num_warps": 4, "num_stages": 1, "BV": 128}},
    "of_w4v128s3": {"output_fwd": {"num_warps": 4, "num_stages": 3, "BV": 128}},
    "sf_w4s2v64": {"state_fwd_delta": {"num_warps": 4, "num_stages": 2, "BV": 64}},
    "sf_w4s3v64": {"state_fwd_delta": {"num_warps": 4, "num_stages": 3, "BV": 64}},
    "sf_w4s4v64": {"state_fwd_delta": {"num_warps": 4, "num_stages": 4, "BV": 64}},
    "wf_r128": {"wy_fwd": {"num_warps": 4, "num_stages": 1, "maxnreg": 128}},
    "wf_r128s2": {"wy_fwd": {"num_warps": 4, "num_stages": 2, "maxnreg": 128}},
    "dq_w4k128": {"dqk_delta": {"num_warps": 4, "num_stages": 2, "BK": 128}},
    "dq_w4k128s1": {"dqk_delta": {"num_warps": 4, "num_stages": 1, "BK": 128}},
    "wf_w4": {"wy_fwd": {"num_warps": 4, "num_stages": 1}},
    "wf_w8": {"wy_fwd": {"num_warps": 8, "num_stages": 1}},
}


def kernel_times(call, inputs: dict) -> tuple[dict[str, float], float]:
    """({kernel: us per forward+backward}, total ms by CUDA events)."""
    leaves = {n: t.detach().requires_grad_() for n, t in inputs.items()}

    def step():  # as linear_attention.py times it: gradients returned, not accumulated into .grad
        o = call(**leaves)
        torch.autograd.grad(o, list(leaves.values()), torch.ones_like(o), allow_unused=True)

    total = bench_ms(step, REPS)  # also the warm-up (compilation) before profiling
    times = kernel_times_of(step, REPS)
    return times, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--lengths", default="2048,32768")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated subset of " + ",".join(SETTINGS))
    parser.add_argument("--gla-scalar", action="store_true", help="GLA's per-position score kernels")
    parser.add_argument("--fla", action="store_true", help="profile flash-linear-attention's kernels instead")
    args = parser.parse_args()
    triton_gla.GLA_TC = not args.gla_scalar
    settings = {"default": {}} if args.fla else {name: SETTINGS[name] for name in args.settings.split(",")}
    default_launch = dict(triton_layout.LAUNCH)
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; us per forward+backward", flush=True)
    for T in (int(t) for t in args.lengths.split(",")):
        B = max(1, args.tokens // T)
        inputs = make_inputs(B, T, gen)
        for op in args.ops.split(","):
            names, ours, theirs = OPS[op]
            call = theirs if args.fla else ours
            if call is None:
                continue
            x = {n: inputs[n] for n in names}
            columns: dict[str, dict[str, float]] = {}
            totals: dict[str, str] = {}
            for name, setting in settings.items():
                triton_layout.LAUNCH.clear()
                triton_layout.LAUNCH.update({} if "*" in setting else default_launch)
                triton_layout.LAUNCH.update(setting)
                try:
                    columns[name], total = kernel_times(call, x)
                    totals[name] = f"{total:.2f} ms"
                except Exception as e:  # a setting some kernel cannot launch with
                    totals[name] = "-"
                    print(f"  {op} T={T} {name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
                torch.cuda.empty_cache()
            kernels = sorted({k for c in columns.values() for k in c}, key=lambda k: -max(
                c.get(k, 0.0) for c in columns.values()))
            print(f"\n## {'fla ' if args.fla else ''}{op}, T={T}, B={B}")
            print(f"{'kernel':40} " + " ".join(f"{n:>8}" for n in settings) + "   best")
            for k in kernels:
                row = {n: columns[n][k] for n in columns if k in columns[n]}
                best = min(row, key=row.get)
                print(f"{k:40} " + " ".join(f"{row[n]:8.0f}" if n in row else f"{'-':>8}" for n in settings)
                      + f"   {best}")
            print(f"{'total (events)':40} " + " ".join(f"{totals[n]:>8}" for n in settings), flush=True)
        triton_layout.LAUNCH.clear()
        triton_layout.LAUNCH.update(default_launch)


if __name__ == "__main__":
    main()
