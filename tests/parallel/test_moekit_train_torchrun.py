"""``moekit train`` under torchrun (2 processes, gloo, parallel.ep=2) against one process.

Same global batch (train.batch_size), same seed: the logged global-mean losses agree to float32
reduction-order noise (see test_distributed_training.py for the tolerance). The 2-process
checkpoint then resumes in one process and continues with the same losses. On a machine with two
GPUs the runs take CUDA and NCCL; ``train.dtype=fp32`` keeps them in float32 there too (bf16
autocast would differ between the layouts by more than the tolerance).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

TINY = ["model.hidden_size=32", "model.layer_pattern=LN", "model.num_heads=2", "model.head_dim=16",
        "model.moe.ffn_hidden_size=32", "data.corpus_bytes=1048576", "train.steps=12", "train.batch_size=4",
        "train.seq_len=32", "train.log_every=1", "train.eval_every=12", "train.eval_batches=1",
        "train.ckpt_every=6", "train.warmup_steps=2", "train.sample_tokens=0", "train.dtype=fp32"]
RTOL = 1e-5


def moekit_train(args: list[str], torchrun=None, nprocs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["-m", "moekit.cli", "train", "--no-sample", *args]
    cmd = [sys.executable, *train] if nprocs == 1 else torchrun(nprocs, train)
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def train_losses(run_dir) -> dict[int, float]:
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torchrun):
    root = tmp_path_factory.mktemp("moekit_train")
    moekit_train([*TINY, f"train.out_dir={root / 'one'}"])
    moekit_train([*TINY, "parallel.ep=2", f"train.out_dir={root / 'two'}"], torchrun, nprocs=2)
    return root


def test_two_process_expert_parallel_run_matches_one_process(runs):
    one, two = train_losses(runs / "one"), train_losses(runs / "two")
    assert sorted(two) == list(range(1, 13))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=RTOL), f"step {step}"
    assert one[12] < one[1]
    # Rank 0 alone writes the run's files; the checkpoint holds both ranks' shards.
    ckpt = runs / "two" / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / ".metadata").is_file() and (ckpt / "trainer.pt").is_file()


def moe_stats(run_dir, step: int) -> dict:
    with open(run_dir / "metrics.jsonl") as f:
        return next(r["moe"] for r in map(json.loads, f) if r["kind"] == "train" and r["step"] == step)


def test_two_process_run_logs_the_global_batch_moe_statistics(runs):
    # Step 1 starts from the same weights: the same routing of the same global batch, so the logged
    # tokens per expert (rank 0 once logged its half) and the statistics derived from them agree.
    one, two = moe_stats(runs / "one", 1), moe_stats(runs / "two", 1)
    for field in ("tokens_per_expert", "load_cv", "router_entropy", "z_loss", "dropped_fraction"):
        for layer, (got, want) in enumerate(zip(two[field], one[field])):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (field, layer)


def test_two_process_checkpoint_resumes_in_one_process(runs):
    ckpt = runs / "two" / "checkpoints" / "step_00000006"
    out = runs / "resumed"
    moekit_train(["--resume-from", str(ckpt), "parallel.ep=1", f"train.out_dir={out}"])
    resumed, two = train_losses(out), train_losses(runs / "two")
    assert sorted(resumed) == list(range(7, 13))
    for step, loss in resumed.items():
        assert loss == pytest.approx(two[step], rel=RTOL), f"step {step}"


def test_two_process_checkpoint_serves_eval_and_generate(runs):
    """The single-process tools read a distributed checkpoint; eval reproduces the run's held-out loss."""
    run = runs / "two"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["val_loss"] for r in records if r["kind"] == "eval" and r["step"] == 12)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpt = str(run / "checkpoints" / "step_00000012")
    result = subprocess.run([sys.executable, "-m", "moekit.cli", "eval", "--ckpt", ckpt, "--batches", "1"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loss = float(result.stdout.split("held-out loss ")[1].split()[0])
    assert loss == pytest.approx(logged, rel=1e-3)
    result = subprocess.run([sys.executable, "-m", "moekit.cli", "generate", "--ckpt", ckpt, "def "],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]


def test_a_busy_out_dir_stops_every_rank_with_one_line(tmp_path, torchrun):
    """Rank 0 alone takes the run folder's lock. Refused, it exited while rank 1 went on into the first
    step, whose collective then failed: a PeerFailure traceback of a hundred lines under the one-line reason."""
    from moekit.train.runlock import run_dir_lock

    out = tmp_path / "busy"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = torchrun(2, ["-m", "moekit.cli", "train", "--no-sample", *TINY, "parallel.ep=2", f"train.out_dir={out}"])
    with run_dir_lock(out):  # another run holds the folder
        result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"moekit train: error: train.out_dir {out} is in use by another moekit train (pid {os.getpid()}" in output
    assert "PeerFailure" not in output and "]: Traceback" not in output, output[-3000:]  # no rank's traceback
    assert "moekit train: error: rank 0 could not take train.out_dir" in output  # rank 1's own line
