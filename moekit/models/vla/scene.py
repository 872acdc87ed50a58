"""The driving-scene data format shared by the generators, the model and the metrics.

One scene is one ego vehicle at one instant, everything in the ego frame (origin at the ego's
centre, x along its heading, y to its left, metres and m/s):

- ``tokens``        [S, 1 + N, F] float32: token 0 is the ego, tokens 1..N its N nearest
  other vehicles (nearest first); the F features are named in ``TOKEN_FEATURES``.
- ``target``        [S, H, 2] the ego's future (x, y) at ``dt``, 2 dt, ..., H dt seconds.
- ``others_future`` [S, N, H, 2] the recorded future positions of the N neighbours.
- ``others_mask``   [S, N] bool, which neighbour slots hold a vehicle.

Absent neighbours have all-zero features and ``present == 0``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.models.checkpoint import write_replacing

TOKEN_FEATURES = (
    "is_ego",      # 1 for the ego token
    "present",     # 1 for a real vehicle
    "x", "y",      # position in the ego frame
    "vx", "vy",    # velocity in the ego frame
    "cos_heading", "sin_heading",  # heading relative to the ego's; the ego's own: relative to the road
    "left_edge", "right_edge",     # lateral distance to the road's left / right edge
    "hist1_x", "hist1_y",          # ego only: its position dt seconds ago
    "hist2_x", "hist2_y",          # ego only: its position 2 dt seconds ago
)
NUM_FEATURES = len(TOKEN_FEATURES)
FEATURE = {name: i for i, name in enumerate(TOKEN_FEATURES)}

VEHICLE_LENGTH = 5.0  # metres (highway-env's vehicles; the synthetic ones match)
VEHICLE_WIDTH = 2.0
LANE_WIDTH = 4.0  # metres between lane centres (highway-env's; the synthetic road matches)


@dataclass
class SceneSet:
    """A set of scenes (see the module docstring); ``meta`` says how it was generated."""

    tokens: torch.Tensor
    target: torch.Tensor
    others_future: torch.Tensor
    others_mask: torch.Tensor
    dt: float = 0.5
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        t, y, of, om = self.tokens, self.target, self.others_future, self.others_mask
        if t.dim() != 3 or t.shape[-1] != NUM_FEATURES or t.shape[1] < 1:
            raise ValueError(f"SceneSet: tokens must be [S, 1 + N, {NUM_FEATURES}], got {tuple(t.shape)}")
        s, n = t.shape[0], t.shape[1] - 1
        if y.dim() != 3 or y.shape[0] != s or y.shape[2] != 2 or y.shape[1] < 1:
            raise ValueError(f"SceneSet: target must be [{s}, H, 2], got {tuple(y.shape)}")
        if of.shape != (s, n, y.shape[1], 2):
            raise ValueError(f"SceneSet: others_future must be {(s, n, y.shape[1], 2)}, got {tuple(of.shape)}")
        if om.shape != (s, n) or om.dtype != torch.bool:
            raise ValueError(f"SceneSet: others_mask must be a bool tensor {(s, n)}, got {om.dtype} {tuple(om.shape)}")
        for name in ("tokens", "target", "others_future"):
            value = getattr(self, name)
            if not value.is_floating_point():
                raise ValueError(f"SceneSet: {name} must be floating point, got {value.dtype}")
            if not torch.isfinite(value).all():
                raise ValueError(f"SceneSet: {name} holds NaN or inf")
        if not self.dt > 0:
            raise ValueError(f"SceneSet: dt must be > 0, got {self.dt}")

    @property
    def num_scenes(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_neighbors(self) -> int:
        return self.tokens.shape[1] - 1

    @property
    def horizon(self) -> int:
        return self.target.shape[1]

    def __len__(self) -> int:
        return self.num_scenes

    def subset(self, index: torch.Tensor | slice) -> SceneSet:
        return SceneSet(self.tokens[index], self.target[index], self.others_future[index],
                        self.others_mask[index], self.dt, dict(self.meta))

    def to(self, device) -> SceneSet:
        return SceneSet(self.tokens.to(device), self.target.to(device), self.others_future.to(device),
                        self.others_mask.to(device), self.dt, dict(self.meta))

    def ego_velocity(self) -> torch.Tensor:
        """[S, 2] the ego's current velocity (vx, vy) in its own frame."""
        return self.tokens[:, 0, [FEATURE["vx"], FEATURE["vy"]]]

    # --- files -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"tokens": self.tokens, "target": self.target, "others_future": self.others_future,
                 "others_mask": self.others_mask, "dt": self.dt, "meta": json.dumps(self.meta),
                 "features": list(TOKEN_FEATURES)}
        write_replacing(path, lambda tmp: torch.save(state, tmp))  # never a half-written cache under the real name

    @classmethod
    def load(cls, path: str | Path) -> SceneSet:
        path = Path(path)
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a truncated or foreign file
            raise ValueError(f"SceneSet: cannot read {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"SceneSet: {path} does not hold a scene set")
        missing = sorted({"tokens", "target", "others_future", "others_mask", "dt", "meta", "features"} - set(raw))
        if missing:
            raise ValueError(f"SceneSet: {path} lacks {missing}")
        if tuple(raw["features"]) != TOKEN_FEATURES:
            raise ValueError(f"SceneSet: {path} has token features {raw['features']}, expected {list(TOKEN_FEATURES)}")
        return cls(raw["tokens"], raw["target"], raw["others_future"], raw["others_mask"], float(raw["dt"]),
                   json.loads(raw["meta"]))


def concat(sets: list[SceneSet]) -> SceneSet:
    if not sets:
        raise ValueError("concat: no scene sets")
    return SceneSet(torch.cat([s.tokens for s in sets]), torch.cat([s.target for s in sets]),
                    torch.cat([s.others_future for s in sets]), torch.cat([s.others_mask for s in sets]),
                    sets[0].dt, dict(sets[0].meta))
