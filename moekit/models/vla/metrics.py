"""Trajectory metrics over K predicted trajectories per scene (all distances in metres).

- ADE / FDE: average / final displacement of a predicted trajectory, averaged over the K
  samples (the expected error of one sample).
- minADE_K / minFDE_K: the best of the K samples per scene.
- miss rate: fraction of scenes whose best final displacement exceeds ``miss_threshold``.
- collision rate: fraction of predicted trajectories whose ego box overlaps a neighbour's box
  at the neighbour's recorded position at some future step (boxes axis-aligned in the ego
  frame; every vehicle VEHICLE_LENGTH x VEHICLE_WIDTH).
"""

from __future__ import annotations

import torch

from moekit.models.vla.scene import VEHICLE_LENGTH, VEHICLE_WIDTH, SceneSet


def collisions(pred: torch.Tensor, others_future: torch.Tensor, others_mask: torch.Tensor) -> torch.Tensor:
    """[S, K] bool: does trajectory k of scene s hit a recorded neighbour? pred [S, K, H, 2]."""
    gap = (pred[:, :, None] - others_future[:, None]).abs()          # [S, K, N, H, 2]
    overlap = (gap[..., 0] < VEHICLE_LENGTH) & (gap[..., 1] < VEHICLE_WIDTH)
    overlap &= others_mask[:, None, :, None]
    return overlap.flatten(2).any(-1)


def trajectory_metrics(pred: torch.Tensor, scenes: SceneSet, miss_threshold: float = 2.0) -> dict[str, float]:
    """pred [S, K, H, 2] for ``scenes``; returns the metrics of the module docstring."""
    target = scenes.target
    if pred.dim() != 4 or pred.shape[0] != target.shape[0] or tuple(pred.shape[2:]) != tuple(target.shape[1:]):
        raise ValueError(f"trajectory_metrics: predictions must be [{target.shape[0]}, K, {target.shape[1]}, 2], "
                         f"got {tuple(pred.shape)}")
    if not torch.isfinite(pred).all():
        raise ValueError("trajectory_metrics: predictions hold NaN or inf")
    pred = pred.double()
    dist = (pred - target.double()[:, None]).norm(dim=-1)            # [S, K, H]
    ade, fde = dist.mean(-1), dist[..., -1]
    min_fde = fde.min(1).values
    hit = collisions(pred, scenes.others_future.double(), scenes.others_mask)
    return {
        "ADE": ade.mean().item(),
        "FDE": fde.mean().item(),
        "minADE": ade.min(1).values.mean().item(),
        "minFDE": min_fde.mean().item(),
        "miss_rate": (min_fde > miss_threshold).double().mean().item(),
        "collision_rate": hit.double().mean().item(),
        "K": pred.shape[1],
    }
