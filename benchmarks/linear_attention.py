"""Linear-attention kernels: moekit (Triton) vs flash-linear-attention vs causal SDPA.

B*T = 64k tokens, H=16, K=V=128, bf16, T in {2k, 8k, 32k}; forward and forward+backward times
in ms, with ratios against moekit. fla (0.6.x) is imported lazily; when it is missing, refuses
(e.g. its Hopper guard) or fails, the table says so instead of a time.

    python benchmarks/linear_attention.py [--tokens 65536] [--lengths 2048,8192,32768] [--ops gla,...] [--no-fla]
        [--skip-finite-checks]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from moekit.ops import linear_attention as la

H, D, DTYPE = 16, 128, torch.bfloat16


def bench_ms(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def make_inputs(B: int, T: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    return {
        "q": randn(B, T, H, D).to(DTYPE),
        "k": F.normalize(randn(B, T, H, D), dim=-1).to(DTYPE),
        "v": randn(B, T, H, D).to(DTYPE),
        "g": F.logsigmoid(randn(B, T, H) + 3.0),
        "gk": F.logsigmoid(randn(B, T, H, D) + 3.0).to(DTYPE),
        "beta": torch.sigmoid(randn(B, T, H)).to(DTYPE),
        # Mamba2 SSD: one B/C group per 4 heads (Mamba2's layout), state N=D, head dim P=D
        "x": randn(B, T, H, D).to(DTYPE),
        "dt": F.softplus(randn(B, T, H) - 1.0).to(DTYPE),
        "A": (-torch.rand(H, generator=gen, device="cuda") - 0.5).to(DTYPE),
        "B": (randn(B, T, H // 4, D) * D ** -0.5).to(DTYPE),
        "C": (randn(B, T, H // 4, D) * D ** -0.5).to(DTYPE),
    }


def _fla(module: str, name: str):
    return getattr(__import__(module, fromlist=[name]), name)


# op -> (its input names, moekit call, fla call or None where fla has no such op)
OPS = {
    "linear_attn": (("q", "k", "v"), lambda **x: la.linear_attn(**x, backend="triton")[0],
                    lambda **x: _fla("fla.ops.linear_attn", "chunk_linear_attn")(**x, normalize=False)[0]),
    "simple_gla": (("q", "k", "v", "g"), lambda **x: la.simple_gla(**x, backend="triton")[0],
                   lambda **x: _fla("fla.ops.simple_gla", "chunk_simple_gla")(**x)[0]),
    "delta_rule": (("q", "k", "v", "beta"), lambda **x: la.delta_rule(**x, backend="triton")[0],
                   lambda **x: _fla("fla.ops.delta_rule", "chunk_delta_rule")(**x)[0]),
    "gated_delta_rule": (("q", "k", "v", "g", "beta"), lambda **x: la.gated_delta_rule(**x, backend="triton")[0],
                         lambda **x: _fla("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")(**x)[0]),
    "gla": (("q", "k", "v", "gk"), lambda **x: la.gla(**x, backend="triton")[0],
            lambda q, k, v, gk: _fla("fla.ops.gla", "chunk_gla")(q, k, v, gk)[0]),
    "mamba2_ssd": (("x", "dt", "A", "B", "C"), lambda **x: la.mamba2_ssd(**x, backend="triton")[0], None),
}


def timed(fn) -> str:
    """ms as a string, or why it did not run (fla's Hopper guard refusing is a result, not a crash)."""
    try:
        return f"{bench_ms(fn):.2f}"
    except Exception as e:
        reason = ("OOM" if isinstance(e, torch.OutOfMemoryError) else "refused" if "Hopper" in str(e)
                  else type(e).__name__)
        print(f"  ({reason}: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__})", flush=True)
        return reason


def time_call(call, inputs: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(forward ms, forward+backward ms), each timed on its own: a peer may run one and not the other."""
    leaves = {n: t.detach().requires_grad_() for n, t in inputs.items()}

    def forward():
        with torch.no_grad():
            call(**leaves)

    def forward_backward():  # autograd.grad: no accumulation into .grad, which is not the op's cost
        o = call(**leaves)
        torch.autograd.grad(o, list(leaves.values()), torch.ones_like(o), allow_unused=True)

    return timed(forward), timed(forward_backward)


def ratio(other: str, ours: str) -> str:
    try:
        return f"{float(other) / float(ours):.2f}x"
    except ValueError:
        return "-"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--ops", default="", help="comma-separated subset of " + ",".join(OPS))
    parser.add_argument("--skip-finite-checks", action="store_true",
                        help="run moekit inside la.finite_checks_skipped(): without its NaN/inf input check (one "
                             "device-to-host read per call), as fla runs")
    parser.add_argument("--no-fla", action="store_true", help="moekit and SDPA only (fla's autotuning takes "
                        "about 2 minutes per op)")
    args = parser.parse_args()
    import triton

    try:
        fla_version = __import__("fla").__version__
    except Exception as e:
        fla_version = f"not importable ({type(e).__name__})"
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"fla {fla_version}, {time.strftime('%Y-%m-%d %H:%M:%S')}"
          + ("; moekit's finite-input checks skipped" if args.skip_finite_checks else ""))
    print(f"# B*T={args.tokens}, H={H}, K=V={D}, {DTYPE}; times in ms; 'x' = peer time / moekit time")
    gen = torch.Generator(device="cuda").manual_seed(0)
    header = ("T", "op", "moekit fwd", "fla fwd", "fla/moekit", "sdpa fwd", "sdpa/moekit",
              "moekit f+b", "fla f+b", "fla/moekit", "sdpa f+b", "sdpa/moekit")
    print(" | ".join(header), flush=True)  # one row per line as it is measured: a cut-off run keeps its rows
    start = time.time()
    for T in (int(t) for t in args.lengths.split(",")):
        B = max(1, args.tokens // T)
        inputs = make_inputs(B, T, gen)
        q, k, v = (inputs[n].transpose(1, 2) for n in "qkv")
        sdpa = time_call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                         {"q": q, "k": k, "v": v})
        print(f"# T={T}: sdpa fwd {sdpa[0]} ms, f+b {sdpa[1]} ms   [{time.time() - start:.0f} s]", flush=True)
        for op, (names, ours_call, fla_call) in OPS.items():
            if args.ops and op not in args.ops.split(","):
                continue
            x = {n: inputs[n] for n in names}
            with la.finite_checks_skipped() if args.skip_finite_checks else contextlib.nullcontext():
                ours = time_call(ours_call, x)
            # before fla's first call, which compiles and autotunes its kernels for minutes
            print(f"# T={T} {op}: moekit fwd {ours[0]} ms, f+b {ours[1]} ms   [{time.time() - start:.0f} s]",
                  flush=True)
            fla = time_call(fla_call, x) if fla_call and not args.no_fla else ("-", "-")
            row = (str(T), op, ours[0], fla[0], ratio(fla[0], ours[0]), sdpa[0], ratio(sdpa[0], ours[0]),
                   ours[1], fla[1], ratio(fla[1], ours[1]), sdpa[1], ratio(sdpa[1], ours[1]))
            print(" | ".join(row) + f"   [{time.time() - start:.0f} s]", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
