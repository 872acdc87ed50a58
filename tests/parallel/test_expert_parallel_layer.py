"""The expert-parallel MoE layer (2 ranks: gloo, or NCCL on 2 GPUs; the default padded dispatch)
equals the single-process layer on each rank's tokens; the exact and padded dispatch plans against loops."""

import json

import pytest
import torch

from moekit.parallel.expert_parallel import (
    destination_ranks,
    pack_routing,
    plan_dispatch,
    restrict_to_rank,
    unpack_routing,
)

EP_CASES = ["softmax_shared_gate", "sigmoid_groups", "sigmoid_groups_capacity", "softmax_capacity_position",
            "expert_choice", "expert_choice_uneven_k", "skewed_to_rank0", "skewed_to_rank0_reference"]


def test_collectives_second_derivative(launch, tmp_path):
    """A Hessian-vector product (create_graph=True) through all_to_all and all_gather: their backwards
    used to run a plain collective on the gradient, which autograd could not differentiate, so the
    product silently left out every term that passes through the collective (relative errors 0.3-0.8
    here, no error raised); reduce_scatter's backward already was differentiable."""
    out = str(tmp_path / "comm")
    launch("comm_double_backward", 2, {"out": out})
    for rank in range(2):
        with open(f"{out}.{rank}.json") as f:
            errs = json.load(f)
        assert set(errs) == {"all_to_all", "all_gather", "reduce_scatter"}
        for name, err in errs.items():
            assert err < 1e-12, f"rank {rank} {name}: relative error {err}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")])])
def test_ep_layer_matches_single_process(launch, tmp_path, device):
    """gloo on CPU; NCCL on 2 GPUs (the padded all-gather / reduce-scatter and the exact
    all-to-all as the GPU runs them)."""
    out = str(tmp_path / "layer")
    launch("layer", 2, {"out": out, "device": device})
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


def random_routing(tokens: int, top_k: int, experts: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token, 30% of the slots dropped (-1), random gate weights."""
    g = torch.Generator().manual_seed(tokens * 10 + top_k + 1000 * seed)
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
def test_padded_dispatch_restricts_the_gathered_routing_to_each_rank(tokens, top_k, experts, ep):
    """Padded mode gathers every rank's routing rows; rank r keeps, for every one of the ep * T
    rows, the slots of its own experts (local ids) and their weights."""
    routings = [random_routing(tokens, top_k, experts, seed=r) for r in range(ep)]  # one per sending rank
    idx, weight = unpack_routing(torch.cat([pack_routing(i, w) for i, w in routings]))  # the all-gather
    assert torch.equal(idx, torch.cat([i for i, _ in routings])) and idx.dtype == torch.long
    local = experts // ep
    kept = []
    for r in range(ep):
        local_idx, sent_weight = restrict_to_rank(idx, weight, r, local)
        for row in range(ep * tokens):
            assert local_idx[row].tolist() == restricted(idx[row].tolist(), r, local)
            assert torch.equal(sent_weight[row], torch.where(local_idx[row] >= 0, weight[row], 0))
        kept.append((local_idx, sent_weight))
    # Every valid assignment is kept on exactly one rank, and the weights sum back per row.
    assert sum(int((li >= 0).sum()) for li, _ in kept) == int((idx >= 0).sum())
    torch.testing.assert_close(sum(w for _, w in kept), torch.where(idx >= 0, weight, 0))
