"""Expert-parallel weak scaling on N GPUs (issues #9, #12): tokens/s per GPU, all-to-all time and
bytes per step, and expert load imbalance across ranks, for every EP x DP layout of the GPUs.

    torchrun --standalone --nproc-per-node 8 benchmarks/expert_parallel.py                  # olmoe, EP 1/2/4/8
    torchrun --standalone --nproc-per-node 8 benchmarks/expert_parallel.py --layer deepseek-v3
    torchrun --standalone --nproc-per-node 8 benchmarks/expert_parallel.py --ep-sizes 1,2,4,8 --dp 1
    torchrun --standalone --nproc-per-node 2 benchmarks/expert_parallel.py --dispatch exact  # synced, fewer bytes
    torchrun --standalone --nproc-per-node 4 benchmarks/expert_parallel.py --smoke          # CPU / gloo

Layouts: by default every EP size e that divides N (and the expert count) runs on all N ranks
as EP=e x DP=N/e (e.g. 8 GPUs as EP=4 x DP=2). ``--dp 1,2`` instead runs EP=e x DP=d on the
first e*d ranks for every listed pair that fits (``--dp 1``: pure EP on 1, 2, 4, 8 GPUs, the
other ranks idle). Tokens per GPU are fixed (weak scaling).

Models: a residual stack of MoE blocks (RMSNorm + MoE, bf16, SwiGLU), one of two layer shapes:

* olmoe: hidden 2048, expert ffn 1024, 64 experts, top-8, softmax; 4096 tokens/GPU/step;
* deepseek-v3: hidden 7168, expert ffn 2048, 256 routed experts + 1 shared, top-8 of 8 groups
  (4 groups per token), sigmoid scores, route scale 2.5; 8192 tokens/GPU/step. One layer's
  routed experts are 11.3B parameters, 45 GB of bf16 weights + gradients.

Two stacks per layer shape: "small" fits one GPU at EP=1 (olmoe: 8 layers; deepseek-v3: as
many layers as fit, 1 on an H200 at the default ``--expert-mem``; ``--small-layers`` deepens it up
to that share, e.g. ``--expert-mem 0.65 --small-layers 60``: experts filling 64% of an H200) and
runs in every layout: its EP=N / 1-GPU ratio is the weak-scaling acceptance (targets >= 0.85 on
2 GPUs, #9; >= 0.80 on 8, #12). "large" has as
many layers as make the weights + gradients fill ``--expert-mem`` of one GPU at the smallest EP
size above 1, so at EP=1 it exceeds that share; it runs in every layout with EP > 1 (on an H200 with
EP=2 in the plan: olmoe 112 layers, deepseek-v3 3).

One step = forward + backward + gradient sync (no optimizer: its cost does not depend on EP).
Every block is activation-checkpointed (its forward, all-to-alls included, runs again in the
backward, up to the last tensor the backward needs), so activations stay small next to the
experts. Per layout the script reports:

* fwd+bwd and grad-sync ms (median over steps, slowest rank); tokens/s per GPU from their sum;
  "vs 1 GPU" divides by the EP=1 forward + backward throughput, which involves no communication
  and so is what one lone GPU does;
* all-to-all ms per step: one extra step records every all_to_all_single the dispatcher makes
  (split sizes, row shape, dtype; the recompute and the backward included), then the same
  collectives are replayed alone, each after a barrier (median over ``--steps`` replays, slowest
  rank). That is the transfer time without overlap or waiting for a slower peer;
* all-to-all GB per GPU per step: bytes a rank sends to other ranks, from the recorded split
  sizes (mean over ranks); ``simulated_a2a_bytes`` models it. The default ``--dispatch padded``
  (no host sync) sends every rank its whole token block: T rows per rank pair, whatever the
  routing. ``--dispatch exact`` sends a token once to each rank holding at least one of its
  experts (fewer bytes at large EP) but reads the split sizes on the host in every layer pass;
* load max/mean: per layer, the tokens each EP rank's expert slice receives from its whole EP
  group, max over mean (mean over layers, worst group); the same per expert. Inputs are random
  and the routers freshly initialized, so loads are close to uniform: a trained router is worse.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""

from __future__ import annotations

import os

# Set before NCCL starts: never use NVLink SHARP / multicast on the lent machines.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import DeviceMesh  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from moekit import MoE, MoEConfig  # noqa: E402
from moekit.moe.router import Router  # noqa: E402
from moekit.parallel import ParallelConfig, ParallelMesh, init_distributed, moe_layers, shard_experts, sync_grads  # noqa: E402,E501

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_profile import format_top, kernel_times  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """One MoE layer shape and the benchmark's batch."""

    hidden: int
    ffn: int
    experts: int
    top_k: int
    tokens: int  # per GPU per step
    small_layers: int  # the small stack's depth, unless fewer layers fit one GPU at EP=1
    shared: int = 0
    score_func: str = "softmax"
    groups: int = 1
    topk_groups: int = 1
    route_scale: float = 1.0

    def moe_config(self) -> MoEConfig:
        return MoEConfig(hidden_size=self.hidden, ffn_hidden_size=self.ffn, num_experts=self.experts,
                         top_k=self.top_k, num_shared_experts=self.shared, score_func=self.score_func,
                         num_groups=self.groups, topk_groups=self.topk_groups, route_scale=self.route_scale,
                         activation="swiglu")

    def layer_bytes(self, ep: int) -> int:
        """bf16 weights + gradients of one layer on one rank: its expert slice, the shared
        experts and the router (the norm is negligible)."""
        experts = self.experts // ep + self.shared
        return (experts * 3 * self.hidden * self.ffn + self.experts * self.hidden) * 2 * 2


