"""Build every Triton linear-attention kernel variant for a GPU architecture, without a GPU.

Phase 1 runs each op's Triton path (forward and backward; float32 and float16 inputs, K = V in
{64, 128}, an initial state) in the CPU interpreter and records every kernel launch: argument
kinds, constexpr values (PRECISION included), warps and stages. Phase 2 compiles each recorded
variant with ``triton.compile`` for ``--arch`` (16-bit pointers as bf16, the GPU's dtype) and
prints its shared memory, so a kernel that does not build for, or does not fit, the target is
found before device time is spent. Correctness still needs the GPU check
(``gpu_check_linear_attention.py``). About 6 minutes on one CPU core with an empty Triton
cache (123 variants), seconds with a warm one.

    python benchmarks/compile_check_linear_attention.py [--arch 90]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile

SM90_SHARED_BYTES = 232448  # per block on H100 / H200
POINTER_TYPES = {"torch.float32": "*fp32", "torch.float16": "*bf16", "torch.bfloat16": "*bf16",
                 "torch.int32": "*i32", "torch.int64": "*i64"}


def record(path: str) -> None:
    """Phase 1, in the interpreter: run the ops and write the distinct launches to ``path``."""
    import torch
    import torch.nn.functional as F
    from triton.runtime import interpreter

    launches = {}
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args)) | {k: v for k, v in kwargs.items() if k in self.arg_names}
        kinds = {n: ("ptr", str(v.dtype)) if isinstance(v, torch.Tensor) else (type(v).__name__, v)
                 for n, v in bound.items()}
        entry = {"module": self.fn.__module__, "name": self.fn.__name__, "kinds": kinds,
                 "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}}
        launches[json.dumps(entry, sort_keys=True)] = entry
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    from moekit.ops import linear_attention as la

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
    with open(path, "w") as f:
        json.dump(list(launches.values()), f)


def signature(fn, kinds: dict) -> tuple[dict, dict]:
    """(signature, constexprs) for ``triton.compile`` from one recorded launch."""
    sig, consts = {}, {}
    for i, p in enumerate(fn.params):
        kind, value = kinds[p.name]
        if p.is_constexpr or value is None:
            sig[p.name], consts[(i,)] = "constexpr", value
        elif kind == "ptr":
            sig[p.name] = POINTER_TYPES[value]
        elif kind == "int":
            sig[p.name] = "i32" if abs(value) < 2**31 else "i64"
        elif kind == "float":
            sig[p.name] = "fp32"
        else:
            raise ValueError(f"{fn.__name__}: argument {p.name} of kind {kind} has no Triton type here")
    return sig, consts


def compile_all(path: str, arch: int) -> int:
    """Phase 2: compile every recorded launch for ``sm_<arch>``; returns the number of failures."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from triton.runtime.jit import JITFunction

    with open(path) as f:
        launches = json.load(f)
    seen, failed = set(), 0
    for launch in launches:
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        while not isinstance(fn, JITFunction):  # under autotune / heuristics wrappers
            fn = fn.fn
        sig, consts = signature(fn, launch["kinds"])
        key = (launch["name"], json.dumps(sig), repr(sorted(consts.items())))
        if key in seen:
            continue
        seen.add(key)
        options = {"num_warps": launch["options"].get("num_warps", 4),
                   "num_stages": launch["options"].get("num_stages", 3)}
        precision = launch["kinds"].get("PRECISION", (None, "-"))[1]
        label = f"{launch['name']:20s} PRECISION={precision:4s} {options}"
        try:
            kernel = compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 128),
                             options=options)
        except Exception as e:
            failed += 1
            print(f"FAIL {label} {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        shared = kernel.metadata.shared
        fits = arch != 90 or shared <= SM90_SHARED_BYTES
        failed += not fits
        print(f"{'OK  ' if fits else 'FAIL'} {label} shared {shared} B")
    print(f"{len(seen)} variants for sm_{arch}: {'ALL COMPILED' if not failed else f'{failed} FAILED'}")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--record", help=argparse.SUPPRESS)  # phase 1's output file (internal)
    args = parser.parse_args()
    if args.record:
        record(args.record)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, __file__, "--record", path], env=env, check=True)
        return 1 if compile_all(path, args.arch) else 0


if __name__ == "__main__":
    sys.exit(main())
