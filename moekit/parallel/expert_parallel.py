"""Expert parallelism: each rank of the "ep" group holds E / ep experts, tokens travel by all-to-all.

Routing stays on the rank that owns the token (so a rank's tokens are routed exactly as a
single-process layer would route them); only the chosen (token, expert) assignments travel:

1. sort this rank's valid assignments by expert (dropped ones, index -1, are not sent);
2. exchange per-expert counts, then the token rows (the shared experts run meanwhile);
3. run the local experts on what arrived;
4. send the results back the way they came and sum them, weighted by the gates, per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moekit.moe import MoE
from moekit.moe.experts import RoutedExperts
from moekit.ops import moe as moe_ops
from moekit.parallel.comm import all_to_all, all_to_all_start, exchange_counts
from moekit.parallel.mesh import ParallelMesh


@dataclass(frozen=True)
class ExpertShard:
    """Which experts a rank holds: global ids [offset, offset + num_local) of num_global."""

    offset: int
    num_local: int
    num_global: int


@dataclass
class SortedAssignments:
    """This rank's valid assignments ordered by global expert id."""

    token: torch.Tensor  # [N] token row of each assignment
    weight: torch.Tensor  # [N] its gate weight
    counts: torch.Tensor  # [E] assignments per expert


def sort_assignments(topk_idx: torch.Tensor, topk_weight: torch.Tensor, num_experts: int) -> SortedAssignments:
    flat = topk_idx.reshape(-1)
    key = torch.where(flat < 0, num_experts, flat)  # dropped ones sort past every expert
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    order = order[: int(counts.sum())]
    return SortedAssignments(order // topk_idx.shape[1], topk_weight.reshape(-1)[order], counts)


class AllToAllDispatcher:
    """The dispatcher ``MoE.set_dispatcher`` takes, for expert parallelism over ``group``."""

    def __init__(self, group: dist.ProcessGroup, shard: ExpertShard, backend: str = "auto", precision: str = "bf16"):
        self.group = group
        self.shard = shard
        self.backend = backend
        self.precision = precision
        self.ep_size = dist.get_world_size(group)

    def __call__(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weight: torch.Tensor,
        experts: RoutedExperts,
        shared: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        shard = self.shard
        if experts.num_experts != shard.num_local:
            raise ValueError(f"AllToAllDispatcher: experts hold {experts.num_experts} experts, the shard "
                             f"record says {shard.num_local}; shard the layer with shard_experts()")
        sent = sort_assignments(topk_idx, topk_weight, shard.num_global)
        send_counts = sent.counts.view(self.ep_size, shard.num_local)
        recv_counts = exchange_counts(send_counts, self.group)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()

        recv_x, work = all_to_all_start(x[sent.token], recv_splits, send_splits, self.group)
        shared_out = shared(x) if shared is not None else None  # overlaps the all-to-all
        work.wait()

        # Arrivals are grouped by source rank, then by local expert within each source.
        local_idx = torch.arange(shard.num_local, device=x.device).repeat(self.ep_size)
        local_idx = local_idx.repeat_interleave(recv_counts.reshape(-1))[:, None]
        ones = torch.ones(local_idx.shape, dtype=torch.float32, device=x.device)
        y = moe_ops.routed_experts(recv_x, local_idx, ones, experts.w_up, experts.w_down,
                                   experts.activation, self.backend, self.precision)

        back = all_to_all(y, send_splits, recv_splits, self.group)
        weighted = (back.float() * sent.weight[:, None]).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, sent.token, weighted)
        return out if shared_out is None else out + shared_out


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in moe_layers(model) for p in layer.experts.parameters()]


def shard_experts(model: nn.Module, pmesh: ParallelMesh) -> None:
    """Keep only this rank's experts in every MoE layer and install the all-to-all dispatcher.

    Call on a model whose every rank holds the same full weights (same seed, or after loading)."""
    ep, rank = pmesh.ep_size, pmesh.ep_rank
    if ep == 1:
        return  # every rank holds every expert: the local dispatcher is already right
    for layer in moe_layers(model):
        total = layer.config.num_experts
        if total % ep:
            raise ValueError(f"shard_experts: num_experts={total} is not divisible by ep={ep}")
        experts = layer.experts
        if getattr(experts, "shard", None) is not None:
            raise ValueError("shard_experts: this layer's experts are already sharded")
        shard = ExpertShard(rank * (total // ep), total // ep, total)
        rows = slice(shard.offset, shard.offset + shard.num_local)
        experts.w_up = nn.Parameter(experts.w_up.detach()[rows].clone())
        experts.w_down = nn.Parameter(experts.w_down.detach()[rows].clone())
        experts.shard = shard
        layer.set_dispatcher(AllToAllDispatcher(pmesh.ep_group, shard, layer.config.backend,
                                                 layer.config.precision))
