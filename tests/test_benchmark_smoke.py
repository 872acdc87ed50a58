"""The GPU benchmarks must not fail on their first lines at the next GPU session: every
``python3 benchmarks/X.py ARGS`` in ``benchmarks/gpu_session.sh``'s steps parses its arguments,
and the models / layers the scripts build at their default shapes pass today's config validation
(built on the meta device: no memory, no kernels)."""

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.models import MoEForCausalLM

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SESSION = BENCHMARKS / "gpu_session.sh"
NO_ARGPARSE = {"fp8_gemm"}  # takes no arguments


def benchmark(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the scripts import their neighbours
    return importlib.import_module(name)


def session_commands() -> list[tuple[str, list[str]]]:
    """(script, its arguments) of every benchmark command in the session's steps, shell variables
    replaced by plausible values."""
    text = SESSION.read_text().replace("\\\n", " ")
    text = text.replace('"${1#parity_}"', "bf16").replace("$s", "num_warps=8,num_stages=2,BV=128")
    text = re.sub(r'"\$LOGS/[^"]*"', "/tmp/out", text)
    found = set()
    for match in re.finditer(r"benchmarks/(\w+)\.py([^;'|]*)", text):
        args = re.sub(r"\s*2>&1.*", "", match.group(2)).strip()
        found.add((match.group(1), args))
    return sorted((script, shlex.split(args)) for script, args in found)


class Parsed(Exception):
    pass


@pytest.mark.parametrize("script, args", session_commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_session_step_arguments_parse(script, args, monkeypatch):
    if script in NO_ARGPARSE:
        assert not args
        return
    module = benchmark(script)
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        raise Parsed(parse(self, *a, **k))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    with pytest.raises(Parsed):
        module.main()


def test_moe_layer_shapes_build():
    """moe_layer.py / moe_fp8.py / moe_decode.py: one MoE per shape, bf16 (the FP8 rows need
    128-wide blocks)."""
    for s in benchmark("moe_decode").DECODE_SHAPES:
        for precision in ("bf16", "fp8", "mxfp8"):
            cfg = MoEConfig(hidden_size=s.hidden, ffn_hidden_size=s.ffn, num_experts=s.experts, top_k=s.top_k,
                            precision=precision)
            with torch.device("meta"):
                layer = MoE(cfg).to(torch.bfloat16)
            assert layer.experts.w_up.shape == (s.experts, 2 * s.ffn, s.hidden)


def test_expert_parallel_layer_shapes_build():
    bench = benchmark("expert_parallel")
    for shape in (*bench.LAYERS.values(), *bench.SMOKE.values()):
        with torch.device("meta"):
            block = bench.Block(shape.moe_config())
        assert block.moe.experts.w_up.shape[0] == shape.experts


def test_generation_models_build():
    gen = benchmark("generation")
    meta = gen.Device("meta")
    for pattern in gen.patterns("linear-moe-a0.3b-2b").values():
        model = gen.build_model("linear-moe-a0.3b-2b", pattern, 65536 + 64, meta)
        assert not model.training and 2.4e9 < model.num_parameters() < 2.5e9


def test_train_throughput_models_build():
    bench = benchmark("train_throughput")
    for pattern in ("LLLNLLLNLLLN", "N" * 12):
        for precision, backend in (("bf16", "auto"), ("fp8", "auto"), ("bf16", "reference")):
            with torch.device("meta"):
                model = MoEForCausalLM(bench.model_config(pattern, 4096, precision, backend))
            assert model.config.max_seq_len == 4096


def test_parity_model_builds():
    with torch.device("meta"):
        model = MoEForCausalLM(benchmark("parity").model_config())
    assert 1.5e8 < model.num_parameters() < 1.8e8
