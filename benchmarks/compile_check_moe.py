"""Build the row-tiled MoE kernels (``triton_kernels`` / ``triton_vendor``) for sm_90 without a GPU.

Every tuning config of ``_gather_gemm_kernel`` (up forward, gated or not; down dgrad, with or
without the routing weight's gradient) and ``_scatter_gemm_kernel`` (down forward, up dgrad),
pointer and TMA weight loads, plus the vendor path's row glue (``_gather_rows_kernel``,
``_act_rows_kernel``, ``_act_rows_backward_kernel``), bf16, specialised the way the JIT would
for olmoe under EP=2 (32 local experts, hidden 2048, expert ffn 1024, top-8, 65536 rows per
rank: ints divisible by 16 carry the hint, a unit stride becomes a constant). One line each:
shared memory, registers and spills (``ptxas -v``), and how the main loop was built (``wgmma``
instructions, ``cp.async`` copies: software pipelining). Run it on two checkouts to compare a
change's builds (``git archive`` the other one). Exits non-zero when a variant does not build.
Speed needs the H200: ``benchmarks/moe_layer.py`` and ``benchmarks/expert_parallel.py``.

    python benchmarks/compile_check_moe.py [--arch 90] [--only NAME ...]   # a few minutes on one core
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's moekit, not an installed one

import triton_build  # noqa: E402  (beside this script)

T, K, E, H, F = 2 * 32768, 8, 32, 2048, 1024  # rows and local experts of one EP=2 rank (olmoe)
ROWS, U = T * K, 2 * F  # swiglu: gate and up halves


def ptr(dtype: str = "bfloat16") -> tuple:
    return ("ptr", f"torch.{dtype}")


def ints(**values: int) -> dict:
    return {name: ("int", v) for name, v in values.items()}


def gemm_launches(k) -> list[dict]:
    """One launch per (kernel use, GEMM config), TMA variants included."""
    configs = [(dict(c.kwargs, TMA=tma), c.num_warps, c.num_stages)
               for c in k.GEMM_CONFIGS if not c.kwargs["TMA"] for tma in k.tma_variants(c)]
    launches = []
    for cfg, warps, stages in configs:
        common = dict(cfg, E_PAD=E, PRECISION="tf32", EVEN_K=True)  # every K here divides by BLOCK_K
        switches = ints(TMA_OK=int(cfg["TMA"]), ROWS_CLASS=0)  # host-side tuning keys, unused in the kernels
        uses = []
        for gated in (True, False):
            up = U if gated else F
            uses.append((f"up fwd {'gated' if gated else 'plain'}", "_gather_gemm_kernel", {
                **dict(src_ptr=ptr(), w_ptr=ptr(), h_ptr=ptr(), out_ptr=ptr(), counts_ptr=ptr("int32"),
                       order_ptr=ptr("int32"), weight_ptr=ptr("int32"), dweight_ptr=ptr()),
                **ints(num_rows=ROWS, F=F, K=H, num_experts=E, top_k=K, W_D1=up, W_D2=H,
                       stride_src=H, stride_we=up * H, stride_wn=H, stride_wk=1, stride_h=up, stride_out=F), **switches,
                **const(common, GATED=gated, ACT=0, BACKWARD=False, STORE_H=True, WEIGHT_GRAD=False,
                        B_K_MAJOR=True)}))
            for weight_grad in (True, False):
                uses.append((f"down dgrad {'gated' if gated else 'plain'}{' +dweight' if weight_grad else ''}",
                             "_gather_gemm_kernel", {
                    **dict(src_ptr=ptr(), w_ptr=ptr(), h_ptr=ptr(), out_ptr=ptr(), counts_ptr=ptr("int32"),
                           order_ptr=ptr("int32"), weight_ptr=ptr("float32"), dweight_ptr=ptr("float32")),
                    **ints(num_rows=ROWS, F=F, K=H, num_experts=E, top_k=K, W_D1=H, W_D2=F,
                           stride_src=H, stride_we=H * F, stride_wn=1, stride_wk=F, stride_h=up, stride_out=up),
                    **switches,
                    **const(common, GATED=gated, ACT=0, BACKWARD=True, STORE_H=False, WEIGHT_GRAD=weight_grad,
                            B_K_MAJOR=False)}))
        for k_major, n, kk, wn, wk, src_width in ((True, H, F, F, 1, F), (False, H, U, 1, H, U)):
            uses.append(("down fwd" if k_major else "up dgrad", "_scatter_gemm_kernel", {
                **dict(src_ptr=ptr(), w_ptr=ptr(), out_ptr=ptr(), counts_ptr=ptr("int32"), order_ptr=ptr("int32")),
                **ints(num_rows=ROWS, N=n, K=kk, num_experts=E, W_D1=H if k_major else U, W_D2=F if k_major else H,
                       stride_src=src_width, stride_we=H * kk, stride_wn=wn, stride_wk=wk,
                       stride_out=n), **switches,
                **const(common, B_K_MAJOR=k_major)}))
        tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}{' TMA' if cfg['TMA'] else ''}"
        for use, name, kinds in uses:
            launches.append({"module": k.__name__, "name": name, "kinds": kinds, "tag": f"{use} {tile}",
                             "options": {"num_warps": warps, "num_stages": stages}})
    return launches


def glue_launches(v) -> list[dict]:
    rows = dict(num_experts=E, top_k=K)
    uses = []
    for scale in (True, False):
        uses.append((f"gather rows{' scaled' if scale else ''}", "_gather_rows_kernel", {
            **dict(src_ptr=ptr(), out_ptr=ptr(), counts_ptr=ptr("int32"), order_ptr=ptr("int32"),
                   weight_ptr=ptr("float32")),
            **ints(**rows, N=H, stride_src=H, stride_out=H), **const({}, E_PAD=E, SCALE=scale, BLOCK_N=1024)}))
    for gated in (True, False):
        up = U if gated else F
        uses.append((f"act rows {'gated' if gated else 'plain'}", "_act_rows_kernel", {
            **dict(h_ptr=ptr(), a_ptr=ptr(), counts_ptr=ptr("int32")),
            **ints(num_experts=E, F=F, stride_h=up, stride_a=F),
            **const({}, E_PAD=E, GATED=gated, ACT=0, BLOCK_F=1024)}))
        uses.append((f"act rows backward {'gated' if gated else 'plain'}", "_act_rows_backward_kernel", {
            **dict(da_ptr=ptr(), h_ptr=ptr(), dh_ptr=ptr(), dweight_ptr=ptr("float32"), counts_ptr=ptr("int32"),
                   order_ptr=ptr("int32"), weight_ptr=ptr("float32")),
            **ints(num_experts=E, F=F, stride_da=F, stride_h=up, stride_dh=up),
            **const({}, E_PAD=E, GATED=gated, ACT=0, WEIGHT_GRAD=True, BLOCK_F=1024)}))
    options = {"num_warps": 4, "num_stages": 3}  # the launchers' defaults
    return [{"module": v.__name__, "name": name, "kinds": kinds, "tag": use, "options": options}
            for use, name, kinds in uses]


def const(base: dict, **flags) -> dict:
    return {name: ("constexpr", value) for name, value in {**base, **flags}.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--only", nargs="+", help="kernel names to build (default: all)")
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # the GPU configs, not the interpreter's one tile
    from moekit.ops.moe import triton_kernels, triton_vendor

    launches = gemm_launches(triton_kernels) + glue_launches(triton_vendor)
    if args.only:
        launches = [la for la in launches if la["name"] in args.only]

    def label(launch, opts):
        return f"{launch['name']:26s} {launch['tag']:40s} w{opts['num_warps']} s{opts['num_stages']}"

    def describe(kernel):
        ptx = kernel.asm["ptx"]
        return (f"| {triton_build.resources(kernel, args.arch)} | wgmma {ptx.count('wgmma.mma_async')} "
                f"cp.async {len(re.findall(r'cp[.]async[.]c[ag]', ptx))}")

    return 1 if triton_build.build_each(launches, args.arch, label, describe) else 0


if __name__ == "__main__":
    sys.exit(main())
