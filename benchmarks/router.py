"""The top-k router's forward at decode sizes: moekit's one kernel vs the torch functions it replaces.

A decode step routes a few tokens per MoE layer; the router's float32 GEMM, softmax, top-k and
gathers are about ten launches of a few microseconds each. Per (shape, tokens) this prints the
time of one router forward, replayed from a CUDA graph as ``FastDecoder`` runs it, for:

- ``kernel``: ``router_kernel.route_topk`` as the model calls it (logits inside the kernel where
  it takes them, else from one GEMM first);
- ``gemm+kernel``: the same with the logits always from the GEMM (what the in-kernel logits save);
- ``torch``: the reference functions (``Router.logits``' math, ``score``, ``select_experts``,
  ``gate_weights``), eager;
- ``compiled``: the same through ``torch.compile``, as ``FastDecoder(compile=True)`` would run them.

Each result is checked against the reference first (same experts, weights within 1e-5).

    python benchmarks/router.py [--shapes olmoe ...] [--tokens 1 16 64 4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from moekit.moe.router import gate_weights, score, select_experts
from moekit.ops.moe import router_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_decode import DECODE_SHAPES, replayed  # noqa: E402  (the same shapes and graph replay)


def reference(x, w, expert_bias, top_k):
    scores = score(F.linear(x.float(), w.float()), "softmax")
    idx = select_experts(scores, top_k, expert_bias)
    return idx, gate_weights(scores, idx, True, 1.0)


def kernel(x, w, expert_bias, top_k):
    _, _, idx, weight = router_kernel.route_topk(x, w, None, expert_bias, "softmax", top_k, True, 1.0)
    return idx, weight


def gemm_then_kernel(x, w, expert_bias, top_k):
    limit, router_kernel.LOGITS_MAX_TOKENS = router_kernel.LOGITS_MAX_TOKENS, 0
    try:
        return kernel(x, w, expert_bias, top_k)
    finally:
        router_kernel.LOGITS_MAX_TOKENS = limit


def bench(name: str, hidden: int, experts: int, top_k: int, tokens: int) -> bool:
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    w = torch.randn(experts, hidden, device="cuda", generator=gen).div_(hidden**0.5).bfloat16()
    expert_bias = torch.zeros(experts, device="cuda")
    want_idx, want_weight = reference(x, w, expert_bias, top_k)
    compiled = torch.compile(reference)
    times, ok = {}, True
    for label, fn in (("kernel", kernel), ("gemm+kernel", gemm_then_kernel), ("torch", reference),
                      ("compiled", compiled)):
        result = {}

        def call(fn=fn, result=result):
            result["idx"], result["weight"] = fn(x, w, expert_bias, top_k)

        replay = replayed(call)
        replay()
        torch.cuda.synchronize()
        same = torch.equal(result["idx"], want_idx) and torch.allclose(result["weight"], want_weight, atol=1e-5)
        ok &= same
        times[label] = do_bench(replay, warmup=20, rep=200, return_mode="median") * 1e3
        print(f"{name:20s} {tokens:6d} {label:12s} {times[label]:8.1f} {'ok' if same else 'FAIL'}", flush=True)
    print(f"{name:20s} {tokens:6d} {'kernel vs torch / compiled':26s} {times['torch'] / times['kernel']:.2f}x / "
          f"{times['compiled'] / times['kernel']:.2f}x")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=[s.name for s in DECODE_SHAPES],
                   choices=[s.name for s in DECODE_SHAPES])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 4096])
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/router.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | router forward, us per call (CUDA graph)")
    ok = True
    with torch.no_grad():
        for s in (s for s in DECODE_SHAPES if s.name in args.shapes):
            for tokens in args.tokens:
                ok &= bench(s.name, s.hidden, s.experts, s.top_k, tokens)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
