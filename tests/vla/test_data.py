"""Scene cutting (ego-frame geometry on hand-made tracks), the synthetic and highway-env
generators, the held-out split and the .pt cache."""

import math

import numpy as np
import pytest
import torch

from moekit.models.vla import (
    FEATURE,
    NUM_FEATURES,
    CutConfig,
    SceneDataConfig,
    SceneSet,
    Tracks,
    constant_velocity,
    generate,
    highway_env_available,
    load_or_generate,
    scenes_from_tracks,
)

CUT = CutConfig(num_neighbors=3, horizon=4, dt=0.5, history=2)


def _straight_tracks(heading: float) -> Tracks:
    """Three vehicles moving at constant velocity along ``heading``, sampled at 10 Hz for 4 s."""
    rng = np.random.default_rng(0)
    frames, step = 41, 0.1
    t = np.arange(frames) * step
    speeds = rng.uniform(15, 30, 3)
    start = rng.uniform(-30, 30, (3, 2))
    direction = np.array([math.cos(heading), math.sin(heading)])
    position = start[None] + t[:, None, None] * speeds[None, :, None] * direction
    velocity = np.broadcast_to(speeds[None, :, None] * direction, position.shape).copy()
    return Tracks(position, velocity, np.full((frames, 3), heading), y_left=50.0, y_right=-50.0, step=step)


@pytest.mark.parametrize("heading", [0.0, 0.4])
def test_scene_geometry_in_ego_frame(heading):
    tracks = _straight_tracks(heading)
    scenes = scenes_from_tracks(tracks, np.array([10, 15]), np.array([0, 2]), CUT)
    c, s = math.cos(heading), math.sin(heading)
    rot = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)  # world -> ego
    for row, (frame, ego) in enumerate([(10, 0), (15, 2)]):
        p0 = torch.from_numpy(tracks.position[frame, ego])
        speed = float(np.linalg.norm(tracks.velocity[0, ego]))
        # constant velocity along the heading: the future is straight ahead in the ego frame
        ahead = torch.tensor([[speed * 0.5 * k, 0.0] for k in range(1, 5)], dtype=torch.float64)
        torch.testing.assert_close(scenes.target[row].double(), ahead, atol=1e-4, rtol=0)
        tok = scenes.tokens[row]
        assert tok[0, FEATURE["is_ego"]] == 1 and tok[1:, FEATURE["is_ego"]].eq(0).all()
        # the ego's heading is given relative to the road, the others' relative to the ego
        assert tok[0, FEATURE["sin_heading"]].item() == pytest.approx(s, abs=1e-6)
        torch.testing.assert_close(tok[1:3, FEATURE["sin_heading"]], torch.zeros(2), atol=1e-6, rtol=0)
        torch.testing.assert_close(tok[0, [FEATURE["hist1_x"], FEATURE["hist2_x"]]].double(),
                                   torch.tensor([-0.5 * speed, -speed], dtype=torch.float64), atol=1e-4, rtol=0)
        others = [v for v in range(3) if v != ego]
        rel = [(torch.from_numpy(tracks.position[frame, v]) - p0) @ rot.T for v in others]
        order = sorted(range(2), key=lambda i: rel[i].norm().item())
        for slot, i in enumerate(order):
            torch.testing.assert_close(tok[1 + slot, [FEATURE["x"], FEATURE["y"]]].double(), rel[i], atol=1e-4, rtol=0)
            future = torch.from_numpy(tracks.position[[frame + 5 * k for k in range(1, 5)], others[i]])
            torch.testing.assert_close(scenes.others_future[row, slot].double(), (future - p0) @ rot.T,
                                       atol=1e-4, rtol=0)
        # two neighbours exist, the third slot is empty and zeroed
        assert scenes.others_mask[row].tolist() == [True, True, False]
        assert tok[3].eq(0).all() and scenes.others_future[row, 2].eq(0).all()
    # the constant-velocity baseline is exact on constant-velocity tracks
    torch.testing.assert_close(constant_velocity(scenes)[:, 0], scenes.target, atol=1e-3, rtol=0)


def test_scene_cutting_bad_input():
    tracks = _straight_tracks(0.0)
    with pytest.raises(ValueError, match="frame indices must lie in"):
        scenes_from_tracks(tracks, np.array([1]), np.array([0]), CUT)
    with pytest.raises(ValueError, match="not a multiple of the simulation step"):
        scenes_from_tracks(tracks, np.array([20]), np.array([0]), CutConfig(dt=0.25))


