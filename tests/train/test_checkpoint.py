import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.train.checkpoint import (
    STALL_ENV,
    CheckpointError,
    load_object,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from moekit.train.load import load_trained

REPO_ROOT = Path(moekit.__file__).resolve().parents[1]


def fresh_objects(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(8, 4, generator=g)}, "trainer": {"step": seed, "x": torch.rand(3, generator=g)}}


def test_save_load_prune_and_latest_pointer(tmp_path):
    root = tmp_path / "checkpoints"
    saved = {}
    for step in (2, 4, 6):
        saved[step] = fresh_objects(step)
        final = save_checkpoint(root, step, saved[step], {"config.yaml": b"a: 1\n"}, keep=2)
        assert final.name == f"step_{step:08d}" and resolve_checkpoint(tmp_path) == final
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    ckpt = resolve_checkpoint(root / "step_00000004")
    assert verify_checkpoint(ckpt)["step"] == 4
    assert torch.equal(load_object(ckpt, "model")["w"], saved[4]["model"]["w"])
    assert load_object(ckpt, "trainer")["step"] == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_checkpoint_file_is_named(tmp_path, damage):
    final = save_checkpoint(tmp_path, 3, fresh_objects(3), {}, keep=1)
    target = final / "model.pt"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 3]))
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint file {target} is (corrupt|missing)"):
        verify_checkpoint(final)


def test_unverified_garbage_and_bad_pointer_are_reported(tmp_path):
    final = save_checkpoint(tmp_path, 1, fresh_objects(1), {}, keep=1)
    (final / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=rf"checkpoint file {final / 'model.pt'} cannot be loaded"):
        load_object(final, "model")
    (tmp_path / "latest").write_text("step_00000099")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(make_config, capsys):
    """A real training process is SIGKILLed while it writes the step-4 checkpoint (a test hook
    stalls the writer after its first file): step 2 stays the loadable latest, and --resume
    finishes the run and cleans up the half-written directory."""
    values, config_path = make_config(steps=6, ckpt_every=2, log_every=2, eval_every=6)
    run = Path(values["train"]["out_dir"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "moekit.cli", "train", "--config", str(config_path), "--no-sample"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
        env={**os.environ, STALL_ENV: "4", "PYTHONUNBUFFERED": "1"},
    )
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    output = []
    try:
        for line in proc.stdout:
            output.append(line)
            if "checkpoint write stalled at step 4" in line:
                break
        partial = list((run / "checkpoints").glob(".tmp-step_00000004-*"))
        assert len(partial) == 1 and (partial[0] / "model.pt").is_file(), "".join(output)
        assert not (partial[0] / "manifest.json").exists()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        proc.kill()
        proc.stdout.close()

    latest = resolve_checkpoint(run)
    assert latest.name == "step_00000002"
    model, config, _ = load_trained(run)
    assert config.train.steps == 6 and sum(p.numel() for p in model.parameters()) > 0

    assert main(["train", "--config", str(config_path), "--resume", "--no-sample"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert resolve_checkpoint(run).name == "step_00000006"
    assert not list((run / "checkpoints").glob(".tmp-*"))
