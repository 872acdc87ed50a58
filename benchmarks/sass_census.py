"""Count a compiled Triton kernel's SASS instructions by kind, without a GPU.

The cubin Triton builds for sm_<arch> is disassembled with the nvdisasm bundled with Triton
(backends/nvidia/bin). For a kernel without loops (one tile per program) the static count is
what every thread executes, so dividing by the elements a thread handles gives the issue cost
per element: the number to hold against what an SM can issue (about 4 warp-instructions per
clock, one per SM sub-partition) in the time a memory-bound kernel should take.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter

# Opcode (before the first dot) -> kind. Anything not listed counts as "int/other" if it runs on
# the vector pipes, or "control" below.
KINDS = {
    "LDG": "LDG", "STG": "STG", "LDS": "LDS", "LDSM": "LDS", "STS": "STS", "STSM": "STS",
    "SHFL": "SHFL", "BAR": "BAR",
    "F2FP": "cvt", "F2F": "cvt", "I2F": "cvt", "F2I": "cvt", "I2FP": "cvt", "F2IP": "cvt",
    "FMUL": "fp", "FADD": "fp", "FFMA": "fp", "FMNMX": "fp", "FSEL": "fp", "FSETP": "fp",
    "HMUL2": "fp", "HADD2": "fp", "HFMA2": "fp", "HMNMX2": "fp",
    "VIMNMX": "max", "VIMNMX3": "max", "IMNMX": "max", "VHMNMX": "max",
    "PRMT": "pack", "SEL": "select", "ISETP": "cmp",
}
# Scheduling and setup instructions that do no per-element work (uniform datapath, constants).
CONTROL = {"NOP", "EXIT", "BRA", "S2R", "S2UR", "CS2R", "LDC", "ULDC", "UMOV", "ULEA", "UIADD3", "ULOP3",
           "USHF", "UIMAD", "R2UR", "BSSY", "BSYNC", "WARPSYNC", "ELECT", "UISETP", "USEL", "UPRMT", "VOTEU",
           "MEMBAR", "ERRBAR", "CCTL", "DEPBAR"}
ORDER = ["LDG", "STG", "LDS", "STS", "SHFL", "BAR", "cvt", "fp", "max", "pack", "select", "cmp", "int", "control"]

_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def nvdisasm_path() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no nvdisasm bundled with Triton at {path}")
    return path


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([nvdisasm_path(), "-c", path], capture_output=True, text=True, check=True).stdout


def opcodes(sass: str) -> list[str]:
    """Opcodes (without modifiers) in program order, up to the last EXIT (the BRA-to-self after it
    is padding)."""
    ops = [m.group(1) for line in sass.splitlines() if (m := _LINE.match(line))]
    last_exit = max((i for i, op in enumerate(ops) if op == "EXIT"), default=len(ops) - 1)
    return ops[:last_exit + 1]


def kind(op: str) -> str:
    if op in KINDS:
        return KINDS[op]
    return "control" if op in CONTROL or op.startswith("U") else "int"


def census(cubin: bytes) -> tuple[Counter, bool]:
    """Instructions per kind, and whether the code has a backward branch (a loop: then the static
    count is not what a thread executes)."""
    sass = disassemble(cubin)
    return Counter(kind(op) for op in opcodes(sass)), _has_loop(sass)


def _has_loop(sass: str) -> bool:
    """A branch to a label placed at or before it, other than the trailing BRA-to-self."""
    labels, position = {}, 0
    branches = []
    for line in sass.splitlines():
        if (m := re.match(r"^(\.L_x_\d+):", line)):
            labels[m.group(1)] = position
        elif (m := _LINE.match(line)):
            position += 1
            if m.group(1) == "BRA" and (t := re.search(r"(\.L_x_\d+)", line)):
                branches.append((position, t.group(1)))
    ops = opcodes(sass)
    return any(labels.get(target, 1 << 30) < at <= len(ops) for at, target in branches)


def per_element(counts: Counter, elements_per_thread: int) -> dict[str, float]:
    """Thread-instructions per element, by kind and in total (control included in the total)."""
    out = {k: counts.get(k, 0) / elements_per_thread for k in ORDER}
    out["total"] = sum(counts.values()) / elements_per_thread
    return out


def issue_budget(elements: int, seconds: float, sms: int = 132, clock_hz: float = 1.98e9,
                 warp_issue_per_clock: int = 4) -> float:
    """Thread-instructions per element an SM array can issue in `seconds` (32 threads a warp)."""
    return sms * warp_issue_per_clock * clock_hz * seconds * 32 / elements


def format_row(label: str, rates: dict[str, float], budget: float, label_width: int = 34) -> str:
    cols = " ".join(f"{rates[k]:5.2f}" for k in ORDER)
    return f"  {label:{label_width}s} {cols} {rates['total']:6.2f} {100 * rates['total'] / budget:5.1f}%"


def header(label_width: int = 34) -> str:
    return "  " + " " * label_width + " " + " ".join(f"{k[:5]:>5s}" for k in ORDER) + "  total budget"
