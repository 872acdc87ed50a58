"""``benchmarks/parity.py``'s dispatcher drives a real MoE layer: it takes the layer's call as
``LocalDispatcher`` does (the signature once drifted and the GPU run failed at its first step) and
computes the routed experts from bf16 operands."""

import importlib.util
import sys
from pathlib import Path

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


def test_bf16_operands_dispatcher_in_a_layer():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(hidden_size=64, ffn_hidden_size=32, num_experts=4, top_k=2, num_shared_experts=1))
    x = torch.randn(2, 9, 64)
    want = layer(x)  # float32 operands through the default dispatcher
    layer.set_dispatcher(load_parity().Bf16OperandsDispatcher("reference", "bf16"))
    got = layer(x)
    assert got.dtype == x.dtype and got.shape == want.shape
    err = ((got - want).norm() / want.norm()).item()
    assert 1e-6 < err < 2e-2, err  # bf16 operands: close to, but not exactly, the float32 result
    got.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)
