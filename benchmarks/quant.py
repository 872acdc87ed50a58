"""MXFP8 / FP8 block quantization kernels vs a device-to-device copy and torch.compile'd references.

On a 16384 x 7168 bf16 input (a DeepSeek-V3 hidden-state batch): first checks every kernel
against its plain-PyTorch reference bit for bit, then (with --sweep) tries a few tile shapes per
kernel, then times (triton.testing.do_bench, median) the copy, the kernels with their default
tiles and the references under torch.compile (the torchao-style peer), the MXFP8 kernels once per
tile order (`order_rows`) and a kernel that moves the same bytes without the arithmetic
(`move_only_rows`), the MXFP8 and move-only both-layout kernels also with their scales in cuBLAS's
blocked layout (`scale_layout="blocked"`: a tile's scales are one whole 512-byte block per layout),
and prints GB/s and % of copy bandwidth. Bytes count what must move: the
input read once plus every output written (the one-pass MXFP8 kernel writes both FP8 layouts and
both scale arrays). Target: the one-pass both-layouts kernel at >= 90% of copy bandwidth. Needs a
CUDA GPU.

    python benchmarks/quant.py [--sweep]
    python benchmarks/quant.py --compile-only 90 [--sass]   # no GPU needed: registers, or SASS per element
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter

import sass_census  # benchmarks/sass_census.py, beside this script
import torch
import triton
import triton.language as tl
import triton_build  # benchmarks/triton_build.py, beside this script
from triton.testing import do_bench

from moekit.quant import fp8_block, mxfp8
from moekit.quant.formats import element_format
from moekit.quant.fp8_block import reference as block_ref
from moekit.quant.fp8_block import triton as block_triton
from moekit.quant.mxfp8 import blocked as mx_blocked
from moekit.quant.mxfp8 import reference as mx_ref
from moekit.quant.mxfp8 import triton as mx_triton

DEVICE = "cuda"
M, K = 16384, 7168
ELEM, SCALE_MODE = "e4m3", "floor"
# Tile shapes tried by --sweep: (rows, cols, num_warps).
MX_TILES = [(32, 64, 2), (32, 128, 4), (64, 64, 2), (64, 64, 4), (64, 128, 4), (128, 32, 4), (128, 64, 4),
            (128, 64, 8), (128, 128, 4), (128, 128, 8), (64, 256, 8), (256, 64, 8)]
ACT_TILES = [(8, 128, 2), (16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 128, 8), (64, 128, 8), (32, 256, 8),
             (8, 512, 4), (16, 512, 8)]
WEIGHT_TILES = [(128, 128, 4), (128, 128, 8), (128, 128, 16), (128, 256, 8), (256, 128, 16)]


def make_input() -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(M, K, generator=g, device=DEVICE)
    x *= torch.exp2(torch.randint(-8, 8, (M, 1), generator=g, device=DEVICE).float())
    x[::997, ::131] *= 1000.0  # outliers
    x[0, :32] = 0.0  # an all-zero block
    x[5, 70], x[M - 3, K - 100] = float("nan"), float("inf")
    return x.to(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {1: torch.uint8, 4: torch.int32}[a.element_size()]
    return a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def check_bit_exact(x: torch.Tensor) -> dict[str, bool]:
    """The benchmarked configurations (tests/quant cover every element type and scale mode)."""
    want = mx_ref.quantize_both(x, ELEM, SCALE_MODE)
    got = mxfp8.quantize_both(x, ELEM, SCALE_MODE, backend="triton")
    exact = {"mxfp8 both": all(same_bits(g.data, w.data) and same_bits(g.scale, w.scale)
                               for g, w in zip(got, want, strict=True))}
    got = mxfp8.quantize_both(x, ELEM, SCALE_MODE, backend="triton", scale_layout="blocked")
    exact["mxfp8 both blocked"] = all(same_bits(g.data, w.data) and same_bits(g.scale, mx_blocked.from_plain(w).scale)
                                      for g, w in zip(got, want, strict=True))
    got, want = mxfp8.quantize(x, -1, ELEM, SCALE_MODE, backend="triton"), mx_ref.quantize(x, -1, ELEM, SCALE_MODE)
    exact["mxfp8 row"] = same_bits(got.data, want.data) and same_bits(got.scale, want.scale)
    got = mxfp8.quantize(x, -1, ELEM, SCALE_MODE, backend="triton", scale_layout="blocked")
    exact["mxfp8 row blocked"] = same_bits(got.data, want.data) and same_bits(got.scale,
                                                                              mx_blocked.from_plain(want).scale)
    for name, block in (("fp8 1x128", (1, 128)), ("fp8 128x128", (128, 128))):
        got, want = fp8_block.quantize(x, block, backend="triton"), block_ref.quantize(x, block)
        nan = want.scale.isnan()
        exact[name] = same_bits(got.data, want.data) and torch.equal(got.scale.isnan(), nan) and same_bits(
            got.scale.masked_fill(nan, 0), want.scale.masked_fill(nan, 0))
    _, got_t = fp8_block.quantize_both(x, backend="triton")
    exact["fp8 128x128 + T"] = same_bits(got_t.data, block_ref.quantize(x.t(), (128, 128)).data)
    return exact


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def mx_launcher(x, rowwise: bool, colwise: bool, tiles=None, scale_layout: str = "plain"):
    out = mx_triton.empty_outputs(M, K, rowwise, colwise, ELEM, x.device, scale_layout)
    return lambda: mx_triton.launch_quantize(x, out, ELEM, SCALE_MODE, tiles, scale_layout)


def block_launcher(x, block, tiles=None, transposed=False):
    data = torch.empty(M, K, dtype=torch.uint8, device=x.device)
    data_t = torch.empty(K, M, dtype=torch.uint8, device=x.device) if transposed else None
    scale = torch.empty(M // block[0], K // block[1], dtype=torch.float32, device=x.device)
    return lambda: block_triton.launch_quantize(x, data, scale, block, ELEM, tiles, data_t, M)


def sweep(name: str, make_fn, configs, tile_keys) -> None:
    timings = []
    for a, b, warps in configs:
        tiles = {tile_keys[0]: a, tile_keys[1]: b, "num_warps": warps}
        try:
            timings.append((median_ms(make_fn(tiles)), f"{a}x{b}/{warps}w"))
        except Exception as err:  # a tile too big for shared memory / registers on this GPU
            timings.append((float("inf"), f"{a}x{b}/{warps}w ({type(err).__name__})"))
    timings.sort()
    print(f"  {name:14s} " + "  ".join(f"{label} {ms:.3f}" for ms, label in timings))


def order_rows(x, best, exact: dict) -> list:
    """The tile orders side by side (GROUP_M row bands per group; 1 is K-major, all of them M-major,
    the row-only kernel's order before it went K-major): the both-layout kernel at the autotuned tile
    (the first candidate when the tile came from the disk cache), then, if that tile is paired, the
    general path's 128x128/8w K-major beside it; the row-only one at ROW_CONFIG. Then with blocked
    scales, K-major only: every blocked candidate, each also without its register limit (ptxas's own
    choice, which issues some loads late: `_late_loads`), and row-only. Each run's buffers are checked
    against the reference; timing rows for the main table."""
    want = mx_ref.quantize_both(x, ELEM, SCALE_MODE)
    want = {"plain": {"row_data": want[0].data, "row_scale": want[0].scale, "col_data": want[1].data.t(),
                      "col_scale": want[1].scale.t()},
            "blocked": {"row_data": want[0].data, "row_scale": mx_blocked.from_plain(want[0]).scale,
                        "col_data": want[1].data.t(), "col_scale": mx_blocked.from_plain(want[1]).scale}}
    both = best or mx_triton.BOTH_CONFIGS[0]
    runs = [("plain", True, mx_triton.config_tiles(both), None)]
    if both.kwargs["PAIRED"]:
        runs.append(("plain", True, mx_triton.config_tiles(mx_triton._config(128, 128, 8)), (1,)))
    runs.append(("plain", False, mx_triton.config_tiles(mx_triton.ROW_CONFIG), None))
    for config in mx_triton.BLOCKED_CONFIGS:
        tiles = mx_triton.config_tiles(config)
        runs += [("blocked", True, tiles, (1,))] + ([("blocked", True, dict(tiles, maxnreg=None), (1,))]
                                                    if tiles.get("maxnreg") else [])
    runs.append(("blocked", False, mx_triton.config_tiles(mx_triton.BLOCKED_ROW_CONFIG), (1,)))
    rows = []
    for layout, colwise, tile, orders in runs:
        sector = mx_triton._sector_group(tile["BLOCK_M"])
        for group in orders or (1, sector, 4 * sector, M // tile["BLOCK_M"]):
            tiles = {key: value for key, value in dict(tile, GROUP_M=group).items() if value is not None}
            out = mx_triton.empty_outputs(M, K, True, colwise, ELEM, x.device, layout)
            mx_triton.launch_quantize(x, out, ELEM, SCALE_MODE, tiles, layout)
            name = (f"{'mxfp8 both' if colwise else 'mxfp8 row'}{', blocked' if layout == 'blocked' else ''} "
                    f"{tile['BLOCK_M']}x{tile['BLOCK_K']} "
                    + ("paired " if tile["PAIRED"] else "general " if colwise else "")
                    + (f"maxnreg {tile['maxnreg']} " if tile.get("maxnreg") else "")
                    + ("K-major" if group == 1 else "M-major" if group == M // tile["BLOCK_M"] else f"group {group}"))
            exact[name] = all(same_bits(buf, want[layout][key].view(torch.uint8)) for key, buf in out.items())
            rows.append((name, mx_launcher(x, True, colwise, tiles, layout), mx_bytes(True, colwise), name))
    return rows


@triton.jit
def _move_only_kernel(x_ptr, row_data_ptr, row_scale_ptr, col_data_ptr, col_scale_ptr, M, K,
                      COLWISE: tl.constexpr, SCALES: tl.constexpr, TILE: tl.constexpr, GROUP_M: tl.constexpr,
                      BLOCKED: tl.constexpr):
    """The MXFP8 kernel's memory traffic without its arithmetic, moved the way its paired data path
    (`_quantize_both_paired`) moves it: square tiles in the same order, x read as int32 pairs into
    the same [a, h, j, p] layout, a byte per element (each bf16's high byte) stored as int16 pairs
    row-wise and as 4-row words column-wise (x^T: the same on-chip transpose), and, with SCALES, a
    byte per 32-element block each way (the maximum of its high bytes), with BLOCKED (TILE 128) stored
    as the MXFP8 kernel stores blocked scales (`_store_scale_tile`). M and K divisible by TILE."""
    pid_m = tl.program_id(1) * GROUP_M + tl.program_id(0) % GROUP_M
    pid_k = tl.program_id(0) // GROUP_M
    if pid_m >= M // TILE:
        return
    H: tl.constexpr = TILE // 64
    A: tl.constexpr = TILE // 4
    S: tl.constexpr = TILE // 32
    h = tl.arange(0, H)[None, :, None, None]
    rows = pid_m * TILE + 4 * tl.arange(0, A)[:, None, None, None] + tl.arange(0, 4)[None, None, :, None]
    pair = pid_k * (TILE // 2) + 32 * h + tl.arange(0, 32)[None, None, None, :]
    pairs = tl.load(x_ptr + rows * (K // 2) + pair)
    high_lo, high_hi = (pairs >> 8) & 0xFF, (pairs >> 24) & 0xFF
    tl.store(row_data_ptr + rows * (K // 2) + pair, (high_lo | (high_hi << 8)).to(tl.int16))
    if SCALES:
        block_max = tl.max(tl.reshape(tl.maximum(high_lo, high_hi), (A, H, 4, 2, 16)), axis=4)
        if BLOCKED:  # [a, h, j, half] -> [row 4a + j, column 2h + half]
            mx_triton._store_scale_tile(row_scale_ptr, tl.reshape(tl.permute(block_max.to(tl.uint8), (0, 2, 1, 3)),
                                                                  (TILE, 4)), pid_m, pid_k, K // 32)
        else:
            kb = pid_k * (TILE // 32) + 2 * h + tl.arange(0, 2)[None, None, None, :]
            tl.store(row_scale_ptr + rows * (K // 32) + kb, block_max.to(tl.uint8))
    if COLWISE:
        # [s, a % 8, h, p, 4 rows] -> words; [.., even / odd column] -> [column, word]
        col_lo = tl.permute(tl.reshape(high_lo, (S, 8, H, 4, 32)), (0, 1, 2, 4, 3)) << tl.arange(0, 4) * 8
        col_hi = tl.permute(tl.reshape(high_hi, (S, 8, H, 4, 32)), (0, 1, 2, 4, 3)) << tl.arange(0, 4) * 8
        words = tl.join(tl.reduce(col_lo, 4, _bit_or), tl.reduce(col_hi, 4, _bit_or))
        offs_k = pid_k * TILE + tl.arange(0, TILE)[:, None]
        offs_w = pid_m * (TILE // 4) + tl.arange(0, TILE // 4)[None, :]
        tl.store(col_data_ptr + offs_k * (M // 4) + offs_w,
                 tl.reshape(tl.permute(words, (2, 3, 4, 0, 1)), (TILE, TILE // 4)))
        if SCALES:
            col_max = tl.join(tl.max(tl.max(tl.reshape(high_lo, (S, 8, H, 4, 32)), axis=3), axis=1),
                              tl.max(tl.max(tl.reshape(high_hi, (S, 8, H, 4, 32)), axis=3), axis=1))
            col_max = tl.reshape(tl.permute(col_max, (1, 2, 3, 0)), (TILE, S)).to(tl.uint8)
            if BLOCKED:
                mx_triton._store_scale_tile(col_scale_ptr, col_max, pid_k, pid_m, M // 32)
            else:
                tl.store(col_scale_ptr + offs_k * (M // 32) + pid_m * S + tl.arange(0, S)[None, :], col_max)


@triton.jit
def _bit_or(a, b):
    return a | b


MOVE_ONLY_TILE, MOVE_ONLY_WARPS = 128, 8


def move_only_rows(x: torch.Tensor) -> list:
    """Timing rows for `_move_only_kernel` (128x128 tiles, 8 warps; K-major and groups of 8 row
    bands; both layouts with and without the scale bytes, and row-only), after a check that it
    writes what it should: the ceiling of this data path in Triton. Near the MXFP8 kernel's own
    figure, the memory pattern is what limits it; far above, its arithmetic (the time each program
    computes with no loads in flight) is. Without the scale bytes: what their stores cost; with them
    blocked (K-major only): what is left of that cost when every tile's scales are whole sectors."""
    m, k, tile = *x.shape, MOVE_ONLY_TILE
    high = ((x.view(torch.int16) >> 8) & 0xFF).to(torch.uint8)
    want = {"row_data": high, "row_scale": high.reshape(m, k // 32, 32).amax(2), "col_data": high.t(),
            "col_scale": high.reshape(m // 32, 32, k).amax(1).t()}
    want_blocked = dict(want, **{name: mx_blocked.to_blocked(want[name]).view(torch.uint8)
                                 for name in ("row_scale", "col_scale")})
    sector = mx_triton._sector_group(tile)
    rows = []
    for colwise, scales, blocked, groups in ((True, True, False, (1, sector)), (True, True, True, (1,)),
                                             (True, False, False, (1, sector)), (False, True, False, (1, sector))):
        expected = want_blocked if blocked else want
        for group in groups:
            out = {name: torch.empty(expected[name].shape, dtype=torch.uint8, device=x.device)
                   for name in want if (colwise or name.startswith("row")) and (scales or name.endswith("data"))}
            grid = (group * (k // tile), triton.cdiv(m // tile, group))

            def run(out=out, grid=grid, colwise=colwise, scales=scales, group=group, blocked=blocked):
                _move_only_kernel[grid](x.view(torch.int32), out["row_data"].view(torch.int16), out.get("row_scale"),
                                        out["col_data"].view(torch.int32) if colwise else None, out.get("col_scale"),
                                        m, k, COLWISE=colwise, SCALES=scales, TILE=tile, GROUP_M=group,
                                        BLOCKED=blocked, num_warps=MOVE_ONLY_WARPS)

            run()
            if not all(torch.equal(buf, expected[name]) for name, buf in out.items()):
                raise SystemExit(f"the move-only kernel wrote wrong bytes (group {group}, blocked {blocked})")
            name = (f"move only {'both' if colwise else 'row'}{'' if scales else ', no scales'}"
                    f"{', blocked scales' if blocked else ''} {tile}x{tile} "
                    + ("K-major" if group == 1 else f"group {group}"))
            nbytes = mx_bytes(True, colwise) - (0 if scales else (1 + colwise) * m * k // 32)
            rows.append((name, run, nbytes, None))
    return rows


def compiled_peer(fn):
    compiled = torch.compile(fn, dynamic=False)

    def run(x):
        return compiled(x)

    return run


def _ptxas_report(kernel, arch: int, warps: int) -> str:
    regs, spill_stores, _ = triton_build.ptxas_usage(kernel.asm["ptx"], arch)
    return (f"{regs} regs, {spill_stores} B spilled, {kernel.metadata.shared} B shared, "
            f"{_ctas_per_sm(regs, warps, kernel.metadata.shared)} CTAs/SM")


def _ctas_per_sm(regs: int, warps: int, shared: int) -> int:
    """CTAs an sm_90 SM holds at once: 64K registers (256-register units a warp), 64 warps, 32 CTAs,
    228 KB of shared memory (1 KB of it reserved per CTA)."""
    warp_regs = -(-regs * 32 // 256) * 256
    return min(65536 // (warp_regs * warps), 64 // warps, 32, 228 * 1024 // (shared + 1024))


_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def _late_loads(cubin: bytes) -> str:
    """Late global loads, as "late/all": those issued after the first instruction that reads a register
    an earlier load wrote. That instruction waits for the data (a DRAM round trip), so the late loads
    start a second round trip: with one tile per program and 2 programs an SM, the SM's reads then
    run half the time with a fraction of its bytes in flight. ptxas decides this order (the PTX
    issues every load first), so only the build shows it."""
    loaded, first_use, loads = set(), None, []
    for line in sass_census.disassemble(cubin).splitlines():
        if not (m := _SASS_LINE.match(line)):
            continue
        op, regs = m.group(1), [int(r) for r in re.findall(r"\bR(\d+)\b", m.group(2))]
        sources = regs if op.startswith(("STG", "STS", "ST.")) else regs[1:]
        if first_use is None and loaded.intersection(sources):
            first_use = len(loads)
        if op.startswith("LDG"):
            width = 4 if ".128" in op else 2 if ".64" in op else 1
            loaded.update(range(regs[0], regs[0] + width))
            loads.append(op)
    return f"{len(loads) - (len(loads) if first_use is None else first_use)}/{len(loads)}"


COPY_GBS = 4051.0  # H200 device-to-device copy of the benchmark input (bf16 read + write), measured


def mx_bytes(rowwise: bool, colwise: bool) -> int:
    """Bytes the MXFP8 kernel must move: the bf16 input, then per layout FP8 data and E8M0 scales."""
    return 2 * M * K + (rowwise + colwise) * (M * K + M * K // 32)


def _build_report(fn, constexprs: dict, pointer_types: dict, target, warps: int, maxnreg: int | None,
                  label: str, sass: bool, budget: float | None, elements: int | None = None) -> bool:
    """Build one variant of `fn` for `target` (pointers "*u8" unless `pointer_types` says otherwise),
    print its registers, or with `sass` its SASS census against `budget` (None: build only), per element
    of its tile (`elements`, else TILE squared or BLOCK_M x BLOCK_K)."""
    from triton.compiler import ASTSource, compile

    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, "*u8" if n.endswith("_ptr") else "i32")
                 for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in constexprs}
    try:
        kernel = compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                         target=target, options={"num_warps": warps, "num_stages": 1, "maxnreg": maxnreg})
    except Exception as err:  # report every failing variant, not just the first
        print(f"FAIL {label}: {type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}")
        return False
    if not sass:
        print(f"  {label:42s} {_ptxas_report(kernel, target.arch, warps)}, late LDG {_late_loads(kernel.asm['cubin'])}",
              flush=True)
    elif budget is not None:
        counts, loops = sass_census.census(kernel.asm["cubin"])
        tile = constexprs.get("TILE")
        elements = elements or (tile * tile if tile else constexprs["BLOCK_M"] * constexprs["BLOCK_K"])
        rates = sass_census.per_element(counts, elements // (32 * warps))
        print(sass_census.format_row(label, rates, budget, 42) + (" (loops: static count)" if loops else "")
              + f"  STG/thread {_store_widths(kernel.asm['cubin'])}; late LDG {_late_loads(kernel.asm['cubin'])}",
              flush=True)
    return True


def _store_widths(cubin: bytes) -> str:
    """Global stores per thread by width ("128": 16-byte vectors; "U8", "U16": the scale bytes' kind)."""
    sass = sass_census.disassemble(cubin)
    stores = Counter(m.group(1) for m in re.finditer(r"\bSTG\.E\.(?:EF\.)?([A-Z0-9.]+)", sass))
    return ", ".join(f"{n} x {width}" for width, n in sorted(stores.items()))


def compile_only(arch: int, sass: bool = False) -> bool:
    """Build the MXFP8 quantize kernel for sm_<arch> (both layouts and row-only, every autotune
    config and --sweep tile, bf16 and fp32 input; the move-only kernel and, for comparison, FP8 block's
    both-layout kernel too) without a GPU. Pointers and sizes are marked 16-divisible, as Triton
    specializes them at launch, so the loads and stores vectorize as on the GPU.

    With `sass`, also count each bf16 build's SASS instructions per element by kind (thread-
    instructions; `sass_census`) against the issue budget: what 132 SMs issuing 4 warp-
    instructions a clock at 1.98 GHz get through in the time the layouts take at 90% of copy
    bandwidth (`COPY_GBS`). A kernel near 100% of that budget cannot reach the target."""
    from triton.backends.compiler import GPUTarget

    fn = mx_triton._mx_quantize_kernel
    target = GPUTarget("cuda", arch, 32)
    fmt = mx_triton._format_args(ELEM, SCALE_MODE)
    fmt["EMULATE_RNE"] = False
    configs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.maxnreg, c.kwargs["GROUP_M"],
                c.kwargs["PAIRED"]) for c in mx_triton.BOTH_CONFIGS]
    configs += [(a, b, w, None, 1, False) for a, b, w in MX_TILES if (a, b, w, None, 1, False) not in configs]
    blocked_configs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.maxnreg, c.kwargs["GROUP_M"],
                        c.kwargs["PAIRED"]) for c in mx_triton.BLOCKED_CONFIGS]
    blocked_row = mx_triton.BLOCKED_ROW_CONFIG
    blocked_row = (blocked_row.kwargs["BLOCK_M"], blocked_row.kwargs["BLOCK_K"], blocked_row.num_warps, None, 1, False)
    ok = True
    budgets = {colwise: sass_census.issue_budget(M * K, mx_bytes(True, colwise) / (0.9 * COPY_GBS * 1e9))
               for colwise in (True, False)}
    if sass:
        print(f"SASS thread-instructions per element; budget at 90% of copy: both {budgets[True]:.1f}, "
              f"row {budgets[False]:.1f}\n{sass_census.header(42)}")
    # every tile with int32 offsets, and the first tile with the int64 ones of inputs past 2^31 elements;
    # then the blocked-scale candidates the same way
    variants = [(rowwise, colwise, x_type, tile, False, False) for rowwise, colwise in ((True, True), (True, False))
                for x_type in ("*i16", "*fp32") for tile in configs]
    variants += [(True, True, "*i16", configs[0], True, False)]
    variants += [(True, colwise, x_type, tile, False, True) for colwise, tiles in ((True, blocked_configs),
                                                                                  (False, [blocked_row]))
                 for x_type in ("*i16", "*fp32") for tile in tiles]
    variants += [(True, True, "*i16", blocked_configs[0], True, True)]
    # the blocked candidates without their register limit: ptxas's own schedule, for comparison
    variants += [(True, True, "*i16", (*tile[:3], None, *tile[4:]), False, True) for tile in blocked_configs if tile[3]]
    built = set()
    for rowwise, colwise, x_type, (block_m, block_k, warps, maxnreg, group_m, paired), index_64, blocked in variants:
        # the benchmark's shape divides every tile (EVEN: no masks); the int64 build is the masked one
        if paired and not mx_triton.paired_applies(rowwise, colwise, x_type == "*i16"):
            paired, maxnreg = False, None  # the general path, as `_fit_groups` runs it
        key = (rowwise, colwise, x_type, block_m, block_k, warps, maxnreg, group_m, paired, index_64, blocked)
        if key in built:  # a paired tile on the general path, built already
            continue
        built.add(key)
        constexprs = dict(fmt, ROWWISE=rowwise, COLWISE=colwise, IS_BF16=x_type == "*i16", BLOCK_M=block_m,
                          BLOCK_K=block_k, ROW_GROUP=mx_triton._row_group(block_m, block_k, warps),
                          INDEX_64=index_64, EVEN=not index_64 and M % block_m == 0 and K % block_k == 0,
                          GROUP_M=group_m, U16X2=arch >= 90, PAIRED=paired, BLOCKED_SCALES=blocked)
        label = (f"{'both' if colwise else 'row '} {'bf16' if x_type == '*i16' else 'fp32'} "
                 f"{block_m}x{block_k}/{warps}w" + (" paired" if paired else "") + (" blocked" if blocked else "")
                 + (f" group {group_m}" if group_m > 1 else "")
                 + (f" maxnreg {maxnreg}" if maxnreg else "")
                 + (" int64 offsets, masked" if index_64 else ""))
        ok &= _build_report(fn, constexprs, {"x_ptr": x_type, "col_data_ptr": "*i32"}, target, warps, maxnreg,
                            label, sass, budgets[colwise] if x_type == "*i16" else None)
    # the bytes-moved ceiling (`move_only_rows`): its SASS shows what the data path alone costs
    for colwise, scales, blocked in ((True, True, False), (True, True, True), (True, False, False),
                                     (False, True, False)):
        constexprs = dict(COLWISE=colwise, SCALES=scales, TILE=MOVE_ONLY_TILE, BLOCKED=blocked,
                          GROUP_M=1 if blocked else mx_triton._sector_group(MOVE_ONLY_TILE))
        label = (f"move only {'both' if colwise else 'row '}{'' if scales else ', no scales'}"
                 f"{', blocked scales' if blocked else ''} {MOVE_ONLY_TILE}x{MOVE_ONLY_TILE}/{MOVE_ONLY_WARPS}w")
        ok &= _build_report(_move_only_kernel, constexprs,
                            {"x_ptr": "*i32", "row_data_ptr": "*i16", "col_data_ptr": "*i32"}, target,
                            MOVE_ONLY_WARPS, None, label, sass, budgets[colwise])
    # FP8 block's both-layout kernel (91% of copy on the H200): the same bytes per element, one scale per block
    block, warps = 128, block_triton._both_warps(128)
    fmt_block = dict(block_triton._format_args(ELEM), EMULATE_RNE=False)
    constexprs = dict(fmt_block, BLOCK=block, ROW_GROUP=block_triton._both_row_group(block, warps), IS_BF16=True,
                      INDEX_64=False)
    ok &= _build_report(block_triton._block_quantize_both_kernel, constexprs,
                        {"x_ptr": "*i32", "data_ptr": "*i16", "scale_ptr": "*fp32", "data_t_ptr": "*i32"}, target,
                        warps, None, f"fp8 128x128 both (fp8_block) /{warps}w", sass,
                        sass_census.issue_budget(M * K, 4 * M * K / (0.9 * COPY_GBS * 1e9)), elements=block * block)
    print(f"{'ALL COMPILED' if ok else 'SOME FAILED TO COMPILE'} for sm_{arch}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time a few tile shapes per kernel (slower)")
    parser.add_argument("--compile-only", type=int, metavar="ARCH", default=None,
                        help="build the MXFP8 kernels for sm_ARCH (e.g. 90) without a GPU, print registers, and stop")
    parser.add_argument("--sass", action="store_true",
                        help="with --compile-only: SASS instructions per element by kind instead of registers")
    args = parser.parse_args()
    if args.compile_only is not None:
        raise SystemExit(0 if compile_only(args.compile_only, args.sass) else 1)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/quant.py needs a CUDA GPU")
    start = time.time()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"x [{M}, {K}] bf16, {ELEM} {SCALE_MODE}")
    x = make_input()
    exact = check_bit_exact(x)
    print("bit-exact vs reference: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in exact.items()))
    # unset when read from Triton's disk cache
    best = {layout: getattr(tuner, "best_config", None) for layout, tuner in mx_triton._mx_quantize_tuned.items()}
    for layout, config in best.items():
        if config is not None:
            print(f"mxfp8 both ({layout} scales): autotuned tile {config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_K']}/"
                  f"{config.num_warps}w" + (" paired" if config.kwargs["PAIRED"] else "")
                  + f", group {config.kwargs['GROUP_M']}" + (f", maxnreg {config.maxnreg}" if config.maxnreg else ""))

    if args.sweep:
        print("tile sweep (median ms, best first):")
        sweep("mxfp8 both", lambda t: mx_launcher(x, True, True, t), MX_TILES, ("BLOCK_M", "BLOCK_K"))
        sweep("mxfp8 row", lambda t: mx_launcher(x, True, False, t), MX_TILES, ("BLOCK_M", "BLOCK_K"))
        sweep("fp8 1x128", lambda t: block_launcher(x, (1, 128), t), ACT_TILES, ("TILE_R", "TILE_K"))
        sweep("fp8 128x128", lambda t: block_launcher(x, (128, 128), t), WEIGHT_TILES, ("TILE_R", "TILE_K"))

    n = M * K
    in_bytes = x.numel() * x.element_size()
    copy_out = torch.empty_like(x)
    fmt_mx = element_format(ELEM)
    rows = [
        # (name, fn, bytes moved, bit-exact entry)
        ("copy (d2d)", lambda: copy_out.copy_(x), 2 * in_bytes, None),
        ("mxfp8 both (1 pass)", mx_launcher(x, True, True), in_bytes + 2 * n + 2 * n // 32,
         "mxfp8 both"),
        ("mxfp8 both, blocked scales", mx_launcher(x, True, True, scale_layout="blocked"),
         in_bytes + 2 * n + 2 * n // 32, "mxfp8 both blocked"),
        ("mxfp8 row", mx_launcher(x, True, False), in_bytes + n + n // 32, "mxfp8 row"),
        ("mxfp8 row, blocked scales", mx_launcher(x, True, False, scale_layout="blocked"), in_bytes + n + n // 32,
         "mxfp8 row blocked"),
        ("fp8 1x128", block_launcher(x, (1, 128)), in_bytes + n + 4 * n // 128, "fp8 1x128"),
        ("fp8 128x128", block_launcher(x, (128, 128)), in_bytes + n + 4 * n // (128 * 128), "fp8 128x128"),
        ("fp8 128x128 + transpose", block_launcher(x, (128, 128), transposed=True),
         in_bytes + 2 * n + 4 * n // (128 * 128), "fp8 128x128 + T"),
    ]
    peers = [
        ("compiled ref: mxfp8 both",
         lambda t: (mx_ref.quantize_blocks(t.float().reshape(M, K // 32, 32), fmt_mx, SCALE_MODE),
                    mx_ref.quantize_blocks(t.t().float().reshape(K, M // 32, 32), fmt_mx, SCALE_MODE)),
         in_bytes + 2 * n + 2 * n // 32),
        ("compiled ref: mxfp8 row", lambda t: mx_ref.quantize_blocks(t.float().reshape(M, K // 32, 32), fmt_mx,
                                                                     SCALE_MODE), in_bytes + n + n // 32),
        ("compiled ref: fp8 1x128", lambda t: block_ref.quantize(t, (1, 128)).data, in_bytes + n + 4 * n // 128),
        ("compiled ref: fp8 128x128", lambda t: block_ref.quantize(t, (128, 128)).data,
         in_bytes + n + 4 * n // (128 * 128)),
    ]
    for name, fn, nbytes in peers:
        peer = compiled_peer(fn)
        try:
            peer(x)
            rows.append((name, lambda peer=peer: peer(x), nbytes, None))
        except Exception as err:  # report, do not hide, a peer that does not compile
            print(f"{name}: torch.compile failed: {type(err).__name__}: {err}".splitlines()[0])

    rows += order_rows(x, best["plain"], exact) + move_only_rows(x)
    results = []
    for name, fn, nbytes, exact_key in rows:
        ms = median_ms(fn)
        results.append((name, ms, nbytes / ms / 1e6, exact_key))
    copy_gbs = results[0][2]
    print(f"\nquant kernels, x [{M}, {K}] bf16 -> {ELEM} ({SCALE_MODE}); total {time.time() - start:.0f} s")
    print(f"{'kernel':28s} {'ms':>8s} {'GB/s':>8s} {'% copy':>7s} {'exact':>6s}")
    for name, ms, gbs, exact_key in results:
        mark = "-" if exact_key is None else ("yes" if exact[exact_key] else "NO")
        print(f"{name:28s} {ms:8.3f} {gbs:8.0f} {100 * gbs / copy_gbs:6.1f}% {mark:>6s}")


if __name__ == "__main__":
    main()
