"""GPU correctness check of the Triton MoE kernels at the DESIGN.md shapes.

bf16 inputs; forward output and the gradients of x, topk_weight, w_up and w_down are compared
with a float32 reference (relative Frobenius error < 1e-2) under uniform, skewed and
empty-expert routing. Every buffer the kernels write starts NaN-filled, and every result must
come back finite. Prints one PASS/FAIL line per check; exits non-zero on any failure.

    python benchmarks/gpu_check_moe.py                 # H200: all shapes, < 3 minutes
    python benchmarks/gpu_check_moe.py --impl vendor   # every GEMM step on torch._grouped_mm
    python benchmarks/gpu_check_moe.py --compile-only 90  # no GPU needed: every kernel builds for sm_90
    TRITON_INTERPRET=1 python benchmarks/gpu_check_moe.py --device cpu --dtype float32 --scale 64
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from moekit.ops.moe import grouped_mm, reference, triton_choice, triton_meta
from moekit.ops.moe import triton as moe_triton


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int

    def scaled(self, s: int) -> Shape:
        """A smaller copy for CPU smoke runs (keeps at least top_k + 2 experts)."""
        return Shape(self.name, max(8, self.tokens // s), max(16, self.hidden // s), max(16, self.ffn // s),
                     max(self.top_k + 2, self.experts // s), self.top_k)


SHAPES = [Shape("olmoe", 16384, 2048, 1024, 64, 8), Shape("qwen3-30b-a3b", 16384, 2048, 768, 128, 8),
          Shape("mixtral-8x7b", 8192, 4096, 14336, 8, 2), Shape("deepseek-v3", 8192, 7168, 2048, 256, 8)]
ROUTINGS = ("uniform", "skewed", "empty_experts")
TOL = 1e-2


def make_routing(kind: str, s: Shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.rand(s.tokens, s.experts, device=device)
    if kind == "skewed":  # ~80% of tokens put their top_k on the first top_k + 1 experts
        hot = torch.rand(s.tokens, 1, device=device) < 0.8
        scores[:, : s.top_k + 1] += 2.0 * hot
    if kind == "empty_experts":  # the last quarter of the experts get nothing; 5% of slots dropped
        scores[:, s.experts - s.experts // 4:] = -1.0
    weight, idx = scores.topk(s.top_k, dim=-1)
    if kind == "empty_experts":
        idx = torch.where(torch.rand(idx.shape, device=device) < 0.05, -1, idx)
    return idx, weight.softmax(-1)


def reference_fp32(x, idx, weight, w_up, w_down, grad_out, expert_chunk: int):
    """Output and gradients in float32, a chunk of experts at a time (deepseek-v3's fp32 weights
    and their gradients do not fit beside everything else). Above 64 experts the grouped_mm
    backend (tested against the loop on the CPU) replaces the slow loop over experts."""
    E = w_up.shape[0]
    impl = grouped_mm if E > 64 else reference
    xf = x.detach().float().requires_grad_(True)
    wf = weight.detach().float().requires_grad_(True)
    out = torch.zeros_like(xf)
    dx = torch.zeros_like(xf)
    dweight = torch.zeros_like(wf)
    dw_up, dw_down = [], []
    for e0 in range(0, E, expert_chunk):
        e1 = min(E, e0 + expert_chunk)
        local = torch.where((idx >= e0) & (idx < e1), idx - e0, -1)
        wu = w_up[e0:e1].detach().float().requires_grad_(True)
        wd = w_down[e0:e1].detach().float().requires_grad_(True)
        part = impl.routed_experts(xf, local, wf, wu, wd, "swiglu")
        gx, gw, gu, gd = torch.autograd.grad(part, (xf, wf, wu, wd), grad_out.float())
        out += part.detach()
        dx += gx
        dweight += gw
        dw_up.append(gu.to(w_up.dtype))
        dw_down.append(gd.to(w_down.dtype))
        del part, gx, gw, gu, gd, wu, wd
    return out, dx, dweight, torch.cat(dw_up), torch.cat(dw_down)


def rel_err(a, b, chunk_elems: int = 1 << 26) -> float:
    """||a - b|| / ||b||, summed a slice of rows at a time: float copies of deepseek-v3's
    [256, 4096, 7168] weight gradients would not fit beside everything else."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    rows = max(1, chunk_elems // max(1, a.shape[1]))
    diff_sq = ref_sq = 0.0
    for r in range(0, a.shape[0], rows):
        ra, rb = a[r:r + rows].double(), b[r:r + rows].double()
        diff_sq += (ra - rb).square().sum().item()
        ref_sq += rb.square().sum().item()
    return (diff_sq / max(ref_sq, 1e-60)) ** 0.5


