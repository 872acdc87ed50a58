"""Rank programs for the parallel tests: ``python workers.py SCENARIO JSON_ARGS``.

Each scenario writes its measurements to ``{args['out']}.{rank}.json``; the tests assert on them.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moekit import MoE, MoEConfig
from moekit.moe import update_expert_biases
from moekit.parallel import (
    ParallelConfig,
    avoid_mixed_multi_tensor_steps,
    clip_grad_norm_,
    data_parallel,
    init_distributed,
    load_checkpoint,
    load_reducer,
    parallelize,
    peer_failure_guard,
    save_checkpoint,
    shard_experts,
    sync_grads,
)

H = 32
LAYER_CONFIGS = {
    "softmax_shared_gate": dict(score_func="softmax", top_k=2, num_shared_experts=1, shared_expert_gate=True,
                                aux_loss_coef=0.01, z_loss_coef=0.001),
    "sigmoid_groups": dict(score_func="sigmoid", top_k=3, num_groups=4, topk_groups=2, route_scale=2.5,
                           num_shared_experts=2, shared_ffn_hidden_size=8),
    "sigmoid_groups_capacity": dict(score_func="sigmoid", top_k=3, num_groups=4, topk_groups=2, capacity_factor=0.75),
    "softmax_capacity_position": dict(score_func="softmax", top_k=2, capacity_factor=0.5, drop_policy="position",
                                      activation="gelu", backend="reference"),
    "expert_choice": dict(router_type="expert_choice", capacity_factor=1.0, activation="geglu"),
    # rank 0 gets a token every expert picks: its slots per token (K) exceed rank 1's
    "expert_choice_uneven_k": dict(router_type="expert_choice", capacity_factor=1.0, score_func="sigmoid"),
    "skewed_to_rank0": dict(score_func="softmax", top_k=2),
    # the loop backend: rank 1's experts get no rows, its output must stay on the autograd graph
    "skewed_to_rank0_reference": dict(score_func="softmax", top_k=2, backend="reference"),
}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def write(args: dict, result: dict) -> None:
    with open(f"{args['out']}.{rank()}.json", "w") as f:
        json.dump(result, f)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def layer_scenario(args: dict) -> None:
    """The expert-parallel layer against a full single-process copy, on this rank's tokens, in
    float32 on args["device"] ("cpu": gloo, the default; "cuda": NCCL, one GPU per rank)."""
    device = torch.device(args.get("device", "cpu"))
    pmesh = init_distributed(ParallelConfig(ep=dist_world()), device_type=device.type)
    if device.type == "cuda":
        device = pmesh.device
    result = {}
    for name, extra in LAYER_CONFIGS.items():
        if device.type == "cuda":  # the collectives are under test: no Triton builds (kernels have own checks)
            extra = {**extra, "backend": "reference"}
        torch.manual_seed(0)
        ref = MoE(MoEConfig(hidden_size=H, ffn_hidden_size=16, num_experts=8, **extra)).to(device)
        if name.startswith("skewed_to_rank0"):  # every token picks experts 0 and 1: the other rank gets nothing
            ref.router.expert_bias[:2] = 100.0
        layer = copy.deepcopy(ref)
        shard_experts(layer, pmesh)
        # expert choice: slots per token differ across ranks, so fixed splits cannot be used
        assert layer.dispatcher.pad_to_tokens == (not name.startswith("expert_choice")), name
        torch.manual_seed(100 + rank())  # each rank its own tokens
        x = torch.randn(3, 10, H).to(device)
        if name == "expert_choice_uneven_k" and rank() == 0:
            x[0, 0] = ref.router.weight.detach().sum(0) * 1000
        dy = torch.randn(3, 10, H).to(device)
        errs = {}
        outs = []
        for module in (ref, layer):
            xi = x.clone().requires_grad_()
            y = module(xi)
            ((y * dy).sum() + module.aux_loss).backward()
            outs.append((y.detach(), xi.grad))
        errs["out"] = rel_err(outs[1][0], outs[0][0])
        errs["slots_per_token"] = ref.router(x.reshape(-1, H)).topk_idx.shape[1]
        errs["grad_x"] = rel_err(outs[1][1], outs[0][1])
        errs["grad_router"] = rel_err(layer.router.weight.grad, ref.router.weight.grad)
        if ref.shared is not None:
            errs["grad_shared_up"] = rel_err(layer.shared.up.weight.grad, ref.shared.up.weight.grad)
            errs["grad_shared_down"] = rel_err(layer.shared.down.weight.grad, ref.shared.down.weight.grad)
        if ref.shared_gate is not None:
            errs["grad_shared_gate"] = rel_err(layer.shared_gate.weight.grad, ref.shared_gate.weight.grad)
        # A shard's gradient collects every rank's tokens: compare with the summed reference.
        shard = layer.experts.shard
        rows = slice(shard.offset, shard.offset + shard.num_local)
        for w in ("w_up", "w_down"):
            full = getattr(ref.experts, w).grad.clone()
            dist.all_reduce(full)
            mine = getattr(layer.experts, w).grad
            errs[f"grad_{w}"] = float((mine - full[rows]).norm() / full.norm())
            errs[f"grad_{w}_norm"] = float(mine.norm())
        dropped = (layer.last_stats.dropped_fraction if ref.config.router_type == "topk" else torch.tensor(0.0))
        errs["dropped_fraction"] = float(dropped)
        result[name] = errs
    try:
        bad = MoE(MoEConfig(hidden_size=H, ffn_hidden_size=16, num_experts=3, top_k=1)).to(device)
        shard_experts(bad, pmesh)
        result["indivisible_error"] = ""
    except ValueError as e:
        result["indivisible_error"] = str(e)
    write(args, result)


def dist_world() -> int:
    return int(os.environ["WORLD_SIZE"])


# ---- training ---------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, moe: MoEConfig):
        super().__init__()
        self.norm = nn.RMSNorm(moe.hidden_size)
        self.moe = MoE(moe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.norm(x))


class TinyLM(nn.Module):
    """Embedding -> [x + MoE(norm(x))] x 2 -> norm -> head: just enough model around the MoE layers."""

    def __init__(self, vocab: int, moe: MoEConfig, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, moe.hidden_size)
        self.layers = nn.ModuleList(Block(moe) for _ in range(layers))
        self.norm = nn.RMSNorm(moe.hidden_size)
        self.head = nn.Linear(moe.hidden_size, vocab, bias=False)

    def forward(self, tokens: torch.Tensor):
        x = self.embed(tokens)
        aux = x.new_zeros(())
        for block in self.layers:
            x = block(x)
            aux = aux + block.moe.aux_loss
        return self.head(self.norm(x)), aux


VOCAB, SEQ, GLOBAL_BATCH = 64, 16, 8
CLIP = 0.5  # below most gradient norms of this run, so clipping acts
TRAIN_MOE = dict(hidden_size=H, ffn_hidden_size=16, num_experts=8, top_k=2, num_shared_experts=1,
                 score_func="sigmoid", num_groups=2, topk_groups=1, bias_update_rate=1e-3, z_loss_coef=1e-3)


def global_batch(step: int) -> torch.Tensor:
    """A learnable stream: t_{i+1} = (5 t_i + 3) mod V from a random start, plus 10% noise."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    seq = [start]
    for _ in range(SEQ):
        seq.append((5 * seq[-1] + 3) % VOCAB)
    tokens = torch.cat(seq, dim=1)
    noise = torch.rand(tokens.shape, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, tokens.shape, generator=g), tokens)


