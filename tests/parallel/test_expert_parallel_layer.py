"""The expert-parallel MoE layer (2 ranks, gloo) equals the single-process layer on each rank's tokens."""

import json

import pytest
import torch

from moekit.parallel import sort_assignments

EP_CASES = ["softmax_shared_gate", "sigmoid_groups", "sigmoid_groups_capacity", "softmax_capacity_position",
            "expert_choice", "skewed_to_rank0"]


def test_ep_layer_matches_single_process(launch, tmp_path):
    out = str(tmp_path / "layer")
    launch("layer", 2, {"out": out})
    for rank in range(2):
        with open(f"{out}.{rank}.json") as f:
            result = json.load(f)
        for case in EP_CASES:
            errs = result[case]
            for key, value in errs.items():
                if key == "out" or (key.startswith("grad_") and not key.endswith("_norm")):
                    assert value < 1e-5, f"rank {rank} {case}: {key} relative error {value}"
        # The cases exercise what they claim to.
        assert result["sigmoid_groups_capacity"]["dropped_fraction"] > 0.05
        assert result["softmax_capacity_position"]["dropped_fraction"] > 0.05
        assert "grad_shared_gate" in result["softmax_shared_gate"]
        skewed = result["skewed_to_rank0"]
        if rank == 1:  # rank 1 holds experts 4..7, which no token chose
            assert skewed["grad_w_up_norm"] == 0.0
        else:
            assert skewed["grad_w_up_norm"] > 0.0
        assert "not divisible by ep=2" in result["indivisible_error"]


@pytest.mark.parametrize("tokens,top_k,experts", [(7, 2, 4), (16, 3, 8), (1, 1, 2)])
def test_sort_assignments_orders_valid_assignments_by_expert(tokens, top_k, experts):
    g = torch.Generator().manual_seed(tokens * 10 + top_k)
    idx = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    drop = torch.rand(idx.shape, generator=g) < 0.3
    idx = torch.where(drop, -1, idx)
    weight = torch.rand(idx.shape, generator=g)
    got = sort_assignments(idx, weight, experts)
    expected = [(e, t, float(weight[t, k])) for e in range(experts) for t in range(tokens) for k in range(top_k)
                if idx[t, k] == e]
    assert got.token.tolist() == [t for _, t, _ in expected]
    assert got.weight.tolist() == pytest.approx([w for _, _, w in expected])
    assert got.counts.tolist() == [sum(1 for e2, _, _ in expected if e2 == e) for e in range(experts)]
