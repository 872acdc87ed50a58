"""``benchmarks/expert_parallel.py --smoke`` under torchrun with 4 gloo processes on the CPU: the
table has a row per EP size (EP x DP = 4), with finite numbers, and the all-to-all bytes match
what the dispatcher must send for the smoke shape."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "expert_parallel.py"
COLUMNS = ["model", "layers", "GPUs", "EP", "DP", "weights GB/GPU", "peak GB", "fwd+bwd ms", "grad sync ms",
           "a2a ms", "a2a GB/GPU", "load rank", "load expert", "tokens/s/GPU", "vs 1 GPU"]


def load_benchmark():
    name = "expert_parallel_benchmark"
    if name not in sys.modules:  # dataclasses look their module up in sys.modules
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def parse_table(stdout: str) -> list[dict]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model ")) + 2  # header, rule
    rows = []
    for line in lines[start:]:
        fields = line.split()
        if not fields or fields[0] not in ("small", "large"):
            break
        assert len(fields) == len(COLUMNS), line
        rows.append({c: (f if c in ("model", "peak GB", "vs 1 GPU") else float(f)) for c, f in zip(COLUMNS, fields)})
    return rows


@pytest.fixture(scope="module")
def smoke(torchrun):
    cmd = torchrun(4, [str(SCRIPT), "--smoke", "--layer", "deepseek-v3", "--steps", "2", "--warmup", "1"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_smoke_table_has_a_row_per_ep_size(smoke):
    rows = parse_table(smoke)
    small = [r for r in rows if r["model"] == "small"]
    assert [(r["EP"], r["DP"], r["GPUs"]) for r in small] == [(1, 4, 4), (2, 2, 4), (4, 1, 4)]
    for r in rows:
        for column in ("weights GB/GPU", "fwd+bwd ms", "grad sync ms", "tokens/s/GPU"):
            assert math.isfinite(r[column]) and r[column] > 0, (column, r)
        assert 1.0 <= r["load rank"] <= r["load expert"] < 3.0, r
        communicates = r["EP"] > 1
        assert (r["a2a ms"] > 0) == communicates and (r["a2a GB/GPU"] > 0) == communicates, r
    assert small[0]["load rank"] == 1.0  # EP=1: one rank holds every expert
    # Expert slices halve with EP (plus the replicated shared expert and router).
    assert small[0]["weights GB/GPU"] > small[1]["weights GB/GPU"] > small[2]["weights GB/GPU"]
    large = [r for r in rows if r["model"] == "large"]
    assert large and all(r["EP"] > 1 and r["layers"] > small[0]["layers"] for r in large)
    assert "weak scaling, small model, EP=4 x DP=1 on 4 GPU(s) vs 1 GPU:" in smoke
    assert "more than --expert-mem allows" in smoke
    assert re.search(rf"small \({small[0]['layers']:.0f} layers\) at EP=1: [0-9.e-]+ GB of weights \+ grads, "
                     r"[0-9]+% of one GPU's memory", smoke)


def test_smoke_all_to_all_bytes_match_the_routing(smoke):
    """The recorded bytes match the dispatcher's model (``simulated_a2a_bytes``, default padded
    mode): every rank sends T rows to each other rank, hidden rows five times per layer and step
    (dispatch + combine in the forward and the backward, the dispatch again in the recompute), the
    routing row three times."""
    bench = load_benchmark()
    shape = bench.SMOKE["deepseek-v3"]
    for r in parse_table(smoke):
        if r["EP"] == 1:
            continue
        expected = bench.simulated_a2a_bytes(shape, int(r["layers"]), int(r["EP"]))
        assert r["a2a GB/GPU"] * 1e9 == pytest.approx(expected, rel=0.05), r


def test_layouts_cover_every_ep_size_that_divides_the_world():
    bench = load_benchmark()
    Layout = bench.Layout
    assert bench.layouts(8, 64, None, None) == [Layout(1, 8), Layout(2, 4), Layout(4, 2), Layout(8, 1)]
    assert bench.layouts(6, 64, None, None) == [Layout(1, 6), Layout(2, 3)]  # 3 and 6 do not divide 64
    assert bench.layouts(8, 64, "1,2,4,8", "1") == [Layout(1, 1), Layout(2, 1), Layout(4, 1), Layout(8, 1)]
    assert bench.layouts(4, 64, "1,4", "1,2") == [Layout(1, 1), Layout(1, 2), Layout(4, 1)]  # 4 x 2 > 4 GPUs


@pytest.mark.parametrize("ep, dp, message", [
    ("3", None, "do not divide the 64 experts"),
    ("8", None, "do not divide the 4 processes"),
    ("2,x", None, "comma-separated list of integers"),
    ("0", None, "positive integers"),
    ("8", "2", "no EP x DP layout"),
])
def test_layouts_reject_bad_sizes(ep, dp, message):
    with pytest.raises(SystemExit, match=message):
        load_benchmark().layouts(4, 64, ep, dp)
