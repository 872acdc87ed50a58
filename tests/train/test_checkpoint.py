import os
import re
import shutil
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


@pytest.mark.parametrize("resaved", [4, 2], ids=["latest", "older"])
def test_interrupted_resave_keeps_latest_complete_at_every_moment(tmp_path, monkeypatch, resaved):
    """Re-saving an existing step (a run resumed from it) is interrupted at each of its renames,
    links, pointer replaces and deletions in turn: before and after every one of them ``latest``
    names a complete checkpoint, and the next save removes what the interrupted one left."""
    real = {name: getattr(mod, name) for mod, name in
            ((os, "rename"), (os, "replace"), (os, "link"), (shutil, "rmtree"))}

    def check_latest(root):
        ckpt = resolve_checkpoint(root)
        verify_checkpoint(ckpt)
        assert any(torch.equal(load_object(ckpt, "model")["w"], o["model"]["w"]) for o in versions)

    for interrupt_at in range(100):
        root = tmp_path / f"try{interrupt_at}" / "checkpoints"
        versions = [fresh_objects(2), fresh_objects(4), fresh_objects(40 + resaved)]
        save_checkpoint(root, 2, versions[0], {}, keep=5)
        save_checkpoint(root, 4, versions[1], {}, keep=5)
        calls = []

        def interceptor(name, root=root, calls=calls, interrupt_at=interrupt_at):
            def op(*args, **kwargs):
                check_latest(root)
                calls.append(name)
                if len(calls) - 1 == interrupt_at:
                    raise KeyboardInterrupt
                result = real[name](*args, **kwargs)
                check_latest(root)
                return result
            return op

        with monkeypatch.context() as m:
            for mod, name in ((os, "rename"), (os, "replace"), (os, "link"), (shutil, "rmtree")):
                m.setattr(mod, name, interceptor(name))
            try:
                save_checkpoint(root, resaved, versions[2], {}, keep=5)
                finished = True
            except KeyboardInterrupt:
                finished = False
        check_latest(root)
        if (root / f"step_{resaved:08d}").exists():
            verify_checkpoint(root / f"step_{resaved:08d}")
        save_checkpoint(root, 6, fresh_objects(6), {}, keep=5)
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004", "step_00000006"]
        if finished:
            new = load_object(root / f"step_{resaved:08d}", "model")["w"]
            assert torch.equal(new, versions[2]["model"]["w"])
            break
    assert interrupt_at > 3 and "rmtree" in calls


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64\n"
                                                "frame #0: c10::Error::Error(...)")], ids=["oserror", "torch"])
def test_disk_full_during_a_save_is_a_clear_error_and_leaves_no_partial_directory(tmp_path, monkeypatch, error):
    root = tmp_path / "checkpoints"
    first = save_checkpoint(root, 2, fresh_objects(2), {}, keep=3)
    stale = root / ".tmp-step_00000003-99999"  # a save killed earlier: its space is freed before writing
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"x" * 1000)
    real_save = torch.save

    def save_until_full(obj, f):
        if Path(f.name).name == "trainer.pt":
            f.write(b"partial")
            raise error
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(root, 4, fresh_objects(4), {"config.yaml": b"a: 1\n"}, keep=3)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot write checkpoint file ")
    assert "trainer.pt: " in message and str(error).splitlines()[0] in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert resolve_checkpoint(root.parent) == first
    verify_checkpoint(first)


@pytest.mark.parametrize("manifest", ['{"step": 1, "files": []}', '{"step": 1}', "[]", '{"files": {"model.pt": 5}}',
                                      '{"files": {"model.pt": {"bytes": "12"}}}'])
def test_malformed_manifest_is_named(tmp_path, manifest):
    final = save_checkpoint(tmp_path, 1, fresh_objects(1), {}, keep=1)
    (final / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint manifest {final / 'manifest.json'} is malformed")):
        verify_checkpoint(final)


def test_a_lost_or_damaged_pointer_names_the_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        save_checkpoint(root, step, fresh_objects(step), {}, keep=2)
    (root / "latest").write_text("step_00000099")
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint; complete checkpoints there: step_00000002, "
                                              r"step_00000004 \(pass one by path, newest .*step_00000004\)"):
        resolve_checkpoint(tmp_path)
    (root / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*; complete checkpoints there: step_00000002, "
                                              r"step_00000004"):
        resolve_checkpoint(tmp_path)
    shutil.rmtree(root)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints/latest\)$"):
        resolve_checkpoint(tmp_path)


def test_a_save_killed_while_it_prunes_leaves_no_half_deleted_checkpoint_in_sight(tmp_path, monkeypatch):
    """Pruning deleted an old step_* folder file by file: a kill part-way left it in place without
    some files (its manifest maybe kept), listed among the "complete checkpoints" to pass by path."""
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 2, fresh_objects(2), {}, keep=1)
    real_rmtree = shutil.rmtree

    def killed_after_one_file(path, *args, **kwargs):
        os.remove(next(p for p in sorted(Path(path).iterdir()) if p.name != "manifest.json"))
        raise KeyboardInterrupt  # stands for SIGKILL: the rest of the folder stays

    monkeypatch.setattr(shutil, "rmtree", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 4, fresh_objects(4), {}, keep=1)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert resolve_checkpoint(root.parent).name == "step_00000004"
    for ckpt in root.glob("step_*"):  # what a user sees, or an error lists, is whole
        verify_checkpoint(ckpt)
    save_checkpoint(root, 6, fresh_objects(6), {}, keep=1)  # the next save removes what is left
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006"]
