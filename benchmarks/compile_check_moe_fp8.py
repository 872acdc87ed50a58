"""Build the FP8 / MXFP8 routed-expert kernels for sm_90 without a GPU and read what came out.

Phase 1 runs ``moekit.ops.moe.fp8.routed_experts`` forward + backward in the CPU interpreter
(both recipes, MXFP8 in both storages: "mxfp8" as MX values, what Hopper runs, and "mxfp8-bytes"
as bytes and scales, what sm_100 runs beside its MX GEMMs; gated and plain activations) and records
every kernel launch: the kernel, its argument kinds and constexprs, the grid and the bytes of
every tensor argument. Phase 2 compiles each distinct launch with ``triton.compile`` for
``GPUTarget("cuda", arch, 128)`` and prints, per kernel: how its dots were lowered (``wgmma``
count and operand types in the PTX, ``warp_group_dot`` / ``local_alloc`` / transposes in the
TTGIR), whether the K loop was software-pipelined (async copies / TMA), shared memory, registers /
spills from ``ptxas -v``, and how many CTAs an SM holds at once.
It also prints the launch list of one fwd+bwd (what a profile would show, minus the times).

``--wgrad`` instead builds the weight-gradient kernel under every candidate launch
(``fp8_kernels.WGRAD_CANDIDATES``) for each recipe and storage, at 256 experts, prints each build's census
(registers, spills, shared memory, CTAs per SM) and fails where a candidate does not build, does not
fit on an SM or spills registers (the rows table may pick any candidate for either recipe).

Nothing here measures speed: that needs the H200 (``benchmarks/moe_fp8.py``).

    python benchmarks/compile_check_moe_fp8.py [--arch 90] [--dump DIR] [--wgrad]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's moekit, not an installed one

import triton_build  # noqa: E402  (beside this script)

DTYPE_NAME = "bfloat16"  # of the recorded inputs


def gpu_kinds(launch: dict) -> dict:
    """The launch as the GPU makes it: the interpreter's launches pass EMULATE_RNE=True (float32
    rounding arithmetic before every FP8 cast, which the GPU's cvt.rn.satfinite does itself), so
    a build of those constexprs is not the GPU's binary (more instructions and registers). The
    plain block-quantize kernel also takes smaller tiles and fewer warps in the interpreter."""
    kinds = dict(launch["kinds"])
    if "EMULATE_RNE" in kinds:
        kinds["EMULATE_RNE"] = ["bool", False]
    options = launch["options"]
    if launch["name"] == "_block_quantize_kernel":
        from moekit.quant.fp8_block.triton import _tiles

        tiles = _tiles((kinds["BLOCK_ROWS"][1], kinds["BLOCK_COLS"][1]), interpreting=False)
        kinds["TILE_R"], kinds["TILE_K"] = ["int", tiles["TILE_R"]], ["int", tiles["TILE_K"]]
        options = dict(options, num_warps=tiles["num_warps"])
    return dict(launch, kinds=kinds, options=options)


def record(path: str, recipes: list[str]) -> None:
    """Phase 1, in the interpreter: run the op and write every launch to ``path`` (in order)."""
    import torch

    DTYPE = getattr(torch, DTYPE_NAME)
    tag = [""]
    launches = triton_build.record_launches(lambda: tag[0])
    from moekit.ops.moe import fp8, fp8_kernels

    # MX operands held as values are bf16 on the GPU (float32 only so that the interpreter's dots
    # are right; the values computed here are not used)
    fp8_kernels.MX_VALUES_DTYPE = torch.bfloat16

    g = torch.Generator().manual_seed(0)
    T, H, F, E, K = 64, 256, 256, 4, 2
    for name in recipes:
        fp8.MX_AS_VALUES = name != "mxfp8-bytes"
        recipe_name = name.removesuffix("-bytes")
        for activation in ("swiglu", "gelu"):
            up = 2 * F if activation == "swiglu" else F
            # bf16, as the GPU runs it (h, y and every output take the input dtype)
            x = torch.randn(T, H, generator=g).to(DTYPE).requires_grad_()
            idx = torch.rand(T, E, generator=g).topk(K, -1).indices
            w = torch.rand(T, K, generator=g).to(DTYPE).requires_grad_()
            w_up = (torch.randn(E, up, H, generator=g) * H**-0.5).to(DTYPE).requires_grad_()
            w_down = (torch.randn(E, H, F, generator=g) * F**-0.5).to(DTYPE).requires_grad_()
            tag[0] = f"{name}/{activation}/fwd"
            out = fp8.routed_experts(x, idx, w, w_up, w_down, activation, recipe_name)
            tag[0] = f"{name}/{activation}/bwd"
            out.backward(torch.randn(T, H, generator=g).to(DTYPE))
    triton_build.save(launches, path)


def ir_summary(kernel) -> str:
    """How the dots were lowered and whether the loop was pipelined."""
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    wgmma = re.findall(r"wgmma\.mma_async\.[\w.]+", ptx)
    kinds = sorted({re.sub(r"\.m64n\d+k\d+", "", w) for w in wgmma})
    upconverts = len(re.findall(r"cvt\.rn\.(?:f16x2|bf16x2)\.e4m3x2", ptx))
    return (f"wgmma {len(wgmma)} {kinds} | mma.sync {len(re.findall(r'mma.sync', ptx))} | "
            f"ttgir warp_group_dot {ttgir.count('ttng.warp_group_dot ')} dot {ttgir.count('tt.dot ')} "
            f"trans {ttgir.count('tt.trans')} local_alloc {ttgir.count('ttg.local_alloc')} "
            f"async_copy {ttgir.count('ttg.async_copy_global_to_local')} tma {ttgir.count('async_tma_copy')} "
            f"wgmma_wait {ttgir.count('warp_group_dot_wait')} | cvt e4m3->16-bit in ptx "
            f"{upconverts}")


def ctas_per_sm(kernel, arch: int) -> int:
    """Resident CTAs per sm_90 SM: registers (65536, allocated per warp in units of 256), shared
    memory (228 KB, 1 KB reserved per CTA), warps (64). One CTA per SM means a GEMM's epilogue
    and rescales never overlap another CTA's MMAs."""
    regs, _, _ = triton_build.ptxas_usage(kernel.asm["ptx"], arch)
    warps = kernel.metadata.num_warps
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * warps), 233472 // (kernel.metadata.shared + 1024), 64 // warps)


