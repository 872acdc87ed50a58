"""Expert parallelism: each rank of the "ep" group holds E / ep experts, tokens travel between ranks.

Routing stays on the rank that owns the token (so a rank's tokens are routed exactly as a
single-process layer would route them). A token travels at most once to each rank, whatever
the number of its experts there; on arrival its [K] routing row is restricted to that rank
(local expert ids, -1 for slots whose expert lives elsewhere or was dropped; gate weights 0
there). Two ways to move the rows (``AllToAllDispatcher(pad_to_tokens=...)``):

* padded (the default), no host synchronisation: every rank's block of T tokens goes to every
  rank, i.e. an all-gather of the token rows (started before the router runs: the rows do not
  depend on the routing) and of their routing rows; each rank runs its
  experts on all ep * T rows and a reduce-scatter returns to rank r the sum over ranks of the
  outputs for its tokens (in x's dtype: one rounding at ep = 2). No rows are copied or summed
  outside NCCL. Every rank of the group must hold the same T (and K) in a call. A token routed
  uniformly at random to k of E experts needs a given rank with probability
  1 - C(E - E/ep, k) / C(E, k): the share of useful rows, 99.8% at ep=2 and 68% at ep=8 for
  top-8 of 64 (the rest is padding bytes);
* exact: one row per (token, destination rank) pair, by all-to-all; fewer bytes at large ep,
  but the row counts are exchanged and read on the host (a device sync per layer pass), and any
  T works. The rows come back by all-to-all and are added up per token (index_add).

The shared experts run while the token rows are in flight. The gate weights travel as a
differentiable tensor, so their gradients come back through the backward of the same
collective (an all-gather's backward is a reduce-scatter, and the reverse).

Memory: ``routed_experts`` sizes its buffers by rows x K slots, unused slots included, so the
receiving rank's expert activations scale with the rows that arrive (padded: ep * T, exact:
the (token, rank) pairs), not with the T * K / ep assignments it computes: up to ep times the
single-process layer's at large ep (use the exact mode there, or fewer tokens per step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moekit.moe import MoE
from moekit.moe.experts import RoutedExperts
from moekit.ops import moe as moe_ops
from moekit.parallel.comm import all_gather_start, all_to_all, all_to_all_start, exchange_counts, reduce_scatter
from moekit.parallel.mesh import ParallelMesh


@dataclass(frozen=True)
class ExpertShard:
    """Which experts a rank holds: global ids [offset, offset + num_local) of num_global."""

    offset: int
    num_local: int
    num_global: int


def restrict_to_rank(topk_idx: torch.Tensor, topk_weight: torch.Tensor, rank: torch.Tensor | int,
                     num_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing rows restricted to the experts of ``rank`` (broadcast against the rows): local
    ids, -1 for slots whose expert lives elsewhere or was dropped; gate weights, 0 there.
    The 0 goes through torch.where, so those slots get a zero gradient whatever comes back for
    them (a backend may return garbage there, e.g. _grouped_mm's unwritten rows)."""
    here = (topk_idx >= 0) & (topk_idx // num_local == rank)
    return torch.where(here, topk_idx - rank * num_local, -1), torch.where(here, topk_weight, 0)


def destination_ranks(topk_idx: torch.Tensor, num_local: int, ep_size: int) -> torch.Tensor:
    """[T, ep] bool: does token t have a chosen expert on rank r. Rank r holds global experts
    [r * num_local, (r + 1) * num_local); a dropped slot (-1) goes nowhere."""
    dest = torch.where(topk_idx < 0, ep_size, topk_idx // num_local)  # dropped: a column past every rank
    hits = torch.zeros(topk_idx.shape[0], ep_size + 1, dtype=torch.bool, device=topk_idx.device)
    return hits.scatter_(1, dest, True)[:, :ep_size]


@dataclass
class DispatchPlan:
    """What this rank sends (exact mode): one row per (token, destination rank) pair, ordered by rank."""

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
    local_idx, weight = restrict_to_rank(topk_idx[token], topk_weight[token], rank[:, None], num_local)
    return DispatchPlan(token, local_idx, weight)


def pack_routing(idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, 2K] floats, so that one collective carries both: the expert ids are integers, exact in
    float32 or wider (the routers' weights are); the weights keep their autograd history."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return torch.cat([weight.to(dtype), idx.to(dtype)], dim=1)


def unpack_routing(routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weight, idx = routing.chunk(2, dim=1)
    return idx.long(), weight.contiguous()


class AllToAllDispatcher:
    """The dispatcher ``MoE.set_dispatcher`` takes, for expert parallelism over ``group``.

    ``pad_to_tokens=True`` (padded mode, see the module docstring) never synchronises with the
    device once a (tokens, top_k) shape has been seen: the first call with a new shape
    exchanges it over the group (one sync) and raises ValueError if the ranks differ. That
    check needs every rank to meet a new shape in the same call; a rank that alone changes its
    token count (e.g. an uneven last micro-batch) is undetectable without a sync per call and
    hangs the collectives: pad the batch, or use ``pad_to_tokens=False``.
    """

    def __init__(self, group: dist.ProcessGroup, shard: ExpertShard, backend: str = "auto", precision: str = "bf16",
                 pad_to_tokens: bool = True):
        self.group = group
        self.shard = shard
        self.backend = backend
        self.precision = precision
        self.pad_to_tokens = pad_to_tokens
        self.ep_size = dist.get_world_size(group)
        self._checked_shapes: set[tuple[int, ...]] = set()

    def start(self, x: torch.Tensor):
        """Padded mode: the all-gather of the token rows, started before the router runs (the
        rows do not depend on the routing), so the transfer overlaps it. Exact mode: None (its
        rows depend on the routing)."""
        if not self.pad_to_tokens:
            return None
        self._check_same_shape((x.shape[0],), "token counts", x.device)
        return all_gather_start(x, self.group)

    def __call__(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weight: torch.Tensor,
        experts: RoutedExperts,
        shared: Callable[[torch.Tensor], torch.Tensor] | None = None,
        started=None,
    ) -> torch.Tensor:
        """``started``: what ``start(x)`` returned for this pass (padded mode starts the
        all-gather itself without it)."""
        shard = self.shard
        if experts.num_experts != shard.num_local:
            raise ValueError(f"AllToAllDispatcher: experts hold {experts.num_experts} experts, the shard "
                             f"record says {shard.num_local}; shard the layer with shard_experts()")
        if self.pad_to_tokens:
            self._check_same_shape(tuple(topk_idx.shape), "(tokens, top_k) shapes", topk_idx.device)
            all_x, x_work = started if started is not None else self.start(x)
            all_routing, routing_work = all_gather_start(pack_routing(topk_idx, topk_weight), self.group)
            shared_out = shared(x) if shared is not None else None  # overlaps the all-gathers
            x_work.wait()
            routing_work.wait()
            local_idx, weight = restrict_to_rank(*unpack_routing(all_routing), shard.offset // shard.num_local,
                                                 shard.num_local)
            y = moe_ops.routed_experts(all_x, local_idx, weight, experts.w_up, experts.w_down,
                                       experts.activation, self.backend, self.precision, experts.fp8_weights)
            out = reduce_scatter(y, self.group)  # this rank's tokens, summed over the ranks' experts
        else:
            hits = destination_ranks(topk_idx, shard.num_local, self.ep_size)
            # Rows per destination, and this rank's slots per token: routing rows must have one
            # width across the group, and expert choice gives each rank its own K.
            # (Not full_like(hits[0]): a rank with no tokens this pass has no row 0.)
            width_here = torch.full((self.ep_size,), topk_idx.shape[1], dtype=torch.long, device=hits.device)
            send = torch.stack([hits.sum(0), width_here], 1)
            recv = exchange_counts(send, self.group)
            (send_splits, _), (recv_splits, their_k) = torch.stack([send, recv]).transpose(1, 2).tolist()  # one sync
            width = max(their_k)
            if width > topk_idx.shape[1]:  # pad with dropped slots
                pad = (0, width - topk_idx.shape[1])
                topk_idx, topk_weight = F.pad(topk_idx, pad, value=-1), F.pad(topk_weight, pad)
            plan = plan_dispatch(topk_idx, topk_weight, hits, shard.num_local, sum(send_splits))
            back, shared_out = self._exchange(x, x[plan.token], plan.local_idx, plan.weight, recv_splits,
                                              send_splits, experts, shared)
            out = torch.zeros_like(x).index_add_(0, plan.token, back)  # at most ep rows per token
        return out if shared_out is None else out + shared_out

    def _exchange(self, x, send_x, local_idx, weight, recv_splits, send_splits, experts, shared):
        """Exact mode: rows out, experts on what arrived, the outputs back by all-to-all:
        (returned rows, shared experts' output)."""
        recv_x, x_work = all_to_all_start(send_x, recv_splits, send_splits, self.group)
        recv_routing, routing_work = all_to_all_start(pack_routing(local_idx, weight), recv_splits,
                                                      send_splits, self.group)
        shared_out = shared(x) if shared is not None else None  # overlaps the all-to-alls
        x_work.wait()
        routing_work.wait()
        recv_idx, recv_weight = unpack_routing(recv_routing)
        y = moe_ops.routed_experts(recv_x, recv_idx, recv_weight, experts.w_up, experts.w_down,
                                   experts.activation, self.backend, self.precision, experts.fp8_weights)
        return all_to_all(y, send_splits, recv_splits, self.group), shared_out

    def _check_same_shape(self, shape: tuple[int, ...], what: str, device: torch.device) -> None:
        """Equal blocks need the same token count (and top_k) on every rank: each new shape is
        checked once, with one host read."""
        if shape in self._checked_shapes:
            return
        mine = torch.tensor([shape] * self.ep_size, device=device)
        theirs = [tuple(s) for s in exchange_counts(mine, self.group).tolist()]  # once per new shape
        if any(s != shape for s in theirs):
            found = [s[0] for s in theirs] if len(shape) == 1 else theirs
            raise ValueError(f"AllToAllDispatcher(pad_to_tokens=True): the ranks of the expert-parallel group "
                             f"route different {what} {found}; every rank needs the same "
                             "token count (pad the batch) or use pad_to_tokens=False")
        self._checked_shapes.add(shape)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in moe_layers(model) for p in layer.experts.parameters()]


def shard_experts(model: nn.Module, pmesh: ParallelMesh, pad_to_tokens: bool = True) -> None:
    """Keep only this rank's experts in every MoE layer and install the all-to-all dispatcher
    (``pad_to_tokens``: its mode, see ``AllToAllDispatcher``).

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
        # Expert choice gives each rank a data-dependent number of slots per token: fixed
        # splits would not line up across ranks, so those layers take the exact path.
        padded = pad_to_tokens and layer.config.router_type != "expert_choice"
        layer.set_dispatcher(AllToAllDispatcher(pmesh.ep_group, shard, layer.config.backend,
                                                 layer.config.precision, padded))