def train_scenario(args: dict) -> None:
    """``steps`` optimizer steps on a global batch split over the ranks; losses are global means.
    Optional: ``save_at`` (step, dir) saves after that step; ``resume`` (dir) starts from a checkpoint."""
    distributed = "WORLD_SIZE" in os.environ
    pconfig = ParallelConfig.from_dict(args.get("parallel", {}))
    pmesh = init_distributed(pconfig) if distributed else None
    if "grad_bucket_bytes" in args:  # small buckets: several all-reduces per gradient sync
        data_parallel.GRAD_BUCKET_BYTES = args["grad_bucket_bytes"]
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(0)
    model = TinyLM(VOCAB, MoEConfig(**TRAIN_MOE))
    if pmesh is not None:
        parallelize(model, pmesh, pconfig, blocks=model.layers)
    # foreach=True as on a GPU: its multi-tensor kernels refuse FSDP's DTensors mixed with expert shards.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, foreach=True)
    if pmesh is not None:
        avoid_mixed_multi_tensor_steps(opt)
    first = 0
    if "resume" in args:
        first = load_checkpoint(args["resume"], model, opt, pmesh)["step"]
    reduce_load = load_reducer(pmesh) if pmesh is not None else None
    losses, norms = [], []
    with peer_failure_guard(pconfig.timeout_s):
        train_steps(args, model, opt, pmesh, first, world, reduce_load, losses, norms)
    write(args, {"losses": losses, "grad_norms": norms, "first": first,
                 "bias": [layer.moe.router.expert_bias.tolist() for layer in model.layers]})


