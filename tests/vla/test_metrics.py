"""Trajectory metrics against a per-scene loop reference, collisions on placed boxes, and the
constant-velocity baseline."""

import math

import pytest
import torch

from moekit.models.vla import FEATURE, NUM_FEATURES, SceneSet, collisions, constant_velocity, trajectory_metrics


def _random_scenes(s=7, n=3, h=8, seed=0) -> SceneSet:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(s, 1 + n, NUM_FEATURES, generator=g)
    target = torch.cumsum(torch.rand(s, h, 2, generator=g) * torch.tensor([10.0, 0.5]), dim=1)
    others = torch.randn(s, n, h, 2, generator=g) * 30
    mask = torch.rand(s, n, generator=g) > 0.3
    return SceneSet(tokens, target, others, mask)


def _reference(pred, scenes, threshold=2.0):
    ade, fde, min_ade, min_fde, misses = [], [], [], [], 0
    for i in range(pred.shape[0]):
        per_ade, per_fde = [], []
        for k in range(pred.shape[1]):
            d = [math.dist(pred[i, k, j].tolist(), scenes.target[i, j].tolist()) for j in range(pred.shape[2])]
            per_ade.append(sum(d) / len(d))
            per_fde.append(d[-1])
        ade += per_ade
        fde += per_fde
        min_ade.append(min(per_ade))
        min_fde.append(min(per_fde))
        misses += min(per_fde) > threshold
    mean = lambda v: sum(v) / len(v)
    return {"ADE": mean(ade), "FDE": mean(fde), "minADE": mean(min_ade), "minFDE": mean(min_fde),
            "miss_rate": misses / pred.shape[0]}


@pytest.mark.parametrize("k", [1, 6])
def test_displacement_metrics_match_loop_reference(k):
    scenes = _random_scenes()
    g = torch.Generator().manual_seed(k)
    noise = 2.0 if k == 1 else 5.0  # the best of 6 is closer: more noise keeps some misses
    pred = scenes.target[:, None] + torch.randn(len(scenes), k, 8, 2, generator=g) * noise
    got, want = trajectory_metrics(pred, scenes), _reference(pred.double(), scenes)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert got["K"] == k
    assert 0 < got["miss_rate"] < 1  # the noise level puts some scenes on each side


def test_collisions_on_placed_boxes():
    h = 4
    pred = torch.zeros(2, 2, h, 2)
    pred[:, :, :, 0] = torch.arange(1, h + 1) * 10.0                  # both scenes: straight ahead, 10 m / step
    pred[:, 1, :, 1] = 3.0                                           # sample 1 drives 3 m to the left
    others = torch.full((2, 2, h, 2), 500.0)
    others[0, 0, 2] = torch.tensor([34.9, -1.9])                     # overlaps sample 0 at step 2 (gaps 4.9, 1.9)
    others[1, 0, 3] = torch.tensor([40.0, 5.1])                      # 2.1 m from sample 1 sideways: clear
    others[1, 1, 1] = torch.tensor([20.0, 3.5])                      # hits sample 1 but this slot is empty
    mask = torch.tensor([[True, True], [True, False]])
    assert collisions(pred, others, mask).tolist() == [[True, False], [False, False]]
    mask[1, 1] = True
    assert collisions(pred, others, mask).tolist() == [[True, False], [False, True]]
    tokens = torch.randn(2, 3, NUM_FEATURES)
    scenes = SceneSet(tokens, pred[:, 0].clone(), others, mask)
    assert trajectory_metrics(pred, scenes)["collision_rate"] == pytest.approx(0.5)


def test_constant_velocity_baseline():
    scenes = _random_scenes()
    vel = scenes.tokens[:, 0, [FEATURE["vx"], FEATURE["vy"]]]
    cv = constant_velocity(scenes)
    assert cv.shape == (len(scenes), 1, 8, 2)
    for i in range(len(scenes)):
        for j in range(8):
            torch.testing.assert_close(cv[i, 0, j], vel[i] * 0.5 * (j + 1))


def test_bad_predictions():
    scenes = _random_scenes()
    with pytest.raises(ValueError, match=r"predictions must be \[7, K, 8, 2\]"):
        trajectory_metrics(torch.zeros(7, 8, 2), scenes)
    bad = scenes.target[:, None].clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        trajectory_metrics(bad, scenes)