def check(s: Shape, kind: str, dtype, device) -> bool:
    torch.manual_seed(len(s.name) * 31 + ROUTINGS.index(kind))
    x = torch.randn(s.tokens, s.hidden, device=device, dtype=dtype)
    w_up = (torch.randn(s.experts, 2 * s.ffn, s.hidden, device=device) * s.hidden**-0.5).to(dtype)
    w_down = (torch.randn(s.experts, s.hidden, s.ffn, device=device) * s.ffn**-0.5).to(dtype)
    idx, weight = make_routing(kind, s, device)
    grad_out = torch.randn(s.tokens, s.hidden, device=device, dtype=dtype)
    leaves = [t.requires_grad_(True) for t in (x, weight, w_up, w_down)]

    start = time.perf_counter()
    out = moe_triton.routed_experts(x, idx, weight, w_up, w_down, "swiglu")
    got = (out.detach(), *torch.autograd.grad(out, leaves, grad_out))
    del out
    ref = reference_fp32(x, idx, weight, w_up, w_down, grad_out, expert_chunk=32)
    del leaves, x, w_up, w_down  # the reference is done with them; rel_err needs the room
    ok = True
    for name, g, r in zip(("out", "dx", "dtopk_weight", "dw_up", "dw_down"), got, ref):
        finite = all(bool(torch.isfinite(part).all()) for part in g.split(max(1, g.shape[0] // 8)))
        err = rel_err(g, r)
        passed = finite and err < TOL
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} {s.name:14s} {kind:14s} {name:13s} rel_err={err:.2e}"
              f"{'' if finite else '  (NaN/Inf: unwritten or overflowed elements)'}", flush=True)
    print(f"     {s.name} {kind}: {time.perf_counter() - start:.1f} s", flush=True)
    return ok


# ----------------------------------------------------------------------------- --compile-only

def _jit(kernel):
    """The JITFunction under autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


SM90_SHARED_BYTES = 232448  # 227 KiB per block on H100 / H200


def _arg_type(name: str) -> str:
    if not name.endswith("_ptr"):
        return "i32"
    return {"counts_ptr": "*i32", "starts_ptr": "*i32", "order_ptr": "*i32", "row_ptr": "*i32", "idx_ptr": "*i64",
            "weight_ptr": "*fp32", "dweight_ptr": "*fp32"}.get(name, "*bf16")


def _compile(kernel, target, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    from triton.compiler import ASTSource, compile
    fn = _jit(kernel)
    signature = {n: "constexpr" if n in constexprs else _arg_type(n) for n in fn.arg_names}
    consts = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
    return compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target,
                   options={"num_warps": num_warps, "num_stages": num_stages})


def compile_only(arch: int) -> bool:
    """Compile every kernel variant and tuning config (TMA ones included) for sm_<arch>, bf16,
    without a GPU: catches what the CPU interpreter cannot (types the compiler rejects, ptxas
    errors), and names configs needing more shared memory than an H100/H200 SM has (the
    autotuner skips those at run time)."""
    from triton.backends.compiler import GPUTarget

    from moekit.ops.moe import triton_kernels as k
    from moekit.ops.moe import triton_vendor as v
    target = GPUTarget("cuda", arch, 32)
    gemm = [(dict(c.kwargs, TMA=tma), c.num_warps, c.num_stages)
            for c in k.GEMM_CONFIGS if not c.kwargs["TMA"] for tma in k.tma_variants(c)]
    cases = []
    for cfg, w, st in gemm:
        for backward in (False, True):
            for gated in (True, False):
                cases.append((k._gather_gemm_kernel, dict(cfg, E_PAD=256, GATED=gated, ACT=0, BACKWARD=backward,
                              STORE_H=True, WEIGHT_GRAD=backward, B_K_MAJOR=not backward, PRECISION="tf32",
                              EVEN_K=True), w, st))
        for k_major in (True, False):
            cases.append((k._scatter_gemm_kernel, dict(cfg, E_PAD=256, B_K_MAJOR=k_major, PRECISION="tf32",
                                                       EVEN_K=True), w, st))
    for kernel, configs, wgmma_layout in ((k._wgrad_kernel, k.WGRAD_CONFIGS, False),
                                          (k._wgrad2_kernel, k.WGRAD2_CONFIGS, True)):  # wgrad2: opt-in
        for c in configs:
            for gather_a in (True, False):
                cases.append((kernel, dict(c.kwargs, GATHER_A=gather_a, GATHER_B=not gather_a, SCALE=gather_a,
                                           WGMMA_LAYOUT=wgmma_layout, PRECISION="tf32"), c.num_warps, c.num_stages))
    for flag in (True, False):
        cases += [(k._combine_kernel, dict(TOP_K=8, K_PAD=8, HAS_WEIGHT=flag, ROW_MAP=flag, BLOCK_H=1024), 4, 1),
                  (v._gather_rows_kernel, dict(E_PAD=256, SCALE=flag, BLOCK_N=1024), 4, 1),
                  (v._act_rows_kernel, dict(E_PAD=256, GATED=flag, ACT=0, BLOCK_F=1024), 4, 1),
                  (v._act_rows_backward_kernel, dict(E_PAD=256, GATED=flag, ACT=1, WEIGHT_GRAD=flag, BLOCK_F=1024),
                   4, 1)]
    ok = True
    for kernel, constexprs, warps, stages in cases:
        name = _jit(kernel).__name__
        try:
            shared = _compile(kernel, target, constexprs, warps, stages).metadata.shared
            if shared > SM90_SHARED_BYTES:
                print(f"note {name} {constexprs} stages={stages}: {shared} bytes of shared memory, over the "
                      f"{SM90_SHARED_BYTES} an SM offers", flush=True)
        except Exception as e:  # report every failing variant, not just the first
            ok = False
            print(f"FAIL compile {name} {constexprs} warps={warps} stages={stages}: {type(e).__name__}: "
                  f"{str(e).splitlines()[-1] if str(e) else ''}", flush=True)
    print(f"{'ALL COMPILED' if ok else 'SOME FAILED TO COMPILE'}: {len(cases)} kernel variants for sm_{arch}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--scale", type=int, default=1, help="divide every shape by this (CPU smoke runs)")
    p.add_argument("--shapes", nargs="*", default=[s.name for s in SHAPES])
    p.add_argument("--impl", choices=["auto", *triton_choice.IMPLEMENTATIONS], default="auto",
                   help="pin every GEMM step to the fused Triton kernels or to torch._grouped_mm + glue")
    p.add_argument("--compile-only", type=int, metavar="ARCH", default=None,
                   help="compile every kernel variant for sm_ARCH (e.g. 90) without a GPU, and stop")
    args = p.parse_args()
    if args.compile_only is not None:
        return 0 if compile_only(args.compile_only) else 1
    triton_meta.poison_buffers = True
    triton_choice.force = None if args.impl == "auto" else args.impl
    dtype = getattr(torch, args.dtype)
    ok = True
    for s in SHAPES:
        if s.name in args.shapes:
            for kind in ROUTINGS:
                ok &= check(s.scaled(args.scale) if args.scale > 1 else s, kind, dtype, args.device)
    print("ALL PASS" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
