"""Expert parallelism: each rank of the "ep" group holds E / ep experts, tokens travel by all-to-all.

Routing stays on the rank that owns the token (so a rank's tokens are routed exactly as a
single-process layer would route them). A token travels once to each rank that holds at least
one of its chosen experts, whatever the number of those experts there:

1. plan: for every (token, destination rank) pair, the token's [K] routing row restricted to
   that rank (local expert ids, -1 for slots whose expert lives elsewhere or was dropped) and
   its gate weights; rows are ordered by destination rank;
2. exchange the row counts, then the token rows and the routing rows (the shared experts run
   meanwhile);
3. each rank runs ``routed_experts`` on what arrived: one gate-weighted sum per row;
4. send the sums back the way they came and add up, per token, the rows from each rank.

The gate weights travel as a differentiable tensor, so their gradients come back through the
backward of the same all-to-all.
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


def destination_ranks(topk_idx: torch.Tensor, num_local: int, ep_size: int) -> torch.Tensor:
    """[T, ep] bool: does token t have a chosen expert on rank r. Rank r holds global experts
    [r * num_local, (r + 1) * num_local); a dropped slot (-1) goes nowhere."""
    dest = torch.where(topk_idx < 0, ep_size, topk_idx // num_local)  # dropped: a column past every rank
    hits = torch.zeros(topk_idx.shape[0], ep_size + 1, dtype=torch.bool, device=topk_idx.device)
    return hits.scatter_(1, dest, True)[:, :ep_size]


@dataclass
class DispatchPlan:
    """What this rank sends: one row per (token, destination rank) pair, ordered by rank."""

    token: torch.Tensor  # [N] token row of each sent row
    local_idx: torch.Tensor  # [N, K] expert ids local to the destination, -1 for the other slots
    weight: torch.Tensor  # [N, K] the token's gate weights on those slots, 0 elsewhere


def plan_dispatch(topk_idx: torch.Tensor, topk_weight: torch.Tensor, hits: torch.Tensor, num_local: int,
                  num_rows: int) -> DispatchPlan:
    """``hits`` from ``destination_ranks``; ``num_rows`` = ``hits.sum()``, already on the host
    (it is the sum of the split sizes), so that nothing here waits for the device."""
    tokens = hits.shape[0]
    # A stable sort of [ep, T] puts the hits first, ordered by rank, then token.
    order = torch.sort((~hits.t()).reshape(-1).to(torch.uint8), stable=True).indices[:num_rows]
    rank, token = order // tokens, order % tokens
    idx = topk_idx[token]
    here = (idx >= 0) & (idx // num_local == rank[:, None])
    # The other slots' weights travel as 0, and torch.where gives them a zero gradient whatever
    # comes back for them (a backend may return garbage there, e.g. _grouped_mm's unwritten rows).
    return DispatchPlan(token, torch.where(here, idx - rank[:, None] * num_local, -1),
                        torch.where(here, topk_weight[token], 0))


def pack_routing(local_idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, 2K] in the weights' (float) dtype, so that one all-to-all carries both: the ids are
    small integers, exact in any float type; the weights keep their autograd history."""
    return torch.cat([weight, local_idx.to(weight.dtype)], dim=1)


def unpack_routing(routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weight, local_idx = routing.chunk(2, dim=1)
    return local_idx.long(), weight.contiguous()


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
        hits = destination_ranks(topk_idx, shard.num_local, self.ep_size)
        send_counts = hits.sum(0)
        recv_counts = exchange_counts(send_counts, self.group)
        send_splits, recv_splits = torch.stack([send_counts, recv_counts]).tolist()  # the one host sync
        plan = plan_dispatch(topk_idx, topk_weight, hits, shard.num_local, sum(send_splits))

        recv_x, x_work = all_to_all_start(x[plan.token], recv_splits, send_splits, self.group)
        recv_routing, routing_work = all_to_all_start(pack_routing(plan.local_idx, plan.weight), recv_splits,
                                                      send_splits, self.group)
        shared_out = shared(x) if shared is not None else None  # overlaps the all-to-alls
        x_work.wait()
        routing_work.wait()

        local_idx, weight = unpack_routing(recv_routing)
        y = moe_ops.routed_experts(recv_x, local_idx, weight, experts.w_up, experts.w_down,
                                   experts.activation, self.backend, self.precision)
        back = all_to_all(y, send_splits, recv_splits, self.group)
        out = torch.zeros_like(x).index_add_(0, plan.token, back)  # at most ep rows per token
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
