"""GPU check of the Triton linear-attention kernels against the float32 reference on the GPU.

For every op with a Triton kernel: bf16 inputs, B=2, H in {4, 16}, K=V in {64, 128}, T in
{100, 1000, 4100} (not multiples of the chunk), small and mixed head dims (16 to 64), plus
packed-sequence (cu_seqlens) and decoding cases. Compares output, final state (rel. error < 5e-3)
and every input gradient (< 1e-2) with the reference run in float32 on the same bf16 values.
Prints one PASS/FAIL line per case and exits non-zero on any failure.

mamba2_ssd's dA is one sum per head over all tokens whose terms cancel (sum |term| / |sum| is
~6 median, up to ~13, at B=2 H=4 K=V=64 T=100), and its relative error divides by that sum.
Its floor here is not the kernels': the output's gradient arrives rounded to bf16 and dA leaves
as bf16 (A is bf16), ~2e-3 median and up to ~6e-3 over 40 draws in a float64 emulation.

    python benchmarks/gpu_check_linear_attention.py [--quick] [--ops gla,...]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from moekit.ops import linear_attention as la

OUT_TOL, GRAD_TOL = 5e-3, 1e-2
DTYPE = torch.bfloat16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_inputs(op: str, B: int, T: int, H: int, D: int, n_states: int, gen: torch.Generator,
                V: int | None = None) -> dict:
    """Leaf bf16 tensors named like the op's arguments (keys L2-normalised for the delta rules); head
    dims K = D and V (default D)."""
    V = V or D
    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    if op == "mamba2_ssd":
        G = max(1, H // 4)
        x = {"x": randn(B, T, H, V), "dt": F.softplus(randn(B, T, H) - 1.0), "A": -torch.rand(H, device="cuda",
                                                                                                generator=gen) - 0.5,
             "B": randn(B, T, G, D) * D ** -0.5, "C": randn(B, T, G, D) * D ** -0.5}
    else:
        x = {"q": randn(B, T, H, D), "k": randn(B, T, H, D), "v": randn(B, T, H, V)}
        if op in ("delta_rule", "gated_delta_rule"):
            x["k"] = F.normalize(x["k"], dim=-1)
        if op in ("simple_gla", "gated_delta_rule"):
            x["g"] = F.logsigmoid(randn(B, T, H) + 3.0)
        if op == "gla":
            x["gk"] = F.logsigmoid(randn(B, T, H, D) + 3.0)
        if op in ("delta_rule", "gated_delta_rule"):
            x["beta"] = torch.sigmoid(randn(B, T, H))
    x = {name: t.to(DTYPE) for name, t in x.items()}
    x["initial_state"] = randn(n_states, H, D, V) * 0.1
    return x


def run(op: str, inputs: dict, backend: str, mode: str, cu_seqlens, grads: bool):
    """(o, final_state, gradients by name) of one call."""
    leaves = {n: t.detach().clone().requires_grad_(grads) for n, t in inputs.items()}
    if backend == "reference":  # float32 on the same bf16 values
        leaves = {n: t.detach().float().requires_grad_(grads) for n, t in leaves.items()}
    args = {n: t for n, t in leaves.items() if n != "initial_state"}
    o, state = getattr(la, op)(**args, initial_state=leaves["initial_state"], output_final_state=True,
                               mode=mode, cu_seqlens=cu_seqlens, backend=backend)
    if not grads:
        return o, state, {}
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(o.shape, generator=gen, device="cuda")
    dstate = torch.randn(state.shape, generator=gen, device="cuda")
    loss = (o.float() * do).sum() + (state.float() * dstate).sum()
    names = list(leaves)
    return o, state, dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))


def check(label: str, op: str, inputs: dict, mode: str = "chunk", cu_seqlens=None, grads: bool = True) -> bool:
    t0 = time.perf_counter()
    try:
        o, s, dx = run(op, inputs, "triton", mode, cu_seqlens, grads)
        ro, rs, rdx = run(op, inputs, "reference", mode, cu_seqlens, grads)
    except Exception as e:  # report and go on: one broken case must not hide the others
        print(f"FAIL {label}: {type(e).__name__}: {e}")
        return False
    errs = {"o": (rel_err(o, ro), OUT_TOL), "state": (rel_err(s, rs), OUT_TOL)}
    errs.update({f"d{n}": (rel_err(dx[n], rdx[n]), GRAD_TOL) for n in dx})
    bad = [n for n, (e, tol) in errs.items() if not e < tol]  # NaN fails too
    worst = ", ".join(f"{n}={e:.1e}" for n, (e, _) in errs.items())
    print(f"{'FAIL' if bad else 'PASS'} {label} ({time.perf_counter() - t0:.1f}s) {worst}", flush=True)
    return not bad


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one shape per op")
    parser.add_argument("--ops", default="", help="comma-separated subset of the ops")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL: no CUDA device")
        return 1
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    chunk_ops = ["simple_gla", "linear_attn", "gated_delta_rule", "delta_rule", "gla", "mamba2_ssd"]
    chunk_ops = [op for op in chunk_ops if not args.ops or op in args.ops.split(",")]
    shapes = [(4, 64, 100), (16, 128, 1000), (4, 128, 4100), (16, 64, 4100), (8, 128, 100)]
    if args.quick:
        shapes = shapes[:2]
    ok = True
    for op in chunk_ops:
        for H, D, T in shapes:
            ok &= check(f"{op} chunk B=2 H={H} K=V={D} T={T}", op, make_inputs(op, 2, T, H, D, 2, gen))
        # B = 2 leaves the delta state kernels fewer programs than SMs (their "_few" launch entries):
        # here enough sequences for the main entries
        ok &= check(f"{op} chunk B=12 H=16 K=V=128 T=300", op, make_inputs(op, 12, 300, 16, 128, 12, gen))
        bounds = [0, 1, 67, 700, 1900, 2001]
        cu = torch.tensor(bounds, device="cuda", dtype=torch.int32)
        ok &= check(f"{op} chunk cu_seqlens={bounds} H=8 K=V=128", op,
                    make_inputs(op, 1, bounds[-1], 8, 128, len(bounds) - 1, gen), cu_seqlens=cu)
    # small and mixed head dims: 16- and 32-wide tiles gave wrong results on an H200 (triton_layout.MIN_TILE)
    for op in chunk_ops:
        for K, V in ((16, 16), (32, 32), (64, 32), (32, 64), (64, 16)):
            ok &= check(f"{op} chunk B=2 H=4 K={K} V={V} T=300", op, make_inputs(op, 2, 300, 4, K, 2, gen, V=V))
    # the largest head dim the scalar-gate kernels take
    for op in [op for op in ("simple_gla", "linear_attn") if op in chunk_ops]:
        ok &= check(f"{op} chunk B=2 H=4 K=V=256 T=300", op, make_inputs(op, 2, 300, 4, 256, 2, gen))
    for op in chunk_ops:
        for T in (1, 37):  # decoding steps and a short prefill, forward only
            ok &= check(f"{op} recurrent B=2 H=8 K=V=128 T={T}", op, make_inputs(op, 2, T, 8, 128, 2, gen),
                        mode="recurrent", grads=False)
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
