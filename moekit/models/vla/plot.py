"""A PNG of sampled trajectories over a few scenes: road edges, neighbours (box now, dots for
their recorded future), the expert's future, the K flow samples and the baselines."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from moekit.models.vla.scene import FEATURE, LANE_WIDTH, VEHICLE_LENGTH, VEHICLE_WIDTH, SceneSet  # noqa: E402


def plot_scenes(scenes: SceneSet, samples: torch.Tensor, path: str | Path,
                baselines: dict[str, torch.Tensor] | None = None, title: str = "") -> Path:
    """One panel per scene of ``scenes``; samples [S, K, H, 2]; baselines name -> [S, 1, H, 2]."""
    s = len(scenes)
    if samples.dim() != 4 or samples.shape[0] != s:
        raise ValueError(f"plot_scenes: samples must be [{s}, K, H, 2], got {tuple(samples.shape)}")
    fig, axes = plt.subplots(s, 1, figsize=(11, 2.4 * s), squeeze=False)
    colors = {"constant velocity": "tab:orange", "regression": "tab:purple"}
    for i, ax in enumerate(axes[:, 0]):
        ego = scenes.tokens[i, 0]
        x_max = float(max(scenes.target[i, :, 0].max(), samples[i, :, :, 0].max())) + 10
        x_min = -15.0
        left, right = float(ego[FEATURE["left_edge"]]), -float(ego[FEATURE["right_edge"]])
        # road lines are straight in the road frame: tilt them by the ego's heading to the road
        cos_h, sin_h = float(ego[FEATURE["cos_heading"]]), float(ego[FEATURE["sin_heading"]])
        along = torch.tensor([x_min, x_max])
        for k in range(round((left - right) / LANE_WIDTH) + 1):
            offset = right + k * LANE_WIDTH
            edge = k == 0 or offset >= left - 1e-3
            ax.plot(offset * sin_h + along * cos_h, offset * cos_h - along * sin_h, color="black" if edge else "gray",
                    lw=1 if edge else 0.6, ls="-" if edge else (0, (6, 6)))
        for j in range(scenes.num_neighbors):
            if not scenes.others_mask[i, j]:
                continue
            x, y = scenes.tokens[i, 1 + j, FEATURE["x"]].item(), scenes.tokens[i, 1 + j, FEATURE["y"]].item()
            ax.add_patch(Rectangle((x - VEHICLE_LENGTH / 2, y - VEHICLE_WIDTH / 2), VEHICLE_LENGTH, VEHICLE_WIDTH,
                                   color="tab:gray", alpha=0.6))
            fut = scenes.others_future[i, j]
            ax.plot(fut[:, 0], fut[:, 1], ".", color="tab:gray", ms=3)
        ax.add_patch(Rectangle((-VEHICLE_LENGTH / 2, -VEHICLE_WIDTH / 2), VEHICLE_LENGTH, VEHICLE_WIDTH,
                               color="tab:green", alpha=0.8))
        for k in range(samples.shape[1]):
            traj = torch.cat([samples.new_zeros(1, 2), samples[i, k]])
            ax.plot(traj[:, 0], traj[:, 1], "-", color="tab:blue", lw=0.8, alpha=0.5,
                    label="flow samples" if k == 0 else None)
        for name, pred in (baselines or {}).items():
            traj = torch.cat([pred.new_zeros(1, 2), pred[i, 0]])
            ax.plot(traj[:, 0], traj[:, 1], "--", color=colors.get(name, "tab:brown"), lw=1.2, label=name)
        truth = torch.cat([scenes.target.new_zeros(1, 2), scenes.target[i]])
        ax.plot(truth[:, 0], truth[:, 1], "o-", color="tab:red", lw=1.5, ms=3, label="expert")
        ax.set_xlim(x_min, x_max)
        ys = torch.cat([samples[i, :, :, 1].flatten(), scenes.target[i, :, 1], torch.tensor([left, right])])
        ax.set_ylim(float(ys.min()) - 1, float(ys.max()) + 1)
        ax.set_ylabel("y (m)")
        if i == 0:
            ax.legend(loc="upper left", fontsize=7, ncol=4)
            ax.set_title(title)
    axes[-1, 0].set_xlabel("x (m), ego frame")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