def train_steps(args, model, opt, pmesh, first, world, reduce_load, losses, norms) -> None:
    for step in range(first, args["steps"]):
        batch = global_batch(step).chunk(world)[rank()]
        logits, aux = model(batch[:, :-1])
        lm = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        (lm + aux).backward()
        if pmesh is not None:
            sync_grads(model, pmesh)
            norm = clip_grad_norm_(model, CLIP, pmesh)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        norms.append(float(norm))
        opt.step()
        opt.zero_grad()
        update_expert_biases(model, reduce_load)
        lm = lm.detach()
        if pmesh is not None:
            dist.all_reduce(lm)
            lm /= world
        losses.append(float(lm))
        if args.get("die_at") == step and rank() == args.get("die_rank", 1):
            os._exit(3)  # a crash: no clean-up, no goodbye to the other ranks
        if args.get("hang_at") == step and rank() == args.get("die_rank", 1):
            time.sleep(args["hang_s"])  # alive but silent, then gone
            os._exit(4)
        if "save_at" in args and args["save_at"][0] == step:
            save_checkpoint(args["save_at"][1], model, opt, pmesh, extra={"step": step + 1})


def sync_grads_scenario(args: dict) -> None:
    """Without FSDP, a dense parameter that one rank's forward left unused (no gradient there) and one
    no rank used: sync_grads must reduce the same list on every rank and leave the unused one alone."""
    pmesh = init_distributed(ParallelConfig(ep=1, fsdp=False, timeout_s=30), device_type="cpu")
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    torch.manual_seed(1 + rank())
    x = torch.randn(3, 4)
    y = model["a"](x)
    if rank() == 0:
        y = model["b"](y)
    y.square().sum().backward()
    local = {name: p.grad.tolist() for name, p in model.named_parameters() if p.grad is not None}
    sync_grads(model, pmesh)
    write(args, {"local": local, "synced": {name: None if p.grad is None else p.grad.tolist()
                                            for name, p in model.named_parameters()}})


def comm_double_backward_scenario(args: dict) -> None:
    """A Hessian-vector product through each collective (create_graph=True), on float64 rows, with the
    same product computed in one process on every rank's rows (the collectives emulated by slicing)."""
    init_distributed(ParallelConfig(ep=dist_world(), fsdp=False, timeout_s=30), device_type="cpu")
    from moekit.parallel.comm import all_gather_start, all_to_all, reduce_scatter  # noqa: PLC0415

    world, me, group = dist_world(), rank(), dist.group.WORLD

    def gathered(f):
        out, work = all_gather_start(f, group)
        work.wait()
        return out

    collectives = {  # (distributed, emulated on the list of every rank's rows, for rank r)
        "all_to_all": (lambda x: all_to_all(x, None, None, group),
                       lambda xs, r: torch.cat([x.chunk(world)[r] for x in xs])),
        "all_gather": (gathered, lambda xs, r: torch.cat(xs)),
        "reduce_scatter": (lambda x: reduce_scatter(x, group), lambda xs, r: sum(xs).chunk(world)[r]),
    }

    def loss(y, x, r):
        return (r + 1) * y.square().sum() + x.pow(3).sum()

    result = {}
    for name, (collective, emulated) in collectives.items():
        xs = [torch.randn(2 * world, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
              for r in range(world)]
        x = xs[me].clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(collective(x), x, me), x, create_graph=True)
        (hvp,) = torch.autograd.grad(g.sum(), x)
        leaves = [t.clone().requires_grad_() for t in xs]
        total = sum(loss(emulated(leaves, r), leaves[r], r) for r in range(world))
        want = torch.autograd.grad(sum(g.sum() for g in torch.autograd.grad(total, leaves, create_graph=True)),
                                   leaves)[me]
        result[name] = rel_err(hvp, want)
    write(args, result)


SCENARIOS = {"layer": layer_scenario, "train": train_scenario, "sync_grads": sync_grads_scenario,
             "comm_double_backward": comm_double_backward_scenario}

if __name__ == "__main__":
    torch.set_num_threads(1)
    SCENARIOS[sys.argv[1]](json.loads(sys.argv[2]))
    if dist.is_initialized():
        dist.barrier()  # leave together (see DistributedRuntime.close)
        dist.destroy_process_group()
