"""Deduplicated expert-parallel dispatch on 2 gloo processes: the rows that actually cross the
all-to-all (one per token and destination rank, never one per assignment), and a layer whose
top_k exceeds the experts per rank still equals the single-process layer."""

import contextlib
import copy
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit import MoE, MoEConfig
from moekit.parallel import ParallelConfig, init_distributed, shard_experts

H, EXPERTS, TOKENS = 32, 4, 24  # 2 experts per rank
CASES = {
    # top_k 3 > 2 experts per rank: every token has experts on both ranks or two on one.
    "top3_of_4": dict(score_func="softmax", top_k=3),
    "top3_of_4_capacity": dict(score_func="sigmoid", top_k=3, capacity_factor=0.75),
    # every token picks experts 2 and 3, both on rank 1: rank 0 sends each token once, to rank 1.
    "all_on_rank1": dict(score_func="softmax", top_k=2),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class SentRows:
    """Records the split sizes of every ``dist.all_to_all_single`` whose rows are hidden states."""

    def __init__(self):
        self.splits: list[list[int]] = []
        self.original = dist.all_to_all_single

    def __enter__(self):
        def recorded(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            if input.dim() == 2 and input.shape[1] == H:
                self.splits.append([int(s) for s in input_split_sizes])
            return self.original(output, input, output_split_sizes, input_split_sizes, group=group,
                                 async_op=async_op)

        dist.all_to_all_single = recorded
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.original


def run_case(name: str, extra: dict, rank: int) -> dict:
    torch.manual_seed(0)
    ref = MoE(MoEConfig(hidden_size=H, ffn_hidden_size=16, num_experts=EXPERTS, **extra))
    if name == "all_on_rank1":
        ref.router.expert_bias[2:] = 100.0
    layer = copy.deepcopy(ref)
    shard_experts(layer, init_distributed(ParallelConfig(ep=2)))
    torch.manual_seed(100 + rank)  # each rank its own tokens
    x = torch.randn(TOKENS, H)
    dy = torch.randn(TOKENS, H)
    result = {}
    sent = SentRows()
    for module in (ref, layer):
        xi = x.clone().requires_grad_()
        with sent if module is layer else contextlib.nullcontext():
            y = module(xi)
        ((y * dy).sum() + module.aux_loss).backward()
        result["ref" if module is ref else "ep"] = (y.detach(), xi.grad)
    idx = ref.router(x).topk_idx  # what this rank's tokens chose (after capacity drops)
    dest = [{e // 2 for e in row if e >= 0} for row in idx.tolist()]
    errs = {"out": rel_err(result["ep"][0], result["ref"][0]), "grad_x": rel_err(result["ep"][1], result["ref"][1]),
            "grad_router": rel_err(layer.router.weight.grad, ref.router.weight.grad)}
    for w in ("w_up", "w_down"):
        full = getattr(ref.experts, w).grad.clone()
        dist.all_reduce(full)
        errs[f"grad_{w}"] = float((getattr(layer.experts, w).grad - full[2 * rank: 2 * rank + 2]).norm() / full.norm())
    return {"errs": errs, "dispatch_splits": sent.splits[0], "combine_splits": sent.splits[1],
            "forward_calls": len(sent.splits),
            "expected_splits": [sum(1 for d in dest if r in d) for r in range(2)],
            "assignments": int((idx >= 0).sum()), "tokens": TOKENS}


def unwritten_rows_as_nan(grouped_mm):
    """``torch._grouped_mm`` leaves the output rows past the last offset unwritten: fill them with
    NaN, so that a leak of them (e.g. into the gate weights' gradient) fails every time instead of
    when the allocator hands out dirty memory."""

    def poisoned(a, b, offs=None, **kwargs):
        out = grouped_mm(a, b, offs=offs, **kwargs)
        return out.index_fill(0, torch.arange(int(offs[-1]), out.shape[0]), float("nan"))

    return poisoned


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if hasattr(torch, "_grouped_mm"):
        torch._grouped_mm = unwritten_rows_as_nan(torch._grouped_mm)  # this forked rank only
    result = {name: run_case(name, extra, rank) for name, extra in CASES.items()}
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dedup") / "rank")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks run this module's functions without importing it again.
    mp.start_processes(rank_main, args=(port, out), nprocs=2, start_method="fork")
    found = []
    for rank in range(2):
        with open(f"{out}.{rank}.json") as f:
            found.append(json.load(f))
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_dedup_layer_matches_single_process(results, case):
    for rank, result in enumerate(results):
        for key, value in result[case]["errs"].items():
            assert value < 1e-5, f"rank {rank} {case}: {key} relative error {value}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_token_is_sent_once_per_destination_rank(results, case):
    for rank, result in enumerate(results):
        r = result[case]
        assert r["forward_calls"] == 2  # hidden rows cross twice per forward: dispatch, combine
        assert r["dispatch_splits"] == r["expected_splits"], (rank, r)
        # The sums go back the way the rows came: what rank s sent here returns to rank s.
        assert r["combine_splits"] == [results[s][case]["dispatch_splits"][rank] for s in range(2)]
        # One row per (token, rank), fewer than one per assignment: top-3 of 2 + 2 experts puts
        # at least two of a token's experts on one rank.
        assert sum(r["dispatch_splits"]) < r["assignments"], (rank, r)


def test_token_whose_experts_all_live_on_one_other_rank_travels_once(results):
    for rank, result in enumerate(results):
        r = result["all_on_rank1"]
        assert r["assignments"] == 2 * r["tokens"]
        assert r["dispatch_splits"] == [0, r["tokens"]], rank


def test_capacity_case_drops_assignments(results):
    for result in results:
        r = result["top3_of_4_capacity"]
        assert r["assignments"] < 3 * r["tokens"]
