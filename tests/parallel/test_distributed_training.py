"""Multi-process training (gloo, 2 ranks) against one process on the same global batches.

Tolerance: the runs compute the same float32 function with sums in a different order
(the all-to-all moves expert rows, gradients are all-reduced), so each step differs by a few
ulps; over 20 AdamW steps that stays below 1e-6 in practice. 1e-5 relative (~100 ulps of a
loss near 4) leaves room for that and still fails on any real difference: a routing flip,
a gradient scaled by the wrong world size or reduced over the wrong group moves the loss by
1e-3 or more within a few steps.
"""

import json

import pytest
import torch

STEPS, SAVE_AFTER = 20, 9
RTOL = 1e-5


def read(out: str, rank: int = 0) -> dict:
    with open(f"{out}.{rank}.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def single(launch, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    out = str(root / "run")
    launch("train", 1, {"out": out, "steps": STEPS, "save_at": [SAVE_AFTER - 1, str(root / "ckpt")]})
    return {**read(out), "ckpt": str(root / "ckpt")}


@pytest.fixture(scope="module")
def ep2_run(launch, tmp_path_factory):
    root = tmp_path_factory.mktemp("ep2")
    out, ckpt = str(root / "run"), str(root / "ckpt")
    launch("train", 2, {"out": out, "steps": STEPS, "parallel": {"ep": 2}, "save_at": [SAVE_AFTER - 1, ckpt]})
    return read(out), read(out, 1), ckpt


def assert_close_curves(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: loss {a} vs {b}"


def test_loss_decreases_in_reference_run(single):
    losses = single["losses"]
    assert len(losses) == STEPS and losses[-1] < 0.6 * losses[0]


def test_expert_parallel_fsdp_matches_single_process(single, ep2_run):
    rank0, rank1, _ = ep2_run
    assert_close_curves(rank0["losses"], single["losses"])
    # The global gradient norm (FSDP shards + expert shards) is the single process's, and
    # mostly above the clipping threshold (0.5), so clipping acted.
    assert_close_curves(rank0["grad_norms"], single["grad_norms"])
    assert sum(n > 0.5 for n in single["grad_norms"]) >= STEPS // 2
    # Aux-loss-free balancing: both ranks applied the same bias steps as the single process.
    assert rank0["bias"] == rank1["bias"]
    flat = [b for layer in single["bias"] for b in layer]
    assert any(b != 0 for b in flat)
    for got, want in zip(rank0["bias"], single["bias"]):
        assert got == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("nprocs,layout", [
    # experts replicated, dense params replicated + all-reduced in several small buckets
    (2, {"parallel": {"ep": 1, "fsdp": False}, "grad_bucket_bytes": 4096}),
    # a 2 x 2 mesh: expert shards reduced over "dp", FSDP over all four ranks
    (4, {"parallel": {"ep": 2, "dp": 2}}),
], ids=["dp2-replicated", "dp2xep2-fsdp"])
def test_other_layouts_match_single_process(single, launch, tmp_path, nprocs, layout):
    out = str(tmp_path / "run")
    launch("train", nprocs, {"out": out, "steps": STEPS, **layout})
    assert_close_curves(read(out)["losses"], single["losses"])
    assert_close_curves(read(out)["grad_norms"], single["grad_norms"])


def test_checkpoint_from_two_processes_resumes_in_one(single, ep2_run, launch, tmp_path):
    rank0, _, ckpt = ep2_run
    out = str(tmp_path / "resumed")
    launch("train", 1, {"out": out, "steps": STEPS, "resume": ckpt})
    resumed = read(out)
    assert resumed["first"] == SAVE_AFTER
    assert_close_curves(resumed["losses"], rank0["losses"][SAVE_AFTER:])
    assert_close_curves(resumed["losses"], single["losses"][SAVE_AFTER:])


def test_checkpoint_from_one_process_resumes_with_expert_parallel_fsdp(single, launch, tmp_path):
    # The one-process optimizer steps with foreach=True; the sharded run's own optimizer must keep
    # foreach off (FSDP's DTensors mixed with plain expert shards), whatever the checkpoint says.
    out = str(tmp_path / "resumed")
    launch("train", 2, {"out": out, "steps": STEPS, "parallel": {"ep": 2}, "resume": single["ckpt"]})
    resumed = read(out)
    assert resumed["first"] == SAVE_AFTER
    assert_close_curves(resumed["losses"], single["losses"][SAVE_AFTER:])


def test_a_dead_rank_stops_the_others_with_a_clear_error(launch, tmp_path):
    results = launch("train", 2, {"out": str(tmp_path / "die"), "steps": STEPS, "die_at": 2,
                                  "parallel": {"ep": 2, "timeout_s": 30}}, check=False, timeout=90)
    survivor, dead = results
    assert dead.returncode == 3
    assert survivor.returncode not in (0, None) and survivor.seconds < 60
    assert "PeerFailure: rank 0 of 2: a collective failed" in survivor.stderr
    assert "died or stopped responding" in survivor.stderr


def test_a_stalled_rank_times_out_the_others(launch, tmp_path):
    # Rank 1 goes silent for an hour; rank 0 must give up on its own after timeout_s = 5 s.
    # (The launcher then kills rank 1, as torchrun would.)
    results = launch("train", 2, {"out": str(tmp_path / "hang"), "steps": STEPS, "hang_at": 2, "hang_s": 3600,
                                  "parallel": {"ep": 2, "timeout_s": 5}},
                     check=False, timeout=90, stop_when_rank0_exits=True)
    survivor, stalled = results
    assert "killed after rank 0 exited" in stalled.stderr
    assert survivor.returncode == 1 and survivor.seconds < 60
    assert "PeerFailure: rank 0 of 2" in survivor.stderr and "time out after 5 s" in survivor.stderr


def test_a_stalled_rank_times_out_collectives_of_the_sub_groups(launch, tmp_path):
    # A 2 x 2 mesh without FSDP: rank 0's first collective after rank 1 stalls is the "ep" group's
    # all-gather, and rank 2 waits for rank 0 in the "dp" group's expert all-reduce. Those groups are
    # created by init_device_mesh, whose default timeout (30 min for gloo) once ignored timeout_s.
    results = launch("train", 4, {"out": str(tmp_path / "hang"), "steps": STEPS, "hang_at": 1, "hang_s": 3600,
                                  "parallel": {"ep": 2, "dp": 2, "fsdp": False, "timeout_s": 5}},
                     check=False, timeout=120, stop_when_rank0_exits=True)
    survivor = results[0]
    assert survivor.returncode == 1 and survivor.seconds < 90, (survivor.returncode, survivor.seconds)
    assert "PeerFailure: rank 0 of 4" in survivor.stderr and "time out after 5 s" in survivor.stderr


def test_sync_grads_of_a_parameter_one_rank_left_unused(launch, tmp_path):
    launch("sync_grads", 2, {"out": str(tmp_path / "sync")})
    r0, r1 = read(str(tmp_path / "sync"), 0), read(str(tmp_path / "sync"), 1)
    assert "b.weight" in r0["local"] and "b.weight" not in r1["local"]  # the case: rank 1 never used b
    for name in ("a.weight", "a.bias"):  # the mean over ranks
        want = (torch.tensor(r0["local"][name]) + torch.tensor(r1["local"][name])) / 2
        for r in (r0, r1):
            torch.testing.assert_close(torch.tensor(r["synced"][name]), want)
    for name in ("b.weight", "b.bias"):  # rank 1 counts as a zero gradient, not as a misaligned buffer
        for r in (r0, r1):
            torch.testing.assert_close(torch.tensor(r["synced"][name]), torch.tensor(r0["local"][name]) / 2)
    assert r0["synced"]["unused.weight"] is None and r1["synced"]["unused.weight"] is None