def compile_all(launches: list[dict], arch: int, dump: str | None) -> int:
    from moekit.ops.moe import fp8_kernels

    print("launch list (T=64 tokens, H=F=256, E=4, top-2; bytes = sum of tensor arguments):")
    for tag in dict.fromkeys(la["tag"] for la in launches):
        mine = [la for la in launches if la["tag"] == tag]
        print(f"  {tag}: {len(mine)} launches: " + ", ".join(la["name"] for la in mine))

    def options(launch):
        recorded = triton_build.recorded_options(launch)  # the interpreter's; the GPU's instead
        return dict(fp8_kernels.LAUNCH) if recorded == fp8_kernels.INTERPRETER_LAUNCH else recorded

    def label(launch, opts):
        flags = {p.name: launch["kinds"][p.name][1] for p in triton_build.jit_function(launch).params
                 if p.is_constexpr and p.name in ("GATED", "BACKWARD", "SAVE", "MX", "DQ", "BLOCK", "TWO_B", "A_REG")}
        return f"{launch['name']} {flags} {opts}"

    def describe(kernel):
        return (f"\n     {triton_build.resources(kernel, arch)}, CTAs/SM {ctas_per_sm(kernel, arch)}"
                f"\n     {ir_summary(kernel)}")

    def save_ir(kernel, launch, n):
        if dump:
            os.makedirs(dump, exist_ok=True)
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(dump, f"{n:02d}_{launch['name']}.{ext}"), "w") as f:
                    f.write(kernel.asm[ext])

    return triton_build.build_each([gpu_kinds(la) for la in launches], arch, label, describe, options, save_ir)


WGRAD_CENSUS_EXPERTS = 256  # deepseek-v3's, where the short-K candidates matter; E_PAD sizes the count vectors


def wgrad_census(launches: list[dict], arch: int) -> int:
    """Build ``_wgrad_kernel`` under every candidate for each recorded recipe and storage; the
    number of builds that failed, did not fit, or spill."""
    from moekit.ops.moe import fp8_kernels

    storages = {(False, False): "fp8", (True, True): "mxfp8", (True, False): "mxfp8-bytes"}
    recorded = {(la["kinds"]["MX"][1], la["kinds"]["DQ"][1]): gpu_kinds(la)
                for la in launches if la["name"] == "_wgrad_kernel"}
    failed = 0
    for key, launch in recorded.items():
        for c in fp8_kernels.WGRAD_CANDIDATES:
            kinds = dict(launch["kinds"], BM=["int", c.bm], BN=["int", c.bn],
                         E_PAD=["int", WGRAD_CENSUS_EXPERTS], num_experts=["int", WGRAD_CENSUS_EXPERTS])
            name = f"{storages[key]:11s} {c.name:13s}"
            try:
                kernel = triton_build.build(dict(launch, kinds=kinds), arch, c.options())
            except Exception as e:
                failed += 1
                print(f"FAIL {name} {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            regs, spill_st, spill_ld = triton_build.ptxas_usage(kernel.asm["ptx"], arch)
            bad = not triton_build.fits(kernel, arch) or spill_st > 0 or spill_ld > 0
            failed += bad
            print(f"{'FAIL' if bad else 'OK  '} {name} regs {regs:3d} spills {spill_st}/{spill_ld} B "
                  f"shared {kernel.metadata.shared:6d} B CTAs/SM {ctas_per_sm(kernel, arch)}"
                  f"\n     {ir_summary(kernel)}", flush=True)
    print(f"weight-gradient candidates for sm_{arch}: {'ALL OK' if not failed else f'{failed} FAILED'}")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--recipes", nargs="+", default=["fp8", "mxfp8", "mxfp8-bytes"],
                        choices=["fp8", "mxfp8", "mxfp8-bytes"])
    parser.add_argument("--dump", help="write each variant's TTGIR and PTX here")
    parser.add_argument("--wgrad", action="store_true", help="census of the weight-gradient candidate launches")
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.record:
        record(args.record, args.recipes)
        return 0
    launches = triton_build.in_interpreter(__file__, ["--recipes", *args.recipes])
    if args.wgrad:
        return 1 if wgrad_census(launches, args.arch) else 0
    return 1 if compile_all(launches, args.arch, args.dump) else 0

if __name__ == "__main__":
    sys.exit(main())
