"""Deduplicated expert-parallel dispatch on 2 gloo processes, in both modes of ``AllToAllDispatcher``:
the rows that actually cross (exact, by all-to-all: one per token and destination rank, never one
per assignment; padded, by all-gather and reduce-scatter: exactly T per rank pair, no split
sizes), the padded mode's freedom from host syncs in the forward and the backward, and a layer
whose top_k exceeds the experts per rank still equals the single-process layer. The exact mode
runs with a different token count per rank."""

import contextlib
import copy
import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit import MoE, MoEConfig
from moekit.parallel import ParallelConfig, init_distributed, shard_experts

H, EXPERTS, TOKENS = 32, 4, 24  # 2 experts per rank
CASES = {
    # top_k 3 > 2 experts per rank: every token has experts on both ranks or two on one.
    "top3_of_4": dict(score_func="softmax", top_k=3, num_shared_experts=1),
    "top3_of_4_capacity": dict(score_func="sigmoid", top_k=3, capacity_factor=0.75),
    # every token picks experts 2 and 3, both on rank 1: rank 0 sends each token once, to rank 1.
    "all_on_rank1": dict(score_func="softmax", top_k=2),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


MODES = {"exact": False, "padded": True}  # name -> pad_to_tokens


class SentRows:
    """Records the kind, split sizes (None: equal splits) and row counts of every collective
    whose rows are hidden states: ``dist.all_to_all_single`` (exact mode),
    ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` (padded mode)."""

    NAMES = {"all_to_all_single": "all_to_all", "all_gather_into_tensor": "all_gather",
             "reduce_scatter_tensor": "reduce_scatter"}

    def __init__(self):
        self.kinds: list[str] = []
        self.splits: list[list[int] | None] = []
        self.rows: list[tuple[int, int]] = []  # (sent, received)
        self.originals = {name: getattr(dist, name) for name in self.NAMES}

    def __enter__(self):
        def recorder(name):
            def recorded(output, input, *args, **kwargs):
                if input.dim() == 2 and input.shape[1] == H:
                    self.kinds.append(self.NAMES[name])
                    splits = args[1] if name == "all_to_all_single" and len(args) > 1 else None
                    self.splits.append(None if splits is None else [int(s) for s in splits])
                    self.rows.append((input.shape[0], output.shape[0]))
                return self.originals[name](output, input, *args, **kwargs)
            return recorded

        for name in self.NAMES:
            setattr(dist, name, recorder(name))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(dist, name, original)


class HostSyncs:
    """Records every call that reads a tensor on the host (``.tolist()``, ``.item()``, ``.cpu()``,
    ``.numpy()``, ``int()`` / ``float()`` / ``bool()`` of a tensor) while active. Recording, not
    raising: a rank that raised mid-layer would leave its peer waiting in a collective."""

    METHODS = ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__")

    def __init__(self):
        self.calls: list[str] = []
        self.originals = {m: getattr(torch.Tensor, m) for m in self.METHODS}

    def __enter__(self):
        for method, original in self.originals.items():
            setattr(torch.Tensor, method, self._recording(method, original))
        return self

    def _recording(self, method, original):
        def recorded(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            self.calls.append(f"{method} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return original(tensor, *args, **kwargs)

        return recorded

    def __exit__(self, *exc):
        for method, original in self.originals.items():
            setattr(torch.Tensor, method, original)


def layer_syncs(layer: MoE, x: torch.Tensor, dy: torch.Tensor) -> list[str]:
    """Host reads during one more forward + backward of ``layer`` (its shape already seen once)."""
    xi = x.clone().requires_grad_()
    with HostSyncs() as syncs:
        y = layer(xi)
        ((y * dy).sum() + layer.aux_loss).backward()
    return syncs.calls


def run_case(name: str, extra: dict, rank: int, mode: str) -> dict:
    torch.manual_seed(0)
    ref = MoE(MoEConfig(hidden_size=H, ffn_hidden_size=16, num_experts=EXPERTS, **extra))
    if name == "all_on_rank1":
        ref.router.expert_bias[2:] = 100.0
    layer = copy.deepcopy(ref)
    shard_experts(layer, init_distributed(ParallelConfig(ep=2)), pad_to_tokens=MODES[mode])
    torch.manual_seed(100 + rank)  # each rank its own tokens
    tokens = TOKENS + (2 * rank if mode == "exact" else 0)  # the exact mode takes any count per rank
    x = torch.randn(tokens, H)
    dy = torch.randn(tokens, H)
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
            "rows": sent.rows, "kinds": sent.kinds, "forward_calls": len(sent.splits),
            "expected_splits": [sum(1 for d in dest if r in d) for r in range(2)],
            "assignments": int((idx >= 0).sum()), "tokens": tokens, "host_syncs": layer_syncs(layer, x, dy)}


def unequal_tokens_error(rank: int) -> str:
    """The padded mode with a different token count on each rank: the error every rank raises."""
    layer = MoE(MoEConfig(hidden_size=H, ffn_hidden_size=16, num_experts=EXPERTS, top_k=2))
    shard_experts(layer, init_distributed(ParallelConfig(ep=2)))
    try:
        layer(torch.randn(TOKENS + rank, H))
    except ValueError as e:
        return str(e)
    return ""


def empty_rank_errs(rank: int) -> dict:
    """The exact mode with no tokens at all on rank 1 (e.g. a short last micro-batch): both ranks
    still meet in every collective, and rank 0's tokens still reach rank 1's experts."""
    torch.manual_seed(0)
    ref = MoE(MoEConfig(hidden_size=H, ffn_hidden_size=16, num_experts=EXPERTS, top_k=2, num_shared_experts=1))
    layer = copy.deepcopy(ref)
    shard_experts(layer, init_distributed(ParallelConfig(ep=2)), pad_to_tokens=False)
    torch.manual_seed(7)
    x = torch.randn(0 if rank == 1 else TOKENS, H)
    grads = []
    for module in (ref, layer):
        xi = x.clone().requires_grad_()
        y = module(xi)
        (y.square().sum() + module.aux_loss).backward()
        grads.append((y.detach(), xi.grad))
    errs = {"shape": list(grads[1][0].shape)}
    if rank == 0:
        errs["out"] = rel_err(grads[1][0], grads[0][0])
        errs["grad_x"] = rel_err(grads[1][1], grads[0][1])
    full = ref.experts.w_up.grad if ref.experts.w_up.grad is not None else torch.zeros_like(ref.experts.w_up)
    dist.all_reduce(full)
    errs["grad_w_up"] = rel_err(layer.experts.w_up.grad, full[2 * rank: 2 * rank + 2])
    return errs


def unwritten_rows_as_nan(grouped_mm):
    """``torch._grouped_mm`` leaves the output rows past the last offset unwritten: fill them with
    NaN, so that a leak of them (e.g. into the gate weights' gradient) fails every time instead of
    when the allocator hands out dirty memory."""

    def poisoned(a, b, offs=None, **kwargs):
        out = grouped_mm(a, b, offs=offs, **kwargs)
        unwritten = torch.arange(out.shape[0]) >= offs[-1]  # a device comparison: no host sync
        return torch.where(unwritten[:, None], float("nan"), out)

    return poisoned


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if hasattr(torch, "_grouped_mm"):
        torch._grouped_mm = unwritten_rows_as_nan(torch._grouped_mm)  # this forked rank only
    result = {mode: {name: run_case(name, extra, rank, mode) for name, extra in CASES.items()} for mode in MODES}
    result["unequal_tokens_error"] = unequal_tokens_error(rank)
    result["empty_rank"] = empty_rank_errs(rank)
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


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_dedup_layer_matches_single_process(results, case, mode):
    for rank, result in enumerate(results):
        for key, value in result[mode][case]["errs"].items():
            assert value < 1e-5, f"rank {rank} {mode} {case}: {key} relative error {value}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_token_is_sent_once_per_destination_rank(results, case):
    assert results[0]["exact"][case]["tokens"] != results[1]["exact"][case]["tokens"]
    for rank, result in enumerate(results):
        r = result["exact"][case]
        assert r["forward_calls"] == 2  # hidden rows cross twice per forward: dispatch, combine
        assert r["dispatch_splits"] == r["expected_splits"], (rank, r)
        # The sums go back the way the rows came: what rank s sent here returns to rank s.
        assert r["combine_splits"] == [results[s]["exact"][case]["dispatch_splits"][rank] for s in range(2)]
        # One row per (token, rank), fewer than one per assignment: top-3 of 2 + 2 experts puts
        # at least two of a token's experts on one rank.
        assert sum(r["dispatch_splits"]) < r["assignments"], (rank, r)


@pytest.mark.parametrize("case", sorted(CASES))
def test_padded_mode_sends_exactly_the_token_block_to_every_rank(results, case):
    for rank, result in enumerate(results):
        r = result["padded"][case]
        # No sizes from the host: the T token rows are all-gathered (2T arrive), the 2T output
        # rows reduce-scattered (T, this rank's tokens, come back summed).
        assert r["kinds"] == ["all_gather", "reduce_scatter"], (rank, r)
        assert r["rows"] == [[r["tokens"], 2 * r["tokens"]], [2 * r["tokens"], r["tokens"]]], (rank, r)


@pytest.mark.parametrize("case", sorted(CASES))
def test_padded_mode_never_reads_the_device_on_the_host(results, case):
    for rank, result in enumerate(results):
        assert result["padded"][case]["host_syncs"] == [], (rank, case)
        # The recorder sees the exact mode's split-size read.
        assert any(call.startswith("tolist at") for call in result["exact"][case]["host_syncs"]), (rank, case)


def test_padded_mode_rejects_unequal_token_counts(results):
    for result in results:
        assert "different token counts [24, 25]" in result["unequal_tokens_error"]
        assert "pad_to_tokens=False" in result["unequal_tokens_error"]


def test_exact_mode_takes_an_empty_batch_on_one_rank(results):
    assert results[1]["empty_rank"]["shape"] == [0, H]
    for rank, result in enumerate(results):
        for key, value in result["empty_rank"].items():
            if key != "shape":
                assert value < 1e-5, f"rank {rank}: {key} relative error {value}"


def test_token_whose_experts_all_live_on_one_other_rank_travels_once(results):
    for rank, result in enumerate(results):
        r = result["exact"]["all_on_rank1"]
        assert r["assignments"] == 2 * r["tokens"]
        assert r["dispatch_splits"] == [0, r["tokens"]], rank


def test_capacity_case_drops_assignments(results):
    for result in results:
        for mode in MODES:
            r = result[mode]["top3_of_4_capacity"]
            assert r["assignments"] < 3 * r["tokens"]
