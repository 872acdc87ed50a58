"""Training throughput and model FLOPs utilisation on one GPU (issue #10).

Models: the Linear-MoE A0.3B-2B configuration (``linear-moe-a0.3b-2b``: GLA hybrid ``LLLN`` x 3)
and its pure-softmax twin (all-``N``, otherwise identical; the parameter counts are printed:
a GLA layer has one more [hidden x hidden] projection than attention, 0.5% of the model).
Sequence length 4096, bf16 weights and activations, random tokens, one full training step
timed: forward, loss, backward and a fused AdamW step. Rows per model:

    bf16        backend "auto" everywhere (Triton MoE experts, Triton chunked GLA)
    fp8         MoE precision "fp8" (printed "n/a" with the reason while the MoE layer refuses it)
    reference   plain PyTorch: MoE backend "reference" (a loop over experts) and the linear
                ops' backend "reference"; softmax attention is SDPA in every row

FLOPs per token, counted as the model needs them (not as a kernel happens to run them); a
training step is 3x the forward (backward = 2x forward):

    forward = 2 * P_active                                      every matmul weight a token meets:
                                                                mixer projections, router, top_k of the
                                                                E routed experts (+ shared), lm_head
            + sum over N layers   2 * T * H * D                 causal attention, QK^T and PV over the
                                                                T x T lower triangle (4*T*H*D / 2)
            + sum over L layers   H * (4 * K * V + C * (K + V))  chunked linear attention (chunk C=64):
                                                                readout q S and state update k^T v
                                                                (2*K*V each), intra-chunk causal scores
                                                                and their values (C*K + C*V, half the
                                                                C x C block)

MFU = (FLOPs per token * tokens/s) / (bf16 8192^3 torch.matmul rate measured in this run).

    python benchmarks/train_throughput.py [--batch 4] [--steps 8] [--seq-len 4096] [--models hybrid softmax]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.models import ModelConfig, MoEForCausalLM
from moekit.moe.layer import MoE
from moekit.ops import linear_attention as la

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_profile import format_top, kernel_times  # noqa: E402

CONFIG = "linear-moe-a0.3b-2b"
LINEAR_CHUNK = 64  # the chunk size of the linear ops' chunked form (their default)
LINEAR_OPS = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "mamba2_ssd")


@dataclass
class Row:
    model: str
    path: str
    params: int
    tokens_per_s: float
    step_ms: float
    flops_per_token: float
    peak_gb: float


def model_config(pattern: str, seq_len: int, precision: str, moe_backend: str) -> ModelConfig:
    values = ModelConfig.from_name(CONFIG).to_dict()
    values.update(layer_pattern=pattern, max_seq_len=seq_len)
    values["moe"].update(precision=precision, backend=moe_backend)
    return ModelConfig.from_dict(values)


def active_matmul_params(model: MoEForCausalLM) -> int:
    """Weights one token multiplies with: every nn.Linear but the embedding lookup, the router,
    and top_k / E of the routed experts."""
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    for layer in model.modules():
        if isinstance(layer, MoE):
            cfg = layer.config
            routed = layer.experts.w_up.numel() + layer.experts.w_down.numel()
            total += layer.router.weight.numel() + routed * cfg.top_k // cfg.num_experts
    return total


def forward_flops_per_token(model: MoEForCausalLM, seq_len: int) -> float:
    """The docstring's formula."""
    cfg = model.config
    flops = 2.0 * active_matmul_params(model)
    for letter in cfg.layer_pattern:
        if letter == "N":
            flops += 2.0 * seq_len * cfg.num_heads * cfg.head_dim
        else:
            k, v = cfg.head_dim, cfg.head_dim * cfg.expand_v
            flops += cfg.num_heads * (4.0 * k * v + LINEAR_CHUNK * (k + v))
    return flops


@contextlib.contextmanager
def linear_ops_backend(backend: str):
    """Run every linear-attention op the mixers call on ``backend`` (the mixers take the ops'
    default "auto"; ModelConfig has no switch for it)."""
    saved = {name: getattr(la, name) for name in LINEAR_OPS}
    try:
        for name, fn in saved.items():
            setattr(la, name, functools.partial(fn, backend=backend))
        yield
    finally:
        for name, fn in saved.items():
            setattr(la, name, fn)


