"""Cut scenes out of simulated traffic: every generator records ``Tracks`` and calls
``scenes_from_tracks``, so the simulator and the synthetic generator give the same format."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moekit.models.vla.scene import FEATURE, NUM_FEATURES, SceneSet
from moekit.validation import check_known_keys, is_int


@dataclass
class Tracks:
    """All vehicles of one rollout sampled every ``step`` seconds, in the road frame (x along
    the road, y to the left; heading 0 is along the road). position / velocity [T, V, 2], heading [T, V] radians;
    the road spans y_right <= y <= y_left."""

    position: np.ndarray
    velocity: np.ndarray
    heading: np.ndarray
    y_left: float
    y_right: float
    step: float


@dataclass
class CutConfig:
    num_neighbors: int = 8
    horizon: int = 8          # future points
    dt: float = 0.5           # seconds between future points (2 Hz)
    history: int = 2          # past ego points in the ego token (``hist1``, ``hist2``)
    radius: float = 100.0     # neighbours farther than this are left out (metres)

    def __post_init__(self) -> None:
        # a negative history or horizon indexes frames from the end of a rollout: garbage, silently
        for name, low in (("num_neighbors", 0), ("horizon", 1), ("history", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                what = "a positive integer" if low else "an integer >= 0"
                raise ValueError(f"CutConfig: {name} must be {what}, got {value!r}")
        for name in ("dt", "radius"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CutConfig: {name} must be > 0, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict) -> CutConfig:
        check_known_keys(cls, values)
        return cls(**values)


def _rotate(xy: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate [..., 2] by -angle (world -> ego frame); angle broadcasts over the leading axes."""
    c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]
    x, y = xy[..., :1], xy[..., 1:]
    return np.concatenate([c * x + s * y, -s * x + c * y], axis=-1)


def valid_times(tracks: Tracks, cut: CutConfig) -> range:
    """Frame indices with enough history and future for a scene."""
    stride = _stride(tracks, cut)
    return range(cut.history * stride, tracks.position.shape[0] - cut.horizon * stride)


def _stride(tracks: Tracks, cut: CutConfig) -> int:
    stride = round(cut.dt / tracks.step)
    if stride < 1 or abs(stride * tracks.step - cut.dt) > 1e-6:
        raise ValueError(f"scene dt {cut.dt} s is not a multiple of the simulation step {tracks.step} s")
    return stride


def scenes_from_tracks(tracks: Tracks, times: np.ndarray, egos: np.ndarray, cut: CutConfig) -> SceneSet:
    """One scene per (times[i], egos[i]) pair: frame index and ego vehicle index."""
    times, egos = np.asarray(times, dtype=np.int64), np.asarray(egos, dtype=np.int64)
    stride = _stride(tracks, cut)
    allowed = valid_times(tracks, cut)
    if times.shape != egos.shape or times.ndim != 1:
        raise ValueError("scenes_from_tracks: times and egos must be 1-D arrays of one length")
    if len(times) and (times.min() < allowed.start or times.max() >= allowed.stop):
        raise ValueError(f"scenes_from_tracks: frame indices must lie in [{allowed.start}, {allowed.stop})")
    pos, vel, head = tracks.position, tracks.velocity, tracks.heading
    s, n, h = len(times), cut.num_neighbors, cut.horizon
    v_count = pos.shape[1]

    p0 = pos[times, egos]                      # [S, 2]
    h0 = head[times, egos]                     # [S]
    rel = _rotate(pos[times] - p0[:, None], h0[:, None])         # [S, V, 2] everyone now, ego frame
    dist = np.linalg.norm(rel, axis=-1)
    dist[np.arange(s), egos] = np.inf
    dist[dist > cut.radius] = np.inf
    order = np.argsort(dist, axis=1, kind="stable")[:, :n]       # nearest first
    if order.shape[1] < n:                                         # fewer vehicles than slots
        order = np.concatenate([order, np.zeros((s, n - order.shape[1]), np.int64)], axis=1)
    present = np.isfinite(np.take_along_axis(dist, order, axis=1)) if v_count > 1 else np.zeros((s, n), bool)
    present &= np.arange(n)[None] < v_count - 1

    tokens = np.zeros((s, 1 + n, NUM_FEATURES), np.float32)
    rows = np.arange(s)[:, None]
    ids = np.concatenate([egos[:, None], order], axis=1)           # [S, 1+N] vehicle of each token
    tokens[:, :, FEATURE["present"]] = np.concatenate([np.ones((s, 1), bool), present], axis=1)
    tokens[:, 0, FEATURE["is_ego"]] = 1.0
    tokens[:, :, [FEATURE["x"], FEATURE["y"]]] = rel[rows, ids]
    tokens[:, :, [FEATURE["vx"], FEATURE["vy"]]] = _rotate(vel[times][rows, ids], h0[:, None])
    dh = head[times][rows, ids] - h0[:, None]
    dh[:, 0] = h0  # the ego's heading relative to the road (its heading relative to itself is always 0)
    tokens[:, :, FEATURE["cos_heading"]] = np.cos(dh)
    tokens[:, :, FEATURE["sin_heading"]] = np.sin(dh)
    y_world = pos[times][rows, ids][..., 1]
    tokens[:, :, FEATURE["left_edge"]] = tracks.y_left - y_world
    tokens[:, :, FEATURE["right_edge"]] = y_world - tracks.y_right
    for k in range(1, cut.history + 1):
        past = _rotate(pos[times - k * stride, egos] - p0, h0)
        cols = [FEATURE[f"hist{k}_x"], FEATURE[f"hist{k}_y"]]
        tokens[:, 0, cols] = past
    tokens[:, 1:][~present] = 0.0

    future_idx = times[:, None] + stride * np.arange(1, h + 1)[None]   # [S, H]
    target = _rotate(pos[future_idx, egos[:, None]] - p0[:, None], h0[:, None])
    others = pos[future_idx[:, None, :], order[:, :, None]]             # [S, N, H, 2]
    others_future = _rotate(others - p0[:, None, None], h0[:, None, None])
    others_future[~present] = 0.0
    return SceneSet(torch.from_numpy(tokens), torch.from_numpy(target.astype(np.float32)),
                    torch.from_numpy(others_future.astype(np.float32)), torch.from_numpy(present),
                    dt=cut.dt)


def sample_pairs(tracks: Tracks, cut: CutConfig, count: int, every: float, rng: np.random.Generator):
    """``count`` distinct (frame, ego) pairs at frames ``every`` seconds apart (fewer if the
    rollout holds fewer)."""
    frames = np.array(valid_times(tracks, cut))[:: max(1, round(every / tracks.step))]
    pairs = np.stack(np.meshgrid(frames, np.arange(tracks.position.shape[1]), indexing="ij"), -1).reshape(-1, 2)
    pick = rng.choice(len(pairs), size=min(count, len(pairs)), replace=False)
    return pairs[pick, 0], pairs[pick, 1]
