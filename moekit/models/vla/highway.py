"""Expert rollouts from ``highway-env``'s rule-based traffic (IDM car following + MOBIL lane
changes). No gym environment and no rendering: the road and its ``IDMVehicle``s are stepped
directly, and every vehicle (the ego included) drives by the same rule-based policy, so any of
them is an expert demonstrator. Needs the optional ``highway-env`` package."""

from __future__ import annotations

import numpy as np

from moekit.models.vla.scene import LANE_WIDTH
from moekit.models.vla.tracks import Tracks


def highway_env_available() -> bool:
    try:
        import highway_env  # noqa: F401
    except ImportError:
        return False
    return True


def _import():
    try:
        from highway_env.road.road import Road, RoadNetwork
        from highway_env.vehicle.behavior import IDMVehicle
    except ImportError as e:
        raise ImportError("the 'highway' scene source needs highway-env: pip install 'moekit[vla]' "
                          "(or use data.source=synthetic)") from e
    return Road, RoadNetwork, IDMVehicle


def rollout(seed: int, num_vehicles: int, frames: int, burn_in: int, step: float) -> tuple[Tracks, np.ndarray]:
    """Simulate one randomised highway for ``burn_in + frames`` steps of ``step`` seconds and
    record the last ``frames``. Returns the tracks and which vehicles never crashed (only those
    serve as egos: a crashed vehicle is no expert)."""
    Road, RoadNetwork, IDMVehicle = _import()
    rng = np.random.default_rng(seed)
    lanes = int(rng.integers(2, 5))
    speed_limit = float(rng.uniform(25.0, 35.0))
    density = float(rng.uniform(0.8, 1.6))
    road = Road(network=RoadNetwork.straight_road_network(lanes=lanes, speed_limit=speed_limit),
                np_random=np.random.RandomState(seed % 2**32), record_history=False)
    for _ in range(num_vehicles):
        vehicle = IDMVehicle.create_random(road, spacing=1 / density)
        vehicle.randomize_behavior()
        # a spread of desired speeds makes vehicles catch up and overtake (MOBIL lane changes)
        vehicle.target_speed = float(rng.uniform(0.6, 1.05) * speed_limit)
        road.vehicles.append(vehicle)

    position = np.zeros((frames, num_vehicles, 2))
    velocity = np.zeros((frames, num_vehicles, 2))
    heading = np.zeros((frames, num_vehicles))
    for f in range(burn_in + frames):
        road.act()
        road.step(step)
        if f >= burn_in:
            i = f - burn_in
            for j, v in enumerate(road.vehicles):
                position[i, j], velocity[i, j], heading[i, j] = v.position, v.velocity, v.heading
    never_crashed = np.array([not v.crashed for v in road.vehicles])
    half = LANE_WIDTH / 2
    tracks = Tracks(position, velocity, heading, y_left=(lanes - 1) * LANE_WIDTH + half, y_right=-half, step=step)
    return tracks, never_crashed
