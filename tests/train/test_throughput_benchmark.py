"""``benchmarks/train_throughput.py``'s FLOP count, against hand counts: the MFU it prints (and the
README's) is only as right as these numbers. The A0.3B-2B models are built on the meta device."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moekit.models import ModelConfig, MoEForCausalLM

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"


def load_benchmark():
    name = "train_throughput_benchmark"
    if name not in sys.modules:
        sys.path.insert(0, str(SCRIPT.parent))  # the script imports kernel_profile from beside it
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


# linear-moe-a0.3b-2b: hidden 1024, 8 heads of 128, vocabulary 151936, 64 experts of ffn 896, top-8
HIDDEN, VOCAB, FFN, TOP_K, HEADS, HEAD_DIM = 1024, 151936, 896, 8, 8, 128
ATTENTION = 4 * HIDDEN * HIDDEN  # q, k, v, o
GLA = 5 * HIDDEN * HIDDEN + 2 * 16 * HIDDEN  # q, k, v, gate, o, and the rank-16 decay projection
MOE = 64 * HIDDEN + TOP_K * 3 * HIDDEN * FFN  # router, and top-k SwiGLU experts (up 2F, down F)


@pytest.mark.parametrize("pattern", ["LLLNLLLNLLLN", "N" * 12])
def test_flops_per_token_of_the_benchmarked_models(pattern):
    bench = load_benchmark()
    with torch.device("meta"):
        model = MoEForCausalLM(bench.model_config(pattern, 4096, "bf16", "auto"))
    n, linear = pattern.count("N"), pattern.count("L")
    active = n * ATTENTION + linear * GLA + 12 * MOE + VOCAB * HIDDEN  # the embedding lookup is no matmul
    assert bench.active_matmul_params(model) == active
    assert active == {"LLLNLLLNLLLN": 480_673_792, "NNNNNNNNNNNN": 470_941_696}[pattern]
    # causal attention: QK^T and PV over half the 4096 x 4096 scores; GLA in chunks of 64
    attention = n * 2 * 4096 * HEADS * HEAD_DIM
    chunked = linear * HEADS * (4 * HEAD_DIM * HEAD_DIM + 64 * 2 * HEAD_DIM)
    assert bench.forward_flops_per_token(model, 4096) == 2 * active + attention + chunked


def test_active_parameters_are_what_a_token_multiplies():
    """A forward's matmul FLOPs per token, counted by torch (reference MoE path: only routed rows
    meet an expert), are 2 x the active parameters: shared and dense FFNs, router, top-k of E."""
    bench = load_benchmark()
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=100, hidden_size=64, layer_pattern="NN", num_heads=2, num_kv_heads=2,
                         head_dim=32, max_seq_len=64, first_k_dense=1,
                         moe={"hidden_size": 64, "ffn_hidden_size": 48, "num_experts": 8, "top_k": 2,
                              "num_shared_experts": 1, "backend": "reference"})
    model = MoEForCausalLM(config)
    ids = torch.randint(0, 100, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(ids)  # logits only: the loss's fused head would add its gradient GEMMs
    matmul = sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if "mm" in str(op))
    assert matmul / ids.numel() == 2 * bench.active_matmul_params(model)
