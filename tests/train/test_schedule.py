import math

import pytest
import torch

from moekit.train.schedule import WarmupCosine, build_optimizer


def test_warmup_then_cosine_to_the_floor():
    sched = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert [sched(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert sched(9) == pytest.approx(1.0) and sched(10) == pytest.approx(1.0)
    assert sched(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert sched(110) == pytest.approx(0.1) and sched(500) == pytest.approx(0.1)
    values = [sched(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_longer_than_the_run_is_cut_to_it():
    sched = WarmupCosine(warmup_steps=100, total_steps=4, min_ratio=0.1)
    assert [sched(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=False)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [(3, 4)]
    assert plain["weight_decay"] == 0.0 and sorted(p.numel() for p in plain["params"]) == [3, 3, 3]
