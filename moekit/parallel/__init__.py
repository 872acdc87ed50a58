"""Expert parallelism and multi-process training on torch.distributed.

``init_distributed`` joins the process group (torchrun) and builds the ("dp", "ep") mesh;
``parallelize`` shards the experts over "ep" (all-to-all dispatch) and the dense params with
FSDP2; ``sync_grads`` reduces what FSDP2 does not; ``load_reducer`` feeds aux-loss-free
balancing; ``save_checkpoint`` / ``load_checkpoint`` use torch.distributed.checkpoint.
"""

from moekit.parallel.checkpoint import DistributedCheckpointError, load_checkpoint, save_checkpoint
from moekit.parallel.config import ParallelConfig
from moekit.parallel.data_parallel import (
    apply_fsdp,
    avoid_mixed_multi_tensor_steps,
    clip_grad_norm_,
    grad_norm,
    load_reducer,
    sync_grads,
)
from moekit.parallel.expert_parallel import (
    AllToAllDispatcher,
    ExpertShard,
    expert_parameters,
    moe_layers,
    shard_experts,
)
from moekit.parallel.failure import PeerFailure, peer_failure_guard
from moekit.parallel.mesh import ParallelMesh, build_mesh, init_distributed
from moekit.parallel.parallelize import parallelize

__all__ = [
    "AllToAllDispatcher",
    "DistributedCheckpointError",
    "ExpertShard",
    "ParallelConfig",
    "ParallelMesh",
    "PeerFailure",
    "apply_fsdp",
    "avoid_mixed_multi_tensor_steps",
    "build_mesh",
    "clip_grad_norm_",
    "expert_parameters",
    "grad_norm",
    "init_distributed",
    "load_checkpoint",
    "load_reducer",
    "moe_layers",
    "parallelize",
    "peer_failure_guard",
    "save_checkpoint",
    "shard_experts",
    "sync_grads",
]
