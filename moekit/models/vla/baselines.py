"""The constant-velocity baseline: keep the ego's current velocity for the whole horizon."""

from __future__ import annotations

import torch

from moekit.models.vla.scene import SceneSet


def constant_velocity(scenes: SceneSet) -> torch.Tensor:
    """[S, 1, H, 2] the ego's position k * dt seconds ahead at its current velocity."""
    times = scenes.dt * torch.arange(1, scenes.horizon + 1, dtype=scenes.target.dtype)
    return (times[None, :, None] * scenes.ego_velocity()[:, None, :])[:, None]
