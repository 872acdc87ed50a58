"""Process-group start-up and the ("dp", "ep") device mesh."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moekit.parallel.config import ParallelConfig


@dataclass
class ParallelMesh:
    """``mesh`` is [dp, ep]: a row holds one copy of every expert, split over its ``ep`` ranks;
    a column holds the ranks that own the same experts (their gradients are reduced together).
    ``world`` is the same ranks as one flat dimension, over which the dense params are sharded."""

    mesh: DeviceMesh
    world: DeviceMesh
    device: torch.device

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def world_group(self) -> dist.ProcessGroup:
        return self.world.get_group()

    @property
    def ep_size(self) -> int:
        return self.mesh.size(1)

    @property
    def dp_size(self) -> int:
        return self.mesh.size(0)

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def world_size(self) -> int:
        return self.world.size()


def comm_backend(config: ParallelConfig, device_type: str | None = None) -> str:
    """The configured backend, else NCCL for CUDA devices and gloo for the CPU."""
    if config.backend != "auto":
        return config.backend
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(config: ParallelConfig, device_type: str | None = None) -> ParallelMesh:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and build the mesh. ``device_type`` ("cuda" / "cpu",
    default: cuda when available) picks the backend; a CUDA rank uses GPU LOCAL_RANK."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"moekit.parallel: environment variable(s) {missing} are not set; "
                           "launch with torchrun --nproc-per-node N")
    backend = comm_backend(config, device_type)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("moekit.parallel: backend 'nccl' needs CUDA; use 'gloo' on CPU")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    return build_mesh(config, device)


def build_mesh(config: ParallelConfig, device: torch.device) -> ParallelMesh:
    world_size = dist.get_world_size()
    dp = config.dp_size(world_size)
    mesh = init_device_mesh(device.type, (dp, config.ep), mesh_dim_names=("dp", "ep"))
    world = init_device_mesh(device.type, (world_size,), mesh_dim_names=("world",))
    pmesh = ParallelMesh(mesh, world, device)
    _bound_every_group(pmesh, timedelta(seconds=config.timeout_s))
    return pmesh


def _bound_every_group(pmesh: ParallelMesh, timeout: timedelta) -> None:
    """init_device_mesh creates the "dp" / "ep" sub-groups with the backend's default timeout
    (30 min for gloo, 10 for NCCL), not the default group's: without this, a peer that stalls in an
    expert all-gather or an expert-gradient all-reduce of a dp x ep mesh hangs the others that long
    instead of ``timeout_s``."""
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # private: absent in old torch
    if set_timeout is None:
        warnings.warn("this torch has no distributed_c10d._set_pg_timeout: the dp / ep groups keep the backend's "
                      "default timeout, not parallel.timeout_s", stacklevel=2)
        return
    groups = {id(g): g for g in (pmesh.ep_group, pmesh.dp_group, pmesh.world_group)}
    for group in groups.values():
        set_timeout(timeout, group)