def gemm_rate(device) -> float:
    """bf16 FLOP/s of an 8192^3 torch.matmul: the MFU denominator."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * reps / (time.perf_counter() - t0)


def training_step(model: MoEForCausalLM, batch: int, seq_len: int, compile: bool = False):
    """One training step (forward + backward + AdamW) on fixed random tokens, as a callable;
    ``compile``: the forward through torch.compile, as ``moekit train``'s ``compile: true``."""
    device = model.embed_tokens.weight.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    forward = torch.compile(model) if compile else model

    def step():
        forward(ids, labels=ids, return_logits=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_training(step, warmup: int, steps: int) -> float:
    """Seconds per call of ``step``, averaged over ``steps`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def run_row(name: str, pattern: str, path: str, args) -> Row | str:
    """One table row, or the reason it could not run."""
    precision = "fp8" if path == "fp8" else "bf16"
    backend = "reference" if path == "reference" else "auto"
    try:
        config = model_config(pattern, args.seq_len, precision, backend)
        torch.manual_seed(0)
        with torch.device("cuda"):  # initialising 2.5B parameters on the host takes longer than the run
            model = MoEForCausalLM(config).to(torch.bfloat16).train()
    except (ValueError, NotImplementedError) as e:
        return f"n/a ({e})"
    slow = path == "reference"
    torch.cuda.reset_peak_memory_stats()
    try:
        with linear_ops_backend("reference") if slow else contextlib.nullcontext():
            step = training_step(model, args.batch, args.seq_len, args.compile and not slow)
            seconds = time_training(step, 1 if slow else 3, max(1, args.steps // 4) if slow else args.steps)
            if args.profile and not slow:
                print(f"# {name}, {path}: GPU time per training step by kernel\n" +
                      format_top(kernel_times(step, reps=2, name_width=60)), flush=True)
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    finally:
        peak = torch.cuda.max_memory_allocated() / 2**30
    return Row(name, path, model.num_parameters(), args.batch * args.seq_len / seconds, seconds * 1e3,
               3 * forward_flops_per_token(model, args.seq_len), peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (the reference path runs a quarter)")
    parser.add_argument("--models", nargs="+", default=["hybrid", "softmax"], choices=["hybrid", "softmax"])
    parser.add_argument("--profile", action="store_true", help="print each fast row's top kernels")
    parser.add_argument("--paths", nargs="+", default=["bf16", "fp8", "reference"],
                        choices=["bf16", "fp8", "reference"])
    parser.add_argument("--compile", action="store_true",
                        help="the bf16 and fp8 rows' forward through torch.compile (the reference stays eager)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_throughput.py needs a CUDA GPU")

    hybrid = ModelConfig.from_name(CONFIG).layer_pattern
    patterns = {"hybrid": hybrid, "softmax": "N" * len(hybrid)}
    peak = gemm_rate("cuda")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 8192^3 matmul "
          f"{peak / 1e12:.0f} TFLOP/s | {CONFIG}, seq {args.seq_len}, batch {args.batch}, AdamW step included"
          f"{', forward compiled' if args.compile else ''}")
    header = (f"{'model':22s} {'path':10s} {'params':>7s} {'tok/s':>9s} {'step ms':>8s} {'GFLOP/tok':>9s} "
              f"{'TFLOP/s':>8s} {'MFU':>6s} {'peak GB':>8s}")
    print(header, flush=True)
    for key in args.models:
        name = f"{key} {patterns[key] if len(set(patterns[key])) > 1 else 'all-N'}"[:22]
        rows: dict[str, Row] = {}
        for path in args.paths:
            result = run_row(name, patterns[key], path, args)
            gc.collect()
            torch.cuda.empty_cache()
            if not isinstance(result, Row):
                print(f"{name:22s} {path:10s} {result}", flush=True)
                continue
            rows[path] = result
            achieved = result.flops_per_token * result.tokens_per_s
            print(f"{name:22s} {path:10s} {result.params / 1e9:6.2f}B {result.tokens_per_s:9.0f} "
                  f"{result.step_ms:8.1f} {result.flops_per_token / 1e9:9.2f} {achieved / 1e12:8.0f} "
                  f"{achieved / peak:6.1%} {result.peak_gb:8.1f}", flush=True)
        if "reference" in rows:
            for path in ("bf16", "fp8"):
                if path in rows:
                    print(f"{name:22s} {path} speed-up over the reference path: "
                          f"{rows[path].tokens_per_s / rows['reference'].tokens_per_s:.2f}x")
        if "bf16" in rows and "fp8" in rows:
            print(f"{name:22s} fp8 / bf16 tokens/s: {rows['fp8'].tokens_per_s / rows['bf16'].tokens_per_s:.2f}x")


if __name__ == "__main__":
    main()
