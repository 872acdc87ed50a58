"""Build the MoE weight-gradient kernels for sm_90 without a GPU and show how their dot lowers.

For every tuning config of ``_wgrad_kernel`` (``WGRAD_CONFIGS``) and ``_wgrad2_kernel``
(``WGRAD2_CONFIGS``, the opt-in ``MOEKIT_TRITON_WGRAD2=1`` variant), in the two uses of the
layer's backward (down wgrad: A gathered by token and weighted; up wgrad: B gathered), bf16,
this prints what the compiled code does with the main-loop dot:

- ``dot``: ``SS`` when every ``ttng.warp_group_dot`` takes both operands from shared memory,
  ``RS`` when A comes from registers; ``dots`` how many wgmma groups one loop step issues.
- ``wgmma`` / ``mma.sync`` instructions in the PTX, ``cp.async`` copies (software pipelining),
  ``ldmatrix`` (shared -> register loads), ``trans`` register transposes (``tt.trans`` in TTGIR).
- ``regs`` / ``spill`` from ``ptxas -v`` (Triton's own ptxas), ``smem`` bytes per block, and
  ``ctas/SM``, the blocks an SM can hold by registers and shared memory: with 2 or more, one
  block's dW store overlaps another's main loop (the token loop is only 2-4 steps long).

Integer arguments and pointers are compiled as divisible by 16, as Triton specializes them at
run time for the deepseek-v3 shapes (hidden 7168, ffn 2048): without that hint the loads cannot
be vectorized, nothing is pipelined and ptxas reports spills that the real launch does not have.
Exits non-zero when a ``_wgrad2_kernel`` config does not build, spills, does not fit, or is not
an all-shared-memory wgmma. Correctness and speed still need the H200:
``MOEKIT_TRITON_WGRAD2=1 python benchmarks/gpu_check_moe.py`` and
``MOEKIT_TRITON_WGRAD2=1 python benchmarks/moe_layer.py --profile --shapes deepseek-v3``.

    python benchmarks/compile_check_moe_wgrad.py [--arch 90] [--dump DIR]   # ~1 minute on one core
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import triton_build
from triton_build import SM90_SHARED_BYTES

SM90_SHARED_PER_SM = 233472  # 228 KiB per SM, of which 1 KiB per resident block is reserved
SM90_REGISTERS_PER_SM = 65536
ARG_TYPES = {"counts_ptr": "*i32", "starts_ptr": "*i32", "order_ptr": "*i32", "weight_ptr": "*fp32"}
NOT_DIVISIBLE = {"top_k"}  # 8 for deepseek-v3: not a multiple of 16


def build(kernel, constexprs: dict, num_warps: int, num_stages: int, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = kernel.fn  # under @autotune
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else ARG_TYPES.get(n, "*bf16" if n.endswith("_ptr") else "i32")
                 for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and n not in NOT_DIVISIBLE}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                    attrs=attrs)
    return compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def blocks_per_sm(regs: int, smem: int, num_warps: int) -> int:
    """Resident blocks per SM by registers (allocated per warp in units of 256) and shared memory."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM90_REGISTERS_PER_SM // (per_warp * num_warps)
    by_smem = SM90_SHARED_PER_SM // (smem + 1024)
    return min(by_regs, by_smem, 64 // num_warps)


def analyse(compiled, arch: int) -> dict:
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    dots = re.findall(r"ttng\.warp_group_dot %\S+, %\S+,.*?} : (\S+) .*?\* (\S+) ", ttgir)
    regs, spill, _ = triton_build.ptxas_usage(ptx, arch)
    return {"dot": "SS" if dots and all(a.startswith("!ttg.memdesc") for a, _ in dots) else "RS",
            "dots": len(dots), "wgmma": ptx.count("wgmma.mma_async"), "mma.sync": ptx.count("mma.sync"),
            "cp.async": len(re.findall(r"cp\.async\.c[ag]", ptx)), "ldmatrix": ptx.count("ldmatrix"),
            "trans": ttgir.count("tt.trans"), "regs": regs, "spill": spill, "smem": compiled.metadata.shared,
            "ctas/SM": blocks_per_sm(regs, compiled.metadata.shared, compiled.metadata.num_warps)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dump", metavar="DIR", help="also write each variant's TTGIR and PTX here")
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # the GPU configs, not the interpreter's one tile
    from moekit.ops.moe import triton_kernels as k

    kernels = [(k._wgrad_kernel, k.WGRAD_CONFIGS, False), (k._wgrad2_kernel, k.WGRAD2_CONFIGS, True)]
    uses = {"down (A gathered, weighted)": True, "up (B gathered)": False}
    ok = True
    for kernel, configs, wgmma_layout in kernels:
        name = "_wgrad2_kernel" if wgmma_layout else "_wgrad_kernel"
        for c in configs:
            for use, gather_a in uses.items():
                constexprs = dict(c.kwargs, GATHER_A=gather_a, GATHER_B=not gather_a, SCALE=gather_a,
                                  WGMMA_LAYOUT=wgmma_layout, PRECISION="tf32")
                m, n, kk = (c.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                tile = f"{m}x{n}x{kk} w{c.num_warps} s{c.num_stages}"
                try:
                    compiled = build(kernel, constexprs, c.num_warps, c.num_stages, args.arch)
                except Exception as e:  # report every failing variant
                    ok &= kernel is not k._wgrad2_kernel
                    print(f"FAIL {name} {tile} {use}: {type(e).__name__}: {str(e).splitlines()[-1:]}", flush=True)
                    continue
                info = analyse(compiled, args.arch)
                if args.dump:
                    os.makedirs(args.dump, exist_ok=True)
                    stem = os.path.join(args.dump, f"{name}_{tile.replace(' ', '_')}_{'down' if gather_a else 'up'}")
                    for ext in ("ttgir", "ptx"):
                        with open(f"{stem}.{ext}", "w") as f:
                            f.write(compiled.asm[ext])
                good = (info["dot"] == "SS" and info["mma.sync"] == 0 and info["wgmma"] > 0 and info["spill"] == 0
                        and info["cp.async"] > 0 and info["smem"] <= SM90_SHARED_BYTES)
                if kernel is k._wgrad2_kernel:
                    ok &= good
                print(f"{'ok  ' if good else 'weak'} {name:14s} {tile:20s} {use:28s} "
                      + " ".join(f"{key}={val}" for key, val in info.items()), flush=True)
    print("WGRAD2 OK: every config is an all-shared-memory wgmma, pipelined, without spills" if ok
          else "WGRAD2 NOT OK")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
