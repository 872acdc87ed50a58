"""Expert-parallel training throughput: tokens/s per GPU at EP=1 and EP=2 (issue #9), and the
all-to-all volume per rank that the measured routing would cause at EP=4 and EP=8 (issue #12).

    torchrun --nproc-per-node 2 benchmarks/expert_parallel.py            # two H200s, NCCL
    torchrun --nproc-per-node 2 benchmarks/expert_parallel.py --smoke    # tiny shapes, CPU / gloo

The model is a residual stack of MoE layers with the olmoe expert shape (hidden 2048, expert
ffn 1024, 64 experts, top-8, SwiGLU; bf16 weights; 4096 tokens per GPU per step). Three runs:

* small (8 layers) at EP=1: each GPU holds all experts (data parallel, expert grads all-reduced);
* small at EP=2: each GPU holds 32 experts per layer, tokens travel by all-to-all;
* large at EP=2: as many layers as make the expert weights + gradients fill ``--expert-mem``
  (default 60%) of one GPU's memory; that model does not fit one GPU at EP=1.

Sizes on an H200 (about 150e9 bytes): a layer's 64 experts are 403M parameters; at EP=2 a GPU
holds 32 of them, 0.81 GB of bf16 weights + gradients, so the large stack has ~111 layers
(44.7B expert parameters, ~89 GB of expert weights + gradients per GPU; EP=1 would need ~179 GB).
The small stack's experts take 12.9 GB per GPU at EP=1 and 6.4 GB at EP=2. The script prints
the exact figures and the measured peak memory.

One step = forward + backward + gradient sync (no optimizer: its cost does not depend on EP).
Every block is activation-checkpointed (its forward, all-to-alls included, runs again in the
backward), so activations stay small next to the experts.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""

from __future__ import annotations

import os

# Set before NCCL starts: never use NVLink SHARP / multicast on the lent machines.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from moekit import MoE, MoEConfig  # noqa: E402
from moekit.parallel import ParallelConfig, build_mesh, init_distributed, shard_experts, sync_grads  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    ffn: int = 1024
    experts: int = 64
    top_k: int = 8
    tokens: int = 4096  # per GPU per step
    small_layers: int = 8

    def moe_config(self) -> MoEConfig:
        return MoEConfig(hidden_size=self.hidden, ffn_hidden_size=self.ffn, num_experts=self.experts,
                         top_k=self.top_k, activation="swiglu")

    def expert_bytes_per_layer(self, ep: int) -> int:
        """bf16 weights + bf16 gradients of one layer's experts on one rank."""
        return (self.experts // ep) * 3 * self.hidden * self.ffn * 2 * 2


SMOKE = Shape(hidden=64, ffn=32, experts=8, top_k=2, tokens=256, small_layers=2)


class Block(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden_size)
        self.moe = MoE(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.norm(x))


class Stack(nn.Module):
    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


def build_stack(shape: Shape, layers: int, pmesh, device: torch.device) -> Stack:
    """Build and shard one block at a time, so the full (unsharded) model never exists."""
    blocks = []
    with torch.device(device):
        for _ in range(layers):
            block = Block(shape.moe_config())
            shard_experts(block, pmesh)
            blocks.append(block.to(torch.bfloat16))
    return Stack(blocks)


def capture_routing(model: Stack) -> dict[int, torch.Tensor]:
    """Each layer's latest top-k indices, caught from the routers' outputs."""
    seen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        def hook(_module, _inputs, out, i=i):
            seen[i] = out.topk_idx.detach()
        block.moe.router.register_forward_hook(hook)
    return seen


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(shape: Shape, layers: int, ep: int, device: torch.device, steps: int, warmup: int) -> dict:
    pmesh = build_mesh(ParallelConfig(ep=ep, fsdp=False), device)
    torch.manual_seed(0)
    model = build_stack(shape, layers, pmesh, device)
    routing = capture_routing(model)
    gen = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    x = torch.randn(shape.tokens, shape.hidden, device=device, dtype=torch.bfloat16, generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compute, comm = [], []
    for step in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        synchronize(device)
        t0 = time.perf_counter()
        model(x).float().square().mean().backward()
        synchronize(device)
        t1 = time.perf_counter()
        sync_grads(model, pmesh)
        synchronize(device)
        t2 = time.perf_counter()
        if step >= warmup:
            compute.append(t1 - t0)
            comm.append(t2 - t1)
    step_s = _max_over_ranks(sorted(c + m for c, m in zip(compute, comm))[len(compute) // 2])
    result = {
        "layers": layers, "ep": ep,
        "fwd_bwd_ms": 1e3 * _max_over_ranks(sorted(compute)[len(compute) // 2]),
        "grad_sync_ms": 1e3 * _max_over_ranks(sorted(comm)[len(comm) // 2]),
        "tokens_per_s_gpu": shape.tokens / step_s,
        "expert_gb": layers * shape.expert_bytes_per_layer(ep) / 1e9,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan"),
        "routing": [routing[i].cpu() for i in sorted(routing)],
    }
    del model, x, routing
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def simulated_a2a_bytes(routing: list[torch.Tensor], shape: Shape, ep: int) -> tuple[float, float]:
    """Bytes one rank sends per step (dispatch + combine, forward + backward) if these tokens
    sat on a rank of an EP=``ep`` group: averaged over which expert slice the rank owns.

    Returns (per assignment: what moekit's dispatcher sends, per (token, destination rank):
    what a deduplicating dispatcher would send)."""
    per_rank = shape.experts // ep
    rows, dedup = 0.0, 0.0
    for idx in routing:
        dest = torch.where(idx >= 0, idx // per_rank, -1)
        for rank in range(ep):
            off = (dest >= 0) & (dest != rank)
            rows += off.sum().item() / ep
            # Column ep collects the assignments that stay (or were dropped).
            hit = torch.zeros(idx.shape[0], ep + 1, dtype=torch.bool)
            hit.scatter_(1, torch.where(off, dest, ep), True)
            dedup += hit[:, :ep].sum().item() / ep
    row_bytes = shape.hidden * 2  # bf16
    return 4 * rows * row_bytes, 4 * dedup * row_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on CPU / gloo")
    parser.add_argument("--expert-mem", type=float, default=0.6,
                        help="share of one GPU's memory the large model's experts (weights + grads) fill at EP=2")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    pmesh = init_distributed(ParallelConfig(ep=1, timeout_s=600))
    device, world = pmesh.device, pmesh.world_size
    if world != 2:
        raise SystemExit(f"run with torchrun --nproc-per-node 2 (got {world} processes)")
    shape = SMOKE if args.smoke else Shape()
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = 8 * shape.expert_bytes_per_layer(2) / args.expert_mem  # smoke: 8 layers
    large_layers = int(args.expert_mem * memory // shape.expert_bytes_per_layer(2))

    cases = [("small", shape.small_layers, 1), ("small", shape.small_layers, 2), ("large", large_layers, 2)]
    results = [(name, run_case(shape, layers, ep, device, args.steps, args.warmup)) for name, layers, ep in cases]

    if dist.get_rank() == 0:
        print_report(shape, results, memory, device)
    dist.destroy_process_group()


def print_report(shape: Shape, results: list, memory: float, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"\nexpert parallelism, 2 x {name}, torch {torch.__version__}")
    print(f"MoE stack: hidden {shape.hidden}, expert ffn {shape.ffn}, {shape.experts} experts, "
          f"top-{shape.top_k}, {shape.tokens} tokens/GPU/step, bf16; GPU memory {memory / 1e9:.0f} GB")
    head = f"{'model':<6} {'layers':>6} {'EP':>3} {'experts GB/GPU':>14} {'peak GB':>8} " \
           f"{'fwd+bwd ms':>10} {'grad sync ms':>12} {'tokens/s/GPU':>13}"
    print(head)
    print("-" * len(head))
    for label, r in results:
        print(f"{label:<6} {r['layers']:>6} {r['ep']:>3} {r['expert_gb']:>14.1f} {r['peak_gb']:>8.1f} "
              f"{r['fwd_bwd_ms']:>10.1f} {r['grad_sync_ms']:>12.1f} {r['tokens_per_s_gpu']:>13.0f}")
    large = results[-1][1]
    need = large["layers"] * shape.expert_bytes_per_layer(1) / 1e9
    print(f"large at EP=1 would need {need:.0f} GB of expert weights + grads per GPU: it does not fit.")
    ratio = results[1][1]["tokens_per_s_gpu"] / results[0][1]["tokens_per_s_gpu"]
    print(f"small model, EP=2 / EP=1 tokens/s per GPU: {ratio:.2f}x")

    routing = results[0][1]["routing"]  # the small EP=1 run: every rank's routing, all local
    layers = len(routing)
    print(f"\nall-to-all bytes per rank per step if this routing ran at EP=n ({layers} layers; "
          "dispatch + combine, forward + backward; rank 0's tokens)")
    print(f"{'EP':>3} {'per assignment GB':>18} {'deduplicated GB':>16} {'per layer MB':>13}")
    for ep in (2, 4, 8):
        if shape.experts % ep:
            continue
        rows, dedup = simulated_a2a_bytes(routing, shape, ep)
        print(f"{ep:>3} {rows / 1e9:>18.3f} {dedup / 1e9:>16.3f} {rows / layers / 1e6:>13.1f}")


if __name__ == "__main__":
    main()
