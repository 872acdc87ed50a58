"""``benchmarks/parity.py``'s dispatcher drives a real MoE layer: it takes the layer's call as
``LocalDispatcher`` does (the signature once drifted and the GPU run failed at its first step) and
computes the routed experts from bf16 operands."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from moekit import MoE, MoEConfig

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "parity.py"


def load_parity():
    name = "parity_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.mark.parametrize("run", ["bf16-gmm", "bf16"])
def test_bf16_operands_dispatcher_in_a_layer(run):
    torch.manual_seed(0)
    layer = MoE(MoEConfig(hidden_size=64, ffn_hidden_size=32, num_experts=4, top_k=2, num_shared_experts=1))
    x = torch.randn(2, 9, 64)
    want = layer(x)  # float32 operands through the default dispatcher
    backend, precision = load_parity().RUNS[run]
    # the Triton kernels' CPU stand-in is the reference path (bf16 dots are wrong in the interpreter)
    backend = "reference" if backend == "triton" else backend
    layer.set_dispatcher(load_parity().Bf16OperandsDispatcher(backend, precision))
    got = layer(x)
    assert got.dtype == x.dtype and got.shape == want.shape
    err = ((got - want).norm() / want.norm()).item()
    assert 1e-6 < err < 2e-2, err  # bf16 operands: close to, but not exactly, the float32 result
    got.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)


def test_summary_gaps_per_seed_and_their_mean(tmp_path, capsys):
    import json

    parity = load_parity()
    steps = 40  # the smoothed loss is the mean of the last 10 %: the last 4 steps
    rng = torch.Generator().manual_seed(3)
    finals = {(0, "bf16"): 2.0, (0, "fp8"): 2.02, (1, "bf16"): 1.6, (1, "fp8"): 1.6 * 0.99}
    for (seed, p), final in finals.items():
        head = (3.0 + torch.rand(steps - 4, generator=rng)).tolist()
        loss = head + [final - 0.01, final + 0.01, final - 0.02, final + 0.02]
        run = {"precision": p, "seed": seed, "params": 170e6, "steps": steps, "loss": loss,
               "val_loss": final + 0.5, "seconds": 1.0}
        (tmp_path / f"loss-{p}-seed{seed}.json").write_text(json.dumps(run))
    parity.summary(tmp_path)
    out = capsys.readouterr().out
    assert "+1.00%" in out and "-1.00%" in out  # seed 0: 2.02 vs 2.0; seed 1: 0.99x
    assert "mean gap to bf16 over 2 seed(s): training +0.00%" in out
    val_gaps = (100 * 0.02 / 2.5, 100 * (1.6 * 0.99 - 1.6) / 2.1)
    assert f"held-out {sum(val_gaps) / 2:+.2f}%" in out
    assert (tmp_path / "parity.png").stat().st_size > 10_000
