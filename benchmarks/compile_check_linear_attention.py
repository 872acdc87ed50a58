"""Build every Triton linear-attention kernel variant for a GPU architecture, without a GPU.

Phase 1 runs each op's Triton path (forward and backward; float32 and float16 inputs, K = V in
{64, 128}, an initial state) in the CPU interpreter, a second time as if the delta state kernels' programs
did not fill the GPU (their "_few" launch entries), and records every kernel launch: argument
kinds, constexpr values (PRECISION included), warps and stages. Phase 2 compiles each recorded
variant with ``triton.compile`` for ``--arch`` (16-bit pointers as bf16, the GPU's dtype) and
prints its shared memory, registers and spills, so a kernel that does not build for, or does not fit, the target is
found before device time is spent. Correctness still needs the GPU check
(``gpu_check_linear_attention.py``). About 6 minutes on one CPU core with an empty Triton
cache (123 variants), seconds with a warm one.

    python benchmarks/compile_check_linear_attention.py [--arch 90]
"""

from __future__ import annotations

import argparse
import sys

import triton_build


def record(path: str) -> None:
    """Phase 1, in the interpreter: run the ops forward and backward, save every launch at ``path``."""
    launches = triton_build.record_launches()
    from moekit.ops import linear_attention as la
    from moekit.ops.linear_attention import triton_layout

    for few in (False, True):  # then as on a GPU whose SMs the programs do not fill: the "_few" entries
        if few:
            triton_layout.sm_count = lambda device: 1 << 30
        run_ops(la)
    triton_build.save(launches, path)


def run_ops(la) -> None:
    """Each op's Triton path forward and backward (float32 and float16, K = V in {64, 128})."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    B, T, H = 1, 70, 1
    for dtype in (torch.float32, torch.float16):
        for D in (64, 128):
            base = {"q": randn(B, T, H, D), "k": F.normalize(randn(B, T, H, D), dim=-1), "v": randn(B, T, H, D)}
            extras = {"linear_attn": {}, "simple_gla": {"g": F.logsigmoid(randn(B, T, H))},
                      "gla": {"gk": F.logsigmoid(randn(B, T, H, D))}, "delta_rule": {"beta": torch.rand(B, T, H)},
                      "gated_delta_rule": {"beta": torch.rand(B, T, H), "g": F.logsigmoid(randn(B, T, H))}}
            for op, extra in extras.items():
                leaves = {n: t.to(dtype).requires_grad_() for n, t in (base | extra).items()}
                o, s = getattr(la, op)(**leaves, initial_state=randn(B, H, D, D).requires_grad_(),
                                       output_final_state=True, backend="triton")
                (o.float().sum() + s.sum()).backward()
            x, dt = randn(B, T, H, D).to(dtype).requires_grad_(), torch.rand(B, T, H).to(dtype).requires_grad_()
            b, c = (randn(B, T, 1, D).to(dtype).requires_grad_() for _ in range(2))
            y, s = la.mamba2_ssd(x, dt, (-torch.rand(H)).requires_grad_(), b, c, output_final_state=True,
                                 backend="triton")
            (y.float().sum() + s.sum()).backward()


def label(launch: dict, options: dict) -> str:
    precision = launch["kinds"].get("PRECISION", (None, "-"))[1]
    return f"{launch['name']:20s} PRECISION={precision:4s} {options}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--record", help=argparse.SUPPRESS)  # phase 1's output file (internal)
    args = parser.parse_args()
    if args.record:
        record(args.record)
        return 0
    launches = triton_build.in_interpreter(__file__, [])
    return 1 if triton_build.build_each(launches, args.arch, label,
                                        lambda k: triton_build.resources(k, args.arch)) else 0


if __name__ == "__main__":
    sys.exit(main())
