"""Build Triton kernels for a GPU without one (the ``compile_check_*`` scripts).

A CPU run of the ops in the interpreter records every kernel launch (``record_launches``); each
recorded launch is then compiled for the target the way the JIT would specialise it at a launch
(``signature`` + ``build``). The two phases need different processes (``TRITON_INTERPRET`` is
read when the kernels are decorated): ``in_interpreter`` runs a script's recording phase.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

SM90_SHARED_BYTES = 232448  # per block on H100 / H200
POINTER_TYPES = {"torch.float32": "*fp32", "torch.float16": "*bf16", "torch.bfloat16": "*bf16",
                 "torch.int16": "*i16", "torch.int32": "*i32", "torch.int64": "*i64", "torch.uint8": "*u8"}


def record_launches(tag: Callable[[], str] = lambda: "") -> list[dict]:
    """From now on (in the interpreter), append every kernel launch to the returned list: kernel,
    argument kinds (tensors by dtype, constexprs and scalars by value), tensor bytes, grid,
    warps / stages and ``tag()``."""
    import torch
    from triton.runtime import interpreter

    launches: list[dict] = []
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args)) | {k: v for k, v in kwargs.items() if k in self.arg_names}
        kinds = {n: ("ptr", str(v.dtype)) if isinstance(v, torch.Tensor) else (type(v).__name__, v)
                 for n, v in bound.items()}
        nbytes = {n: v.numel() * v.element_size() for n, v in bound.items() if isinstance(v, torch.Tensor)}
        launches.append({"module": self.fn.__module__, "name": self.fn.__name__, "kinds": kinds, "bytes": nbytes,
                         "grid": list(grid) if isinstance(grid, tuple) else "callable", "tag": tag(),
                         "options": {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    return launches


def in_interpreter(script: str, args: list[str]) -> list[dict]:
    """Run ``script --record PATH *args`` with TRITON_INTERPRET=1; the launches it saved at PATH."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        subprocess.run([sys.executable, script, "--record", path, *args], env=dict(os.environ, TRITON_INTERPRET="1"),
                       check=True)
        with open(path) as f:
            return json.load(f)


def save(launches: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(launches, f)


def jit_function(launch: dict):
    """The recorded kernel's JITFunction (under any autotune / heuristics wrappers)."""
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def signature(fn, kinds: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compile``, specialised as the JIT does at a
    launch: an int equal to 1 becomes a constant, and pointers (torch allocations) and ints
    divisible by 16 carry ``tt.divisibility`` 16. Without these hints the compiler cannot prove
    16-byte vectors, and K loops are built without async copies: a misleading build."""
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        kind, value = kinds[p.name]
        if p.is_constexpr or value is None or (kind == "int" and value == 1):
            sig[p.name], consts[(i,)] = "constexpr", value
            continue
        if kind == "ptr":
            sig[p.name] = POINTER_TYPES[value]
        elif kind == "int":
            sig[p.name] = "i32" if abs(value) < 2**31 else "i64"
        elif kind == "float":
            sig[p.name] = "fp32"
        else:
            raise ValueError(f"{fn.__name__}: argument {p.name} of kind {kind} has no Triton type here")
        if kind == "ptr" or (kind == "int" and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def variant_key(launch: dict) -> tuple:
    """Launches with the same key build the same binary."""
    sig, consts, attrs = signature(jit_function(launch), launch["kinds"])
    return launch["name"], json.dumps(sig), repr(sorted(consts.items())), repr(sorted(attrs)), \
        json.dumps(launch["options"], sort_keys=True)


def build(launch: dict, arch: int, options: dict):
    """Compile one recorded launch for ``sm_<arch>``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = jit_function(launch)
    sig, consts, attrs = signature(fn, launch["kinds"])
    return compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                   target=GPUTarget("cuda", arch, 128), options=options)


def fits(kernel, arch: int) -> bool:
    return arch != 90 or kernel.metadata.shared <= SM90_SHARED_BYTES


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill-store bytes, spill-load bytes) of a kernel's PTX, from ``ptxas -v`` (the
    ptxas bundled with Triton)."""
    import re

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs.group(1)) if regs else -1, *(int(g) for g in (spill.groups() if spill else (-1, -1))))


def resources(kernel, arch: int) -> str:
    """Shared memory, registers and spills of a compiled kernel, as one line."""
    regs, stores, loads = ptxas_usage(kernel.asm["ptx"], arch)
    return f"shared {kernel.metadata.shared} B, regs {regs}, spills {stores}/{loads} B"


def recorded_options(launch: dict) -> dict:
    options = {"num_warps": launch["options"].get("num_warps", 4), "num_stages": launch["options"].get("num_stages", 3)}
    if "maxnreg" in launch["options"]:  # a register cap is part of the build (it can spill)
        options["maxnreg"] = launch["options"]["maxnreg"]
    return options


def build_each(launches: list[dict], arch: int, label: Callable[[dict, dict], str],
               describe: Callable[[object], str], options: Callable[[dict], dict] = recorded_options,
               built: Callable[[object, dict, int], None] | None = None) -> int:
    """Compile each distinct launch for ``sm_<arch>``, print an OK / FAIL line per variant
    (``label(launch, options)``, then ``describe(kernel)``) and a summary; returns the number of
    variants that did not build or did not fit in shared memory. ``built(kernel, launch, n)``
    sees each built kernel (e.g. to dump its IR)."""
    seen, failed = set(), 0
    for launch in launches:
        key = variant_key(launch)
        if key in seen:
            continue
        seen.add(key)
        opts = options(launch)
        name = label(launch, opts)
        try:
            kernel = build(launch, arch, opts)
        except Exception as e:
            failed += 1
            print(f"FAIL {name} {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        ok = fits(kernel, arch)
        failed += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {name} {describe(kernel)}", flush=True)
        if built is not None:
            built(kernel, launch, len(seen))
    print(f"{len(seen)} variants for sm_{arch}: {'ALL COMPILED' if not failed else f'{failed} FAILED'}")
    return failed
