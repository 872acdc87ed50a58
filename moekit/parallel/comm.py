"""Autograd-aware collectives over rows: all-to-all (the backward sends gradients back the same
way), all-gather and reduce-scatter (each the other's backward).

All-to-all split sizes are host lists of rows per rank, or None for equal splits: every rank
sends ``rows / ep`` rows to every rank, which needs no split sizes on the host (no device sync)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _rows(splits: list[int] | None, equal: int) -> int:
    return equal if splits is None else sum(splits)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, pending):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        out = x.new_empty((_rows(output_splits, x.shape[0]), *x.shape[1:]))
        work = dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group,
                                      async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        # Through the Function, not a plain collective: under create_graph=True the gradient stays
        # differentiable (a plain one would drop this op from a second derivative, silently).
        return _AllToAll.apply(grad, input_splits, output_splits, ctx.group, None), None, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int] | None, input_splits: list[int] | None,
               group: dist.ProcessGroup) -> torch.Tensor:
    """Rows ``input_splits[r]`` of ``x`` go to rank r; ``output_splits[r]`` rows come from rank r.
    Both None: equal splits, the output has as many rows as ``x``."""
    return _AllToAll.apply(x, output_splits, input_splits, group, None)


def all_to_all_start(x: torch.Tensor, output_splits: list[int] | None, input_splits: list[int] | None,
                     group: dist.ProcessGroup):
    """Like ``all_to_all`` but returns at once: (output, work). Read the output only after
    ``work.wait()``; the backward is synchronous."""
    pending: list = []
    out = _AllToAll.apply(x, output_splits, input_splits, group, pending)
    return out, pending[0]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, pending):
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        work = dist.all_gather_into_tensor(out, x.contiguous(), group=group, async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatter.apply(grad, ctx.group), None, None  # differentiable, as in _AllToAll


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _AllGather.apply(grad, ctx.group, None), None


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    ep = dist.get_world_size(group)
    if x.shape[0] % ep:
        raise ValueError(f"reduce_scatter: {x.shape[0]} rows do not split over {ep} ranks")
    out = x.new_empty((x.shape[0] // ep, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def all_gather_start(x: torch.Tensor, group: dist.ProcessGroup):
    """Every rank's ``x`` stacked in rank order, ep times the rows: (output, work), returned at
    once; read the output only after ``work.wait()``. The backward reduce-scatters: each rank
    gets the sum over ranks of the gradient of its own rows."""
    pending: list = []
    out = _AllGather.apply(x, group, pending)
    return out, pending[0]


def reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Rank r gets block r of the sum over ranks of ``x`` (ep equal row blocks), in x's dtype.
    The backward all-gathers."""
    return _ReduceScatter.apply(x, group)


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``send_counts`` [ep, ...] (row r: what this rank sends to rank r) -> [ep, ...] (row r: what
    rank r sends here)."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv
