"""Distributed checkpoints (torch.distributed.checkpoint) that load at any world size.

The state is saved as global tensors: FSDP2 params are DTensors already, and each expert shard
is presented as the [Replicate over dp, Shard(0) over ep] piece of its full [E, ...] tensor. A
model laid out differently (another ep, or one process with no process group at all) loads the
pieces it holds.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from moekit.parallel.mesh import ParallelMesh


class DistributedCheckpointError(RuntimeError):
    """A distributed checkpoint that is missing, corrupt, or does not fit the model."""


def _expert_shard_names(model: nn.Module) -> set[str]:
    names = set()
    for name, _ in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        if getattr(owner, "shard", None) is not None:
            names.add(name)
    return names


def _as_global(local: torch.Tensor, pmesh: ParallelMesh) -> DTensor:
    # run_check=False: no communication, and the DTensor shares the local storage, so a load
    # writes straight into the parameter / optimizer state.
    return DTensor.from_local(local, pmesh.mesh, [Replicate(), Shard(0)], run_check=False)


def _map_experts(state: dict, names: set[str], fn) -> dict:
    return {k: fn(v) if k in names else v for k, v in state.items()}


def _states(model: nn.Module, optimizer, pmesh: ParallelMesh | None) -> tuple[dict, set[str]]:
    names = _expert_shard_names(model) if pmesh is not None else set()
    to_global = lambda t: _as_global(t, pmesh)
    state = {"model": _map_experts(get_model_state_dict(model), names, to_global)}
    if optimizer is not None:
        optim = get_optimizer_state_dict(model, optimizer)
        # Per-parameter optimizer tensors shaped like the param (Adam moments) are sharded with it;
        # scalars (the step count) are the same everywhere.
        per_param = lambda s: {k: to_global(t) if torch.is_tensor(t) and t.dim() > 0 else t for k, t in s.items()}
        state["optim"] = {**optim, "state": _map_experts(optim["state"], names, per_param)}
    return state, names


def _describe(error: BaseException) -> str:
    if isinstance(error, CheckpointException):
        # failures: rank -> (exception, traceback)
        return "; ".join(f"rank {rank}: {_describe(failure[0])}" for rank, failure in error.failures.items())
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def _to_local(value):
    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, dict):
        return {k: _to_local(v) for k, v in value.items()}
    return value


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    pmesh: ParallelMesh | None = None, extra: dict[str, Any] | None = None) -> None:
    """Every rank calls this with the same ``path`` (a directory). ``extra``: small JSON-able
    values (step, data position, config) saved alongside."""
    state, _ = _states(model, optimizer, pmesh)
    state["extra"] = json.dumps(extra or {})
    dcp.save(state, checkpoint_id=path)


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    pmesh: ParallelMesh | None = None) -> dict[str, Any]:
    """Load in place into ``model`` (and ``optimizer``) laid out for ``pmesh`` (None: a plain
    single-process model). Returns the ``extra`` values."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise DistributedCheckpointError(f"{path!r} is not a distributed checkpoint (no .metadata file there)")
    state, names = _states(model, optimizer, pmesh)
    state["extra"] = ""
    try:
        dcp.load(state, checkpoint_id=path)
    except (CheckpointException, Exception) as error:  # CheckpointException is a BaseException
        raise DistributedCheckpointError(f"distributed checkpoint {path!r} cannot be loaded into this model: "
                                         f"{_describe(error)}") from error
    set_model_state_dict(model, _map_experts(state["model"], names, _to_local))
    if optimizer is not None:
        optim = state["optim"]
        kept = _step_options(optimizer)
        set_optimizer_state_dict(model, optimizer, {**optim, "state": _map_experts(optim["state"], names, _to_local)})
        _restore_step_options(optimizer, kept)
    return json.loads(state["extra"])


# How the optimizer steps, not what it computes: chosen for this process's layout (e.g.
# avoid_mixed_multi_tensor_steps turns foreach off where FSDP's DTensors meet plain expert
# shards), so a checkpoint from another layout must not bring its own back.
STEP_OPTIONS = ("foreach", "fused")


def _step_options(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: group[k] for k in STEP_OPTIONS if k in group} for group in optimizer.param_groups]


def _restore_step_options(optimizer: torch.optim.Optimizer, kept: list[dict[str, Any]]) -> None:
    for group, options in zip(optimizer.param_groups, kept):
        group.update(options)