def _small(source="synthetic", **kw) -> SceneDataConfig:
    values = dict(source=source, num_train=120, num_val=40, vehicles_per_rollout=12, scenes_per_rollout=40,
                  workers=1, window=3.0)
    return SceneDataConfig(**{**values, **kw})


def test_synthetic_generation_format_and_split():
    config = _small()
    train, val = generate(config, "train"), generate(config, "val")
    assert len(train) == 120 and len(val) == 40
    assert train.tokens.shape[1:] == (9, NUM_FEATURES) and train.target.shape[1:] == (8, 2)
    assert train.meta["source"] == "synthetic"
    # held-out rollouts use other seeds: no scene of one split appears in the other
    assert train.meta["rollout_seeds"][1] <= val.meta["rollout_seeds"][0]
    assert torch.cdist(train.target.flatten(1), val.target.flatten(1)).min() > 1e-3
    # vehicles move forward at highway speeds, and some change lane
    speed = train.tokens[:, 0, FEATURE["vx"]]
    assert speed.min() > 0 and 10 < speed.mean() < 35
    assert (train.target[:, -1, 1].abs() > 1.0).any()
    # same config, same scenes
    torch.testing.assert_close(generate(config, "val").tokens, val.tokens, rtol=0, atol=0)


def test_cache_round_trip_and_corrupt_file(tmp_path):
    config = _small(num_train=40, num_val=40)
    train, val = load_or_generate(config, tmp_path, log=lambda _: None)
    again, _ = load_or_generate(config, tmp_path, log=lambda _: None)
    for name in ("tokens", "target", "others_future", "others_mask"):
        assert torch.equal(getattr(train, name), getattr(again, name))
    assert again.meta == train.meta
    (tmp_path / "bad.pt").write_bytes((tmp_path / "train.pt").read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read"):
        SceneSet.load(tmp_path / "bad.pt")


def test_scene_set_validation():
    config = _small(num_train=40)
    s = generate(config, "train")
    with pytest.raises(ValueError, match="tokens must be"):
        SceneSet(s.tokens[..., :5], s.target, s.others_future, s.others_mask)
    with pytest.raises(ValueError, match="target must be"):
        SceneSet(s.tokens, s.target[:, :, :1], s.others_future, s.others_mask)
    bad = s.target.clone()
    bad[3, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="target holds NaN"):
        SceneSet(s.tokens, bad, s.others_future, s.others_mask)
    with pytest.raises(ValueError, match="unknown key"):
        SceneDataConfig.from_dict({"num_scenes": 3})
    with pytest.raises(ValueError, match="unknown source"):
        SceneDataConfig(source="carla")


@pytest.mark.skipif(not highway_env_available(), reason="highway-env is not installed (pip install 'moekit[vla]')")
def test_highway_env_rollouts():
    config = _small("highway", num_train=40, num_val=20, vehicles_per_rollout=10, scenes_per_rollout=20, window=2.0)
    train, val = generate(config, "train"), generate(config, "val")
    assert len(train) == 40 and len(val) == 20 and train.meta["source"] == "highway"
    speed = train.tokens[:, 0, FEATURE["vx"]]
    assert 10 < speed.mean() < 40
    # lane centres are 4 m apart: every vehicle's distance to the road edges is consistent
    width = train.tokens[:, 0, FEATURE["left_edge"]] + train.tokens[:, 0, FEATURE["right_edge"]]
    assert torch.all(torch.isin(width.round(), torch.tensor([8.0, 12.0, 16.0])))
    # the expert keeps moving forward over the horizon
    assert (train.target[:, 1:, 0] > train.target[:, :-1, 0]).all()


def test_bad_generation_options_are_refused():
    """A negative burn-in left the first recorded frames at (0, 0) (10 of 81 for -1 s) and a
    negative history indexed frames from the end of the rollout (futures up to 67 m behind the
    ego): both made scenes silently."""
    with pytest.raises(ValueError, match="burn_in must be >= 0"):
        _small(burn_in=-1.0)
    for key, value, message in [("history", -2, "history must be an integer >= 0"),
                                ("num_neighbors", -1, "num_neighbors must be an integer >= 0"),
                                ("horizon", 0, "horizon must be a positive integer"),
                                ("dt", 0.0, "dt must be > 0"), ("radius", -5.0, "radius must be > 0")]:
        with pytest.raises(ValueError, match=f"CutConfig: {message}"):
            CutConfig(**{key: value})
    with pytest.raises(ValueError, match="CutConfig: unknown key"):
        _small(cut={"horizon": 8, "future": 4})
