"""K-means trajectory anchors: the cluster centres of the (normalised) training trajectories,
the modes of the anchor prior (as truncated-diffusion driving planners use)."""

from __future__ import annotations

import torch


def kmeans(points: torch.Tensor, k: int, iterations: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm with k-means++ seeding on [N, D] points. Returns (centres [k, D],
    fraction of the points in each cluster [k])."""
    if points.dim() != 2:
        raise ValueError(f"kmeans: points must be [N, D], got {tuple(points.shape)}")
    if not 1 <= k <= points.shape[0]:
        raise ValueError(f"kmeans: k must be in [1, {points.shape[0]}] (the number of points), got {k}")
    points = points.double()
    gen = torch.Generator().manual_seed(seed)
    centres = points[torch.randint(points.shape[0], (1,), generator=gen)]
    for _ in range(1, k):
        d2 = torch.cdist(points, centres).min(1).values.square()
        # fewer distinct points than k: every point is already a centre (d2 all 0, and 0 / 0 would
        # be NaN); repeat one, whose cluster stays empty and gets weight 0 (never drawn by the prior)
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2)
        centres = torch.cat([centres, points[torch.multinomial(probs, 1, generator=gen)]])
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        # an emptied cluster keeps its old centre rather than becoming NaN
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    counts = torch.bincount(torch.cdist(points, centres).argmin(1), minlength=k)
    return centres.float(), (counts.double() / points.shape[0]).float()
