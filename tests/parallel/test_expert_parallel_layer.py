"""The expert-parallel MoE layer (2 ranks, gloo, the default padded dispatch) equals the single-process
layer on each rank's tokens; the exact and padded dispatch plans against loops."""

import json

import pytest
import torch

from moekit.parallel.expert_parallel import destination_ranks, pad_dispatch, plan_dispatch

EP_CASES = ["softmax_shared_gate", "sigmoid_groups", "sigmoid_groups_capacity", "softmax_capacity_position",
            "expert_choice", "expert_choice_uneven_k", "skewed_to_rank0", "skewed_to_rank0_reference"]


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
        for case in ("skewed_to_rank0", "skewed_to_rank0_reference"):
            if rank == 1:  # rank 1 holds experts 4..7, which no token chose
                assert result[case]["grad_w_up_norm"] == 0.0
            else:
                assert result[case]["grad_w_up_norm"] > 0.0
        assert "not divisible by ep=2" in result["indivisible_error"]
    # the ranks' expert-choice routing rows differ in width (padded to one width to travel)
    with open(f"{out}.0.json") as f0, open(f"{out}.1.json") as f1:
        widths = [json.load(f)["expert_choice_uneven_k"]["slots_per_token"] for f in (f0, f1)]
    assert widths[0] > widths[1], widths


PLAN_SHAPES = [(7, 2, 4, 2), (16, 3, 8, 4), (9, 5, 8, 2), (1, 1, 2, 2)]


def random_routing(tokens: int, top_k: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token, 30% of the slots dropped (-1), random gate weights."""
    g = torch.Generator().manual_seed(tokens * 10 + top_k)
    idx = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    idx = torch.where(torch.rand(idx.shape, generator=g) < 0.3, -1, idx)
    return idx, torch.rand(idx.shape, generator=g)


def restricted(row: list[int], rank: int, local: int) -> list[int]:
    return [e - rank * local if e >= 0 and e // local == rank else -1 for e in row]


@pytest.mark.parametrize("tokens,top_k,experts,ep", PLAN_SHAPES)
def test_plan_sends_each_token_once_per_rank_with_its_restricted_routing(tokens, top_k, experts, ep):
    idx, weight = random_routing(tokens, top_k, experts)
    local = experts // ep
    hits = destination_ranks(idx, local, ep)
    plan = plan_dispatch(idx, weight, hits, local, int(hits.sum()))
    # Expected, by a loop: rank-major rows, each token once per rank holding one of its experts.
    rows = [(r, t) for r in range(ep) for t in range(tokens) if any(e // local == r for e in idx[t].tolist() if e >= 0)]
    assert hits.sum(0).tolist() == [sum(1 for r2, _ in rows if r2 == r) for r in range(ep)]
    assert plan.token.tolist() == [t for _, t in rows]
    for row, (r, t) in enumerate(rows):
        assert plan.local_idx[row].tolist() == restricted(idx[t].tolist(), r, local)
        assert torch.equal(plan.weight[row], torch.where(plan.local_idx[row] >= 0, weight[t], 0))
    # Every valid assignment is kept in exactly one row.
    assert int((plan.local_idx >= 0).sum()) == int((idx >= 0).sum())


@pytest.mark.parametrize("tokens,top_k,experts,ep", PLAN_SHAPES)
def test_padded_plan_sends_every_token_to_every_rank_with_its_restricted_routing(tokens, top_k, experts, ep):
    idx, weight = random_routing(tokens, top_k, experts)
    local = experts // ep
    local_idx, sent_weight = pad_dispatch(idx, weight, local, ep)
    assert local_idx.shape == sent_weight.shape == (ep * tokens, top_k)  # exactly T rows per destination
    for r in range(ep):
        for t in range(tokens):
            row = r * tokens + t
            assert local_idx[row].tolist() == restricted(idx[t].tolist(), r, local)
            assert torch.equal(sent_weight[row], torch.where(local_idx[row] >= 0, weight[t], 0))
    # Every valid assignment is kept in exactly one block, and the weights sum back per token.
    assert int((local_idx >= 0).sum()) == int((idx >= 0).sum())
    torch.testing.assert_close(sent_weight.view(ep, tokens, top_k).sum(0), torch.where(idx >= 0, weight, 0))
