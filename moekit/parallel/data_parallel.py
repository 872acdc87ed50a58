"""Data parallelism around expert parallelism: FSDP2 for dense params, explicit reduction for experts.

Every rank reads its own data, so the training objective is the mean of the ranks' losses.
Dense params are replicated over all ranks (sharded by FSDP2 over the flat "world" mesh, which
averages their gradients). An expert shard already receives the gradient of every rank of its
"ep" group through the all-to-all backward (a sum over those ranks), so its gradient is summed
over the "dp" group, which holds the same experts, and divided by the world size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from moekit.parallel.expert_parallel import expert_parameters
from moekit.parallel.mesh import ParallelMesh


def apply_fsdp(model: nn.Module, pmesh: ParallelMesh, blocks: Iterable[nn.Module] = ()) -> None:
    """Shard every dense parameter with FSDP2 over all ranks; expert params stay as they are.

    ``blocks`` (e.g. the transformer layers) become their own FSDP units, so only one block's
    params are gathered at a time; the rest of the model forms the root unit."""
    ignored = set(expert_parameters(model))
    for block in blocks:
        fully_shard(block, mesh=pmesh.world, ignored_params=ignored)
    fully_shard(model, mesh=pmesh.world, ignored_params=ignored)


def _is_sharded(param: torch.Tensor) -> bool:
    return isinstance(param, DTensor)


def sync_grads(model: nn.Module, pmesh: ParallelMesh) -> None:
    """After backward: make every gradient the gradient of the mean loss over all ranks.

    FSDP2 already reduced the sharded dense params; this handles the expert shards and, without
    FSDP, the replicated dense params. Gradients of one kind go in one flat all-reduce."""
    # Lists in model order: every rank must flatten its gradients in the same order.
    experts = [p for p in expert_parameters(model) if p.requires_grad]  # a frozen one takes no gradient
    expert_ids = {id(p) for p in experts}
    for p in experts:
        if p.grad is None:  # this rank's shard received no tokens; its peers' gradients still count
            p.grad = torch.zeros_like(p)
    dense = [p for p in model.parameters()
             if p.requires_grad and id(p) not in expert_ids and not _is_sharded(p)]
    _all_reduce_mean([p.grad for p in experts], pmesh.dp_group, pmesh.world_size)
    _all_reduce_mean(_grads_any_rank_has(dense, pmesh), pmesh.world_group, pmesh.world_size)


def _grads_any_rank_has(params: list[nn.Parameter], pmesh: ParallelMesh) -> list[torch.Tensor]:
    """The gradients of ``params`` that some rank holds, zero-filled where this rank has none: every rank
    must reduce the same list (a parameter unused on one rank only would misalign the flat buffers or
    leave a peer waiting), and a parameter no rank used keeps no gradient (AdamW skips it)."""
    if not params:
        return []
    held = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=pmesh.device)
    dist.all_reduce(held, op=dist.ReduceOp.MAX, group=pmesh.world_group)
    for p, any_rank in zip(params, held.tolist()):
        if any_rank and p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params if p.grad is not None]


GRAD_BUCKET_BYTES = 256 << 20


def _all_reduce_mean(grads: list[torch.Tensor], group: dist.ProcessGroup, divisor: int) -> None:
    """Sum ``grads`` over ``group`` and divide by ``divisor``, a bucket of flattened grads per
    all-reduce (one per tensor would be latency-bound, one for all would double the memory)."""
    if not grads:
        return
    if dist.get_world_size(group) == 1:
        torch._foreach_div_(grads, divisor)
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= GRAD_BUCKET_BYTES or i == len(grads) - 1:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat, group=group)
            flat /= divisor
            for b, chunk in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(chunk.view_as(b))
            bucket, size = [], 0


def avoid_mixed_multi_tensor_steps(optimizer: torch.optim.Optimizer) -> None:
    """Make the optimizer step one tensor at a time in param groups that mix FSDP's DTensors with
    plain tensors (the expert shards): foreach / fused kernels refuse such mixed lists."""
    for group in optimizer.param_groups:
        kinds = {_is_sharded(p) for p in group["params"]}
        if len(kinds) > 1:
            for option in ("foreach", "fused"):
                if option in group:
                    group[option] = False


def grad_norm(model: nn.Module, pmesh: ParallelMesh) -> torch.Tensor:
    """The 2-norm of the full model's gradient, identical on every rank.

    Sums squares once per distinct piece: FSDP shards are distinct on every rank, expert shards
    repeat across the dp ranks, replicated dense grads across all ranks."""
    experts = set(expert_parameters(model))
    total = torch.zeros((), dtype=torch.float32, device=pmesh.device)
    for p in model.parameters():
        if p.grad is None:
            continue
        if _is_sharded(p):
            sq, copies = p.grad.to_local().float().square().sum(), 1
        else:
            sq, copies = p.grad.float().square().sum(), (pmesh.dp_size if p in experts else pmesh.world_size)
        total += sq / copies
    dist.all_reduce(total, group=pmesh.world_group)
    return total.sqrt()


def clip_grad_norm_(model: nn.Module, max_norm: float, pmesh: ParallelMesh) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model with FSDP shards and expert shards."""
    norm = grad_norm(model, pmesh)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            (p.grad.to_local() if _is_sharded(p) else p.grad).mul_(scale)
    return norm


def load_reducer(pmesh: ParallelMesh):
    """``reduce_load`` for aux-loss-free balancing: the per-expert load summed over all ranks.

    The router is replicated on every rank (dp and ep alike), so every rank must apply the same
    bias step from the same total; with dp == 1 this is the expert-parallel group."""

    def reduce_load(load: torch.Tensor) -> torch.Tensor:
        load = load.clone()
        dist.all_reduce(load, group=pmesh.world_group)
        return load

    return reduce_load
