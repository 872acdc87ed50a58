"""One call that lays a model out over the mesh."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from moekit.parallel.config import ParallelConfig
from moekit.parallel.data_parallel import apply_fsdp
from moekit.parallel.expert_parallel import shard_experts
from moekit.parallel.mesh import ParallelMesh


def parallelize(model: nn.Module, pmesh: ParallelMesh, config: ParallelConfig,
                blocks: Iterable[nn.Module] = ()) -> nn.Module:
    """Shard the experts over "ep", then (``config.fsdp``) the dense params over all ranks.

    ``model`` must be on ``pmesh.device`` and hold the same weights on every rank. Build the
    optimizer afterwards: the parameters are replaced. In place; returns ``model``."""
    shard_experts(model, pmesh)
    if config.fsdp:
        apply_fsdp(model, pmesh, blocks)
    return model