LAYERS = {
    "olmoe": Shape(hidden=2048, ffn=1024, experts=64, top_k=8, tokens=4096, small_layers=8),
    "deepseek-v3": Shape(hidden=7168, ffn=2048, experts=256, top_k=8, tokens=8192, small_layers=8, shared=1,
                         score_func="sigmoid", groups=8, topk_groups=4, route_scale=2.5),
}
SMOKE = {
    "olmoe": Shape(hidden=64, ffn=32, experts=8, top_k=2, tokens=256, small_layers=2),
    "deepseek-v3": Shape(hidden=64, ffn=32, experts=16, top_k=4, tokens=256, small_layers=2, shared=1,
                         score_func="sigmoid", groups=4, topk_groups=2, route_scale=2.5),
}
DISPATCH_MODES = {"padded": True, "exact": False}  # --dispatch -> AllToAllDispatcher's pad_to_tokens
SMOKE_EP1_LAYERS = 4  # smoke: pretend one "GPU" holds this many layers at EP=1


@dataclass(frozen=True)
class Layout:
    ep: int
    dp: int

    @property
    def gpus(self) -> int:
        return self.ep * self.dp


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


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_stack(shape: Shape, layers: int, pmesh: ParallelMesh, pad_to_tokens: bool) -> Stack:
    """Build in bf16 and shard one block at a time, so the full (unsharded) model never exists."""
    blocks = []
    with torch.device(pmesh.device), default_dtype(torch.bfloat16):
        for _ in range(layers):
            block = Block(shape.moe_config())
            shard_experts(block, pmesh, pad_to_tokens)
            blocks.append(block)
    return Stack(blocks)


