"""A small vectorised traffic simulator with the highway source's output: vehicles on a
straight multi-lane road follow the vehicle ahead (an IDM-like rule) and change lane when
blocked and a neighbouring lane has room. No dependency beyond numpy; tests and quick runs use it."""

from __future__ import annotations

import numpy as np

from moekit.models.vla.scene import LANE_WIDTH
from moekit.models.vla.tracks import Tracks

TIME_GAP = 1.5      # s, desired headway
MIN_GAP = 10.0      # m, desired bumper-to-bumper gap at standstill (vehicle length included)
MAX_ACCEL = 3.0     # m/s^2
COMFORT_BRAKE = 5.0  # m/s^2
LATERAL_SPEED = 1.5  # m/s, most while changing lane
LATERAL_GAIN = 1.0   # 1/s, lateral velocity per metre off the lane centre


def _gaps(x: np.ndarray, lane: np.ndarray, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """For each vehicle and each lane: distance to and index of the nearest vehicle ahead in that lane."""
    ahead = x[None, :] - x[:, None]                                  # [V, V] x_j - x_i
    same_lane = lane[None, None, :] == np.arange(lanes)[:, None, None]  # [L, 1, V]
    candidate = np.where(same_lane & (ahead[None] > 0), ahead[None], np.inf)  # [L, V, V]
    idx = candidate.argmin(-1)                                       # [L, V]
    gap = np.take_along_axis(candidate, idx[..., None], -1)[..., 0]
    return gap.T, idx.T                                              # [V, L]


def rollout(seed: int, num_vehicles: int, frames: int, burn_in: int, step: float) -> tuple[Tracks, np.ndarray]:
    rng = np.random.default_rng(seed)
    lanes = int(rng.integers(2, 5))
    lane = rng.integers(0, lanes, num_vehicles)
    # per lane, vehicles one after another with 25-60 m between them
    x = np.zeros(num_vehicles)
    for k in range(lanes):
        ids = np.flatnonzero(lane == k)
        x[ids] = np.cumsum(rng.uniform(25.0, 60.0, len(ids)))
    y = lane * LANE_WIDTH
    v_desired = rng.uniform(18.0, 32.0, num_vehicles)
    v = v_desired * rng.uniform(0.8, 1.0, num_vehicles)
    rows = np.arange(num_vehicles)

    position = np.zeros((frames, num_vehicles, 2))
    velocity = np.zeros((frames, num_vehicles, 2))
    for f in range(burn_in + frames):
        gap, front = _gaps(x, lane, lanes)
        own_gap, own_front = gap[rows, lane], front[rows, lane]
        safe = MIN_GAP + v * TIME_GAP
        front_v = np.where(np.isfinite(own_gap), v[own_front], v_desired)
        # IDM: desired gap grows with speed and with the closing speed
        wanted = safe + v * (v - front_v) / (2 * np.sqrt(MAX_ACCEL * COMFORT_BRAKE))
        accel = MAX_ACCEL * (1 - (v / v_desired) ** 4)
        accel -= np.where(np.isfinite(own_gap), MAX_ACCEL * (np.maximum(wanted, 0) / np.maximum(own_gap, 1.0)) ** 2,
                          0.0)
        # blocked by a slower vehicle: move to a neighbouring lane with room ahead and behind
        settled = np.abs(y - lane * LANE_WIDTH) < 0.1
        blocked = settled & (own_gap < 2 * safe) & (front_v < v_desired - 2.0)
        for side in rng.permutation([-1, 1]):
            target = lane + side
            ok = blocked & (target >= 0) & (target < lanes)
            tgt = np.clip(target, 0, lanes - 1)
            behind = np.where((lane[None, :] == tgt[:, None]) & (x[None, :] <= x[:, None]),
                              x[:, None] - x[None, :], np.inf).min(1)
            room = (gap[rows, tgt] > safe) & (behind > MIN_GAP + 5.0)
            change = ok & room
            lane = np.where(change, tgt, lane)
            blocked &= ~change
        vy = np.clip(LATERAL_GAIN * (lane * LANE_WIDTH - y), -LATERAL_SPEED, LATERAL_SPEED)
        v = np.maximum(v + np.clip(accel, -8.0, MAX_ACCEL) * step, 0.0)
        x, y = x + v * step, y + vy * step
        if f >= burn_in:
            i = f - burn_in
            position[i, :, 0], position[i, :, 1] = x, y
            velocity[i, :, 0], velocity[i, :, 1] = v, vy
    heading = np.arctan2(velocity[..., 1], np.maximum(velocity[..., 0], 1e-3))
    half = LANE_WIDTH / 2
    tracks = Tracks(position, velocity, heading, y_left=(lanes - 1) * LANE_WIDTH + half, y_right=-half, step=step)
    return tracks, np.ones(num_vehicles, bool)
