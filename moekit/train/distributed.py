"""Multi-process training under torchrun: what the training loop calls at its seams.

``start_runtime(config.parallel, device)`` returns a ``LocalRuntime`` in a plain process and a
``DistributedRuntime`` when torchrun started more than one process. The loop calls the same
methods either way: ``wrap`` (shard experts over "ep", dense params with FSDP2),
``local_batch`` (this rank's rows of the global batch), ``mean`` (global means for logging),
``clip_grad_norm_`` (gradient sync + clipping), ``reduce_load`` (aux-loss-free balancing),
``sum_over_ranks`` (the logged MoE statistics of the global batch) and the checkpoint pair.

Every rank reads the same global batch stream and keeps its own ``batch_size / world`` rows, so
a run computes the same function as one process with the same ``train.batch_size`` (the
Switch/GShard ``aux_loss_coef`` term excepted: it is computed per rank's tokens).

A distributed checkpoint is a normal moekit checkpoint directory (``trainer.pt``,
``config.yaml``, ``manifest.json``) whose model and optimizer state are a
torch.distributed.checkpoint (``.metadata`` + ``*.distcp``) of global tensors, so any world
size, one plain process included, can resume it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moekit.parallel import (
    ParallelConfig,
    avoid_mixed_multi_tensor_steps,
    clip_grad_norm_,
    init_distributed,
    load_checkpoint,
    load_reducer,
    parallelize,
    peer_failure_guard,
    save_checkpoint,
    sync_grads,
)
from moekit.train import checkpoint as ckpt_files
from moekit.train.load import load_model_state

DCP_METADATA = ".metadata"


def is_distributed_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_METADATA).is_file()


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class LocalRuntime:
    """One process: every seam does the plain single-device thing."""

    distributed = False
    rank = 0
    world_size = 1
    is_main = True
    reduce_load: Callable | None = None
    sum_over_ranks: Callable | None = None  # vector -> its sum over ranks (global MoE statistics)

    def __init__(self, device: torch.device):
        self.device = device

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def local_batch(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def mean(self, **values: torch.Tensor) -> dict[str, torch.Tensor]:
        return values

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def save_checkpoint(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        objects: dict[str, Any], files: dict[str, bytes], keep: int) -> Path:
        """``objects`` holds "model" / "optimizer" state dicts next to the loop's own state."""
        return ckpt_files.save_checkpoint(root, step, objects, files, keep)

    def load_state(self, ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Model and optimizer state from a one-process checkpoint, or a distributed one saved at
        any world size."""
        if is_distributed_checkpoint(ckpt):
            load_checkpoint(str(ckpt), model, optimizer)
            return
        load_model_state(model, ckpt)
        optimizer.load_state_dict(ckpt_files.load_object(ckpt, "optimizer", self.device))

    def guard(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


class DistributedRuntime(LocalRuntime):
    """torchrun with WORLD_SIZE > 1: a ("dp", "ep") mesh, expert parallelism, FSDP2."""

    distributed = True

    def __init__(self, config: ParallelConfig, device: torch.device):
        self.config = config
        self.pmesh = init_distributed(config, device.type)
        super().__init__(self.pmesh.device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main = self.rank == 0
        self.reduce_load = load_reducer(self.pmesh)
        self.sum_over_ranks = load_reducer(self.pmesh)  # the same all-reduce (a copy, summed over all ranks)

    def wrap(self, model: nn.Module) -> nn.Module:
        return parallelize(model, self.pmesh, self.config, blocks=getattr(model, "layers", ()))

    def local_batch(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[0] % self.world_size:
            raise ValueError(f"train.batch_size ({ids.shape[0]}) must be divisible by the number of "
                             f"processes ({self.world_size}): each rank takes an equal share of the batch")
        return ids.chunk(self.world_size)[self.rank]

    def mean(self, **values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Means over all ranks in one all-reduce (each rank holds an equal share of the batch)."""
        stacked = torch.stack([v.detach().float() for v in values.values()])
        dist.all_reduce(stacked, group=self.pmesh.world_group)
        return dict(zip(values, stacked / self.world_size))

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        sync_grads(model, self.pmesh)
        return clip_grad_norm_(model, max_norm, self.pmesh)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        avoid_mixed_multi_tensor_steps(optimizer)
        return optimizer

    def load_state(self, ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not is_distributed_checkpoint(ckpt):
            raise ckpt_files.CheckpointError(
                f"{ckpt} was saved by one process; a multi-process run resumes only from a distributed "
                "checkpoint (resume it in one process, or start the multi-process run afresh)")
        load_checkpoint(str(ckpt), model, optimizer, self.pmesh)

    def save_checkpoint(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        objects: dict[str, Any], files: dict[str, bytes], keep: int) -> Path:
        """Every rank writes its shards of the model and optimizer (``objects``' own "model" /
        "optimizer" entries, sharded state dicts, are not used); rank 0 adds the other
        ``objects`` and ``files``, the manifest, and moves the directory into place as
        ``moekit.train.checkpoint.save_checkpoint`` does (a crash leaves ``latest`` on the
        previous complete checkpoint)."""
        objects = {k: v for k, v in objects.items() if k not in ("model", "optimizer")}
        root = Path(root)
        tmp = ckpt_files.tmp_path(root, step, "dist")
        if self.is_main:
            ckpt_files.start_tmp_dir(tmp)
        dist.barrier(group=self.pmesh.world_group)
        save_checkpoint(str(tmp), model, optimizer, self.pmesh)
        dist.barrier(group=self.pmesh.world_group)
        if self.is_main:
            ckpt_files.write_checkpoint_files(tmp, step, objects, files)
            ckpt_files.publish(root, tmp, step, keep)
        dist.barrier(group=self.pmesh.world_group)
        return root / ckpt_files.step_name(step)

    def guard(self):
        """Turn a dead or stalled peer into a clear ``PeerFailure`` instead of a hang."""
        return peer_failure_guard(self.config.timeout_s)

    def close(self) -> None:
        """Leave together: a rank tearing its connections down while a peer still uses them
        can abort that peer."""
        if dist.is_initialized():
            dist.barrier(group=self.pmesh.world_group)
            dist.destroy_process_group()


def start_runtime(config: ParallelConfig, device: torch.device) -> LocalRuntime:
    """``DistributedRuntime`` when torchrun launched several processes, else ``LocalRuntime``.

    ``parallel.ep`` > 1 (or ``parallel.dp`` > 1) in a single process is refused: there is nobody to
    share experts (or the batch) with."""
    world = launched_world_size()
    if world > 1:
        config.validate(world)
        return DistributedRuntime(config, device)
    if config.ep > 1:
        raise ValueError(f"parallel.ep={config.ep} needs {config.ep} processes or a multiple: launch with "
                         f"torchrun --nproc-per-node {config.ep} -m moekit.cli train ..., or set parallel.ep=1 "
                         "(e.g. to resume a multi-process checkpoint in one process)")
    config.validate(world)  # e.g. parallel.dp=2 without torchrun: refused, not one process in silence
    return LocalRuntime(device)


class NullMetricsWriter:
    """What ranks other than 0 write metrics to: nothing (rank 0 logs the global means)."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