def layout_mesh(layout: Layout, device: torch.device) -> ParallelMesh | None:
    """The [dp, ep] mesh on ranks 0 .. gpus-1; every rank must call it (it creates the process
    groups). None on the ranks left out."""
    ranks = torch.arange(layout.gpus)
    mesh = DeviceMesh(device.type, ranks.view(layout.dp, layout.ep), mesh_dim_names=("dp", "ep"))
    world = DeviceMesh(device.type, ranks, mesh_dim_names=("world",))
    return ParallelMesh(mesh, world, device) if dist.get_rank() < layout.gpus else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class AllToAllCall:
    """One recorded collective over rows: ``kind`` all_to_all (padded / exact dispatch),
    all_gather or reduce_scatter (padded dispatch and its backward)."""

    kind: str
    group: dist.ProcessGroup
    output_splits: list[int] | None  # all_to_all only; None: equal splits
    input_splits: list[int] | None
    in_rows: int
    out_rows: int
    row_shape: tuple[int, ...]
    dtype: torch.dtype

    def bytes_sent_off_rank(self) -> int:
        size = dist.get_world_size(self.group)
        row_bytes = torch.Size(self.row_shape).numel() * torch.empty((), dtype=self.dtype).element_size()
        if self.kind == "all_gather":  # this rank's rows, to every other rank
            return (size - 1) * self.in_rows * row_bytes
        if self.kind == "reduce_scatter":  # every other rank's block of this rank's rows
            return (size - 1) * self.out_rows * row_bytes
        splits = self.input_splits or [self.in_rows // size] * size
        return (sum(splits) - splits[dist.get_rank(self.group)]) * row_bytes


@dataclass
class AllToAllLog:
    calls: list[AllToAllCall] = field(default_factory=list)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Log every ``dist.all_to_all_single``, ``all_gather_into_tensor`` and
        ``reduce_scatter_tensor`` (moekit.parallel.comm calls them through the module
        attributes, the backward's included) without changing what they do."""
        originals = {name: getattr(dist, name) for name in _RECORDED}

        def recorder(name: str):
            def recorded(output, input, *args, group=None, async_op=False, **kwargs):
                splits = [_as_list(s) for s in args[:2]] if name == "all_to_all_single" else [None, None]
                self.calls.append(AllToAllCall(_RECORDED[name], group, *splits, input.shape[0], output.shape[0],
                                               tuple(input.shape[1:]), input.dtype))
                return originals[name](output, input, *args, group=group, async_op=async_op, **kwargs)
            return recorded

        for name in _RECORDED:
            setattr(dist, name, recorder(name))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def replay_seconds(self, device: torch.device) -> float:
        """The recorded collectives again, alone: each one after a barrier of its group."""
        total = 0.0
        for call in self.calls:
            src = torch.empty((call.in_rows, *call.row_shape), dtype=call.dtype, device=device)
            dst = torch.empty((call.out_rows, *call.row_shape), dtype=call.dtype, device=device)
            dist.barrier(group=call.group)
            synchronize(device)
            t0 = time.perf_counter()
            if call.kind == "all_gather":
                dist.all_gather_into_tensor(dst, src, group=call.group)
            elif call.kind == "reduce_scatter":
                dist.reduce_scatter_tensor(dst, src, group=call.group)
            else:
                dist.all_to_all_single(dst, src, call.output_splits, call.input_splits, group=call.group)
            synchronize(device)
            total += time.perf_counter() - t0
        return total


# torch.distributed function -> the kind it is recorded as
_RECORDED = {"all_to_all_single": "all_to_all", "all_gather_into_tensor": "all_gather",
             "reduce_scatter_tensor": "reduce_scatter"}


def simulated_a2a_bytes(shape: Shape, layers: int, ep: int, pad_to_tokens: bool = True, tokens: int = 4096,
                        seed: int = 0) -> float:
    """Bytes one rank sends to other ranks per step, modelling the dispatcher: per row sent to
    another rank a bf16 hidden row crosses in the forward's dispatch and combine, in its
    recompute and in the backward's two, and a float32 routing row ([K] gate weights + [K]
    expert ids) three times (forward, recompute, backward).

    Padded (``pad_to_tokens``): T rows to each of the ep - 1 other ranks (all-gathers out,
    reduce-scatters back, the other way round in the backward); the recompute stops
    before the combine (non-reentrant checkpointing stops once every tensor the backward saved
    is back, and nothing after the combine saves one), so hidden rows cross five times. Exact: a
    row per (token, other rank that holds one of its experts), predicted by routing ``tokens``
    random rows through a fresh router (what the benchmark feeds its fresh stacks); its
    index_add after the combine saves the token index, so six crossings; plus per layer and
    forward [ep] int64 row counts."""
    routing = 3 * 2 * shape.top_k * 4
    if pad_to_tokens:
        return layers * (ep - 1) * shape.tokens * (5 * shape.hidden * 2 + routing)
    gen = torch.Generator().manual_seed(seed)
    router = Router(shape.moe_config())
    with torch.no_grad():
        router.weight.normal_(0.0, router.config.init_std, generator=gen)
        idx = router(torch.randn(tokens, shape.hidden, generator=gen)).topk_idx
    ranks_hit = torch.zeros(tokens, ep).scatter_(1, idx // (shape.experts // ep), 1.0).sum(1)
    rows = ranks_hit.mean().item() * (1 - 1 / ep) * shape.tokens  # a token's own rank is 1 of ep
    return layers * (rows * (6 * shape.hidden * 2 + routing) + 2 * (ep - 1) * 8)


def _as_list(splits) -> list[int] | None:
    return None if splits is None else [int(s) for s in splits]


def load_imbalance(model: Stack, pmesh: ParallelMesh) -> tuple[float, float]:
    """(per EP rank, per expert) max/mean of the latest forward's load over the EP group,
    averaged over layers."""
    counts = torch.stack([layer.last_stats.tokens_per_expert.float() for layer in moe_layers(model)])
    dist.all_reduce(counts, group=pmesh.ep_group)
    per_rank = counts.view(counts.shape[0], pmesh.ep_size, -1).sum(-1)

    def imbalance(load: torch.Tensor) -> float:
        return (load.amax(-1) / load.mean(-1)).mean().item()

    return imbalance(per_rank), imbalance(counts)


def train_step(model: Stack, x: torch.Tensor, pmesh: ParallelMesh) -> tuple[float, float]:
    """Seconds of (forward + backward, gradient sync)."""
    model.zero_grad(set_to_none=True)
    synchronize(pmesh.device)
    t0 = time.perf_counter()
    model(x).float().square().mean().backward()
    synchronize(pmesh.device)
    t1 = time.perf_counter()
    sync_grads(model, pmesh)
    synchronize(pmesh.device)
    return t1 - t0, time.perf_counter() - t1


def measure(shape: Shape, layers: int, pmesh: ParallelMesh, steps: int, warmup: int,
            pad_to_tokens: bool, profile: bool = False) -> dict[str, float | None]:
    """One rank's measurements of one stack in one layout."""
    device = pmesh.device
    torch.manual_seed(0)  # shard_experts needs the same full weights on every rank
    model = build_stack(shape, layers, pmesh, pad_to_tokens)
    gen = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    x = torch.randn(shape.tokens, shape.hidden, device=device, dtype=torch.bfloat16, generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    timed = [train_step(model, x, pmesh) for _ in range(warmup + steps)][warmup:]
    if profile and device.type == "cuda":  # every rank steps (collectives); the first one prints
        times = kernel_times(functools.partial(train_step, model, x, pmesh), reps=2)
        if dist.get_rank() == 0:
            print(f"# {layers} layers, EP={pmesh.ep_size}: GPU time per step by kernel (rank 0)\n"
                  + format_top(times), flush=True)
    log = AllToAllLog()
    with log.recording():
        train_step(model, x, pmesh)
    rank_load, expert_load = load_imbalance(model, pmesh)
    result = {
        "fwd_bwd_s": statistics.median(c for c, _ in timed),
        "grad_sync_s": statistics.median(s for _, s in timed),
        "step_s": statistics.median(c + s for c, s in timed),
        "a2a_s": statistics.median(log.replay_seconds(device) for _ in range(steps)) if log.calls else 0.0,
        "a2a_bytes": float(sum(call.bytes_sent_off_rank() for call in log.calls)),
        "rank_load": rank_load,
        "expert_load": expert_load,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }
    del model, x, log
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


@dataclass
class Row:
    model: str
    layers: int
    layout: Layout
    weights_gb: float  # weights + gradients per GPU
    fwd_bwd_ms: float
    grad_sync_ms: float
    a2a_ms: float
    a2a_gb: float
    rank_load: float
    expert_load: float
    peak_gb: float | None  # None on CPU
    tokens_per_s_gpu: float


def run_case(shape: Shape, model: str, layers: int, layout: Layout, device: torch.device,
             steps: int, warmup: int, pad_to_tokens: bool, profile: bool = False) -> Row:
    """Every rank calls this; the ranks outside the layout wait. Returns the slowest rank's
    times, the mean bytes and the worst group's load."""
    pmesh = layout_mesh(layout, device)
    mine = measure(shape, layers, pmesh, steps, warmup, pad_to_tokens, profile) if pmesh is not None else None
    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    ranks = [r for r in everyone if r is not None]

    def worst(key: str) -> float:
        return max(r[key] for r in ranks)

    return Row(model, layers, layout, layers * shape.layer_bytes(layout.ep) / 1e9,
               1e3 * worst("fwd_bwd_s"), 1e3 * worst("grad_sync_s"), 1e3 * worst("a2a_s"),
               statistics.mean(r["a2a_bytes"] for r in ranks) / 1e9, worst("rank_load"), worst("expert_load"),
               None if ranks[0]["peak_gb"] is None else worst("peak_gb"), shape.tokens / worst("step_s"))


def parse_sizes(text: str, what: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise SystemExit(f"{what}: expected a comma-separated list of integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"{what}: expected positive integers, got {text!r}")
    return sizes


def layouts(world: int, experts: int, ep_arg: str | None, dp_arg: str | None) -> list[Layout]:
    """Default: EP = every divisor of the world size that divides the expert count, DP = the rest."""
    if ep_arg is None:
        ep_sizes = [e for e in range(1, world + 1) if world % e == 0 and experts % e == 0]
    else:
        ep_sizes = parse_sizes(ep_arg, "--ep-sizes")
        bad = [e for e in ep_sizes if experts % e]
        if bad:
            raise SystemExit(f"--ep-sizes: {bad} do not divide the {experts} experts")
    if dp_arg is None:
        bad = [e for e in ep_sizes if world % e]
        if bad:
            raise SystemExit(f"--ep-sizes: {bad} do not divide the {world} processes (or pass --dp)")
        return [Layout(e, world // e) for e in ep_sizes]
    found = [Layout(e, d) for e in ep_sizes for d in parse_sizes(dp_arg, "--dp") if e * d <= world]
    if not found:
        raise SystemExit(f"no EP x DP layout of --ep-sizes x --dp fits {world} processes")
    return sorted(found, key=lambda lay: (lay.gpus, lay.ep))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=sorted(LAYERS), default="olmoe", help="MoE layer shape")
    parser.add_argument("--ep-sizes", help="comma-separated EP sizes (default: every one that divides N)")
    parser.add_argument("--dp", help="comma-separated DP sizes: run EP x DP on the first EP*DP ranks "
                                     "(default: DP = N / EP on all ranks)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on CPU / gloo")
    parser.add_argument("--expert-mem", type=float, default=0.6,
                        help="share of one GPU's memory the stacks' weights + grads may fill")
    parser.add_argument("--dispatch", choices=DISPATCH_MODES, default="padded",
                        help="padded: no host sync, T rows per rank pair; exact: a row per (token, rank "
                             "holding one of its experts), split sizes read on the host")
    parser.add_argument("--profile", action="store_true", help="print rank 0's top kernels per layout")
    parser.add_argument("--tokens", type=int, help="tokens per GPU per step (default: the layer shape's)")
    parser.add_argument("--small-layers", type=int,
                        help="the small stack's depth (default: the layer shape's); capped by --expert-mem at EP=1, "
                             "so a large value makes it the model whose experts fill that share of one GPU")
    parser.add_argument("--stacks", default="small,large", help="comma-separated: which stacks to run")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if not 0 < args.expert_mem <= 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("need 0 < --expert-mem <= 1, --steps >= 1, --warmup >= 0")

    device = init_distributed(ParallelConfig(ep=1, timeout_s=600)).device
    world = dist.get_world_size()
    shape = (SMOKE if args.smoke else LAYERS)[args.layer]
    if args.tokens is not None:
        if args.tokens < 1:
            raise SystemExit("--tokens must be positive")
        shape = dataclasses.replace(shape, tokens=args.tokens)
    if args.small_layers is not None:
        if args.small_layers < 1:
            raise SystemExit("--small-layers must be positive")
        shape = dataclasses.replace(shape, small_layers=args.small_layers)
    stacks = set(args.stacks.split(","))
    if not stacks or not stacks <= {"small", "large"}:
        raise SystemExit(f"--stacks takes small and/or large, got {args.stacks!r}")
    plan = layouts(world, shape.experts, args.ep_sizes, args.dp)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = SMOKE_EP1_LAYERS * shape.layer_bytes(1) / args.expert_mem
    budget = args.expert_mem * memory
    small = min(shape.small_layers, int(budget // shape.layer_bytes(1)))
    split = [lay.ep for lay in plan if lay.ep > 1]
    large = int(budget // shape.layer_bytes(min(split))) if split else 0
    if small < 1:
        raise SystemExit(f"one {args.layer} layer needs {shape.layer_bytes(1) / 1e9:.0f} GB at EP=1: "
                         f"more than --expert-mem x {memory / 1e9:.0f} GB")

    cases = [("small", small, lay) for lay in plan] if "small" in stacks else []
    if large > small and "large" in stacks:
        cases += [("large", large, lay) for lay in plan if large * shape.layer_bytes(lay.ep) <= budget]
    pad = DISPATCH_MODES[args.dispatch]
    rows = [run_case(shape, name, layers, lay, device, args.steps, args.warmup, pad, args.profile and name == "small")
            for name, layers, lay in cases]
    if dist.get_rank() == 0:
        print_report(args.layer, shape, rows, world, memory, device, args.dispatch)
    dist.destroy_process_group()


def print_report(layer: str, shape: Shape, rows: list[Row], world: int, memory: float,
                 device: torch.device, dispatch: str) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"\nexpert parallelism, {world} x {name}, torch {torch.__version__}")
    shared = f" + {shape.shared} shared" if shape.shared else ""
    print(f"{layer} MoE stack: hidden {shape.hidden}, expert ffn {shape.ffn}, {shape.experts} experts{shared}, "
          f"top-{shape.top_k}, {shape.tokens} tokens/GPU/step, bf16; GPU memory {memory / 1e9:.4g} GB; "
          f"{dispatch} dispatch")
    one_gpu = {}  # per model: the EP=1 forward + backward throughput on the fewest GPUs
    for r in sorted((r for r in rows if r.layout.ep == 1), key=lambda r: r.layout.gpus, reverse=True):
        one_gpu[r.model] = shape.tokens / (r.fwd_bwd_ms / 1e3)
    head = (f"{'model':<6} {'layers':>6} {'GPUs':>4} {'EP':>3} {'DP':>3} {'weights GB/GPU':>14} {'peak GB':>8} "
            f"{'fwd+bwd ms':>10} {'grad sync ms':>12} {'a2a ms':>8} {'a2a GB/GPU':>10} "
            f"{'load rank':>9} {'load expert':>11} {'tokens/s/GPU':>12} {'vs 1 GPU':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        peak = "-" if r.peak_gb is None else f"{r.peak_gb:.1f}"
        ratio = f"{r.tokens_per_s_gpu / one_gpu[r.model]:.2f}" if r.model in one_gpu else "-"
        print(f"{r.model:<6} {r.layers:>6} {r.layout.gpus:>4} {r.layout.ep:>3} {r.layout.dp:>3} "
              f"{r.weights_gb:>14.4g} {peak:>8} {r.fwd_bwd_ms:>10.1f} {r.grad_sync_ms:>12.1f} "
              f"{r.a2a_ms:>8.1f} {r.a2a_gb:>10.4g} {r.rank_load:>9.2f} {r.expert_load:>11.2f} "
              f"{r.tokens_per_s_gpu:>12.0f} {ratio:>8}")
    print("weights = bf16 weights + gradients; a2a = the step's all-to-alls replayed alone; load = max/mean "
          "tokens per EP rank / per expert over the EP group; vs 1 GPU = tokens/s/GPU over the EP=1 "
          "fwd+bwd throughput (no communication)")
    if "small" in one_gpu:
        widest = max((r for r in rows if r.model == "small"), key=lambda r: (r.layout.gpus, r.layout.ep))
        ratio = widest.tokens_per_s_gpu / one_gpu["small"]
        print(f"weak scaling, small model, EP={widest.layout.ep} x DP={widest.layout.dp} on "
              f"{widest.layout.gpus} GPU(s) vs 1 GPU: {ratio:.2f} (targets: >= 0.85 on 2 GPUs, #9; >= 0.80 on 8, #12)")
        ep1 = next(r for r in rows if r.model == "small" and r.layout.ep == 1)
        print(f"small ({ep1.layers} layers) at EP=1: {ep1.weights_gb:.4g} GB of weights + grads, "
              f"{100 * ep1.weights_gb * 1e9 / memory:.0f}% of one GPU's memory")
    for r in rows:
        if r.model == "large":
            need = r.layers * shape.layer_bytes(1) / 1e9
            print(f"large ({r.layers} layers) at EP=1 would need {need:.4g} GB of weights + grads per GPU: "
                  "more than --expert-mem allows.")
            break


if __name__ == "__main__":
    main()
