"""Crash-safe checkpoints.

Layout of a run directory::

    checkpoints/step_00000200/   model.pt optimizer.pt trainer.pt config.yaml [tokenizer.json] manifest.json
    checkpoints/latest           the name of the complete checkpoint that --resume continues from

A checkpoint is written into a hidden temporary directory, every file fsynced, a manifest of
sizes and SHA-256 digests written last, then the directory is renamed into place and only
then is ``latest`` replaced (write a temp file, fsync, ``os.replace``). Re-saving an existing
step moves the old copy aside (``.old-step_*``) and deletes it only once ``latest`` names the
new one. A crash or SIGKILL at any moment leaves ``latest`` naming a complete checkpoint; older
ones are pruned only after, and leftovers of interrupted saves at the next save. A failed write
(e.g. a full disk) removes its partial directory and raises ``CheckpointError`` naming the file.
Loading verifies the manifest, so a truncated or altered file is reported by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

LATEST = "latest"
MANIFEST = "manifest.json"
# Hidden directories of saves in progress and of replaced copies; never loaded unless ``latest`` names one.
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
# Test hook: when saving the checkpoint of this step, stall after its first file is written so
# that a test can SIGKILL the process mid-save.
STALL_ENV = "MOEKIT_TEST_CKPT_STALL_AT"
STALL_SECONDS = 600


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_file(path: Path, write) -> None:
    try:
        with path.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:  # e.g. a full disk: torch's own message does not name the file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot write checkpoint file {path}: {reason}") from None


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, objects: dict[str, Any], files: dict[str, bytes], keep: int) -> Path:
    """Write ``objects`` (each ``torch.save``d as NAME.pt) and raw ``files`` as checkpoint ``step``.

    Returns the final directory. At most ``keep`` complete checkpoints remain afterwards.
    """
    tmp = tmp_path(root, step, str(os.getpid()))
    start_tmp_dir(tmp)
    write_checkpoint_files(tmp, step, objects, files)
    return publish(root, tmp, step, keep)


def tmp_path(root: Path, step: int, tag: str) -> Path:
    return root / f"{TMP_PREFIX}{step_name(step)}-{tag}"


def start_tmp_dir(tmp: Path) -> None:
    """Create ``tmp`` empty, after removing leftovers of interrupted or failed saves next to it
    (they may be what filled the disk)."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(tmp.parent)
    tmp.mkdir()


def write_checkpoint_files(tmp: Path, step: int, objects: dict[str, Any], files: dict[str, bytes]) -> None:
    """Add ``objects`` and ``files`` to ``tmp``, then the manifest of everything in it. On any
    failure ``tmp`` is removed (a partial checkpoint only takes space) and the error re-raised."""
    try:
        stall = os.environ.get(STALL_ENV) == str(step)
        for i, (name, obj) in enumerate(objects.items()):
            _write_file(tmp / f"{name}.pt", lambda f, obj=obj: torch.save(obj, f))
            if i == 0 and stall:
                print(f"checkpoint write stalled at step {step} (test hook)", flush=True)
                time.sleep(STALL_SECONDS)
        for name, data in files.items():
            _write_file(tmp / name, lambda f, data=data: f.write(data))
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        _write_file(tmp / MANIFEST,
                    lambda f: f.write(json.dumps({"step": step, "files": manifest}, indent=1).encode()))
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(root: Path, tmp: Path, step: int, keep: int) -> Path:
    """Move the complete checkpoint ``tmp`` into place as step ``step``, point ``latest`` at it and
    prune. At every instant ``latest`` names a complete checkpoint, also when ``step`` exists."""
    final = root / step_name(step)
    if final.exists():  # re-saving a step (e.g. after a resume): the new copy replaces it
        if _latest_name(root) == final.name:
            # ``latest`` must not name ``final`` while it is moved: point it at a twin of the old
            # copy first (hard links, so no data is copied).
            twin = _aside_name(final, "twin")
            shutil.copytree(final, twin, copy_function=_link_or_copy)
            _fsync_dir(twin)
            _point_latest(root, twin.name)
        os.rename(final, _aside_name(final, "moved"))  # deleted only once ``latest`` names the new copy
    os.rename(tmp, final)
    _fsync_dir(root)
    _point_latest(root, final.name)
    _prune(root, keep, final.name)
    return final


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip()
    except OSError:
        return None


def _point_latest(root: Path, name: str) -> None:
    pointer = root / f".{LATEST}.tmp"
    _write_file(pointer, lambda f: f.write(name.encode()))
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)


def point_latest_at(ckpt: Path) -> None:
    """Make ``latest`` name ``ckpt``, a complete checkpoint of its folder, if it names another: a run
    continued from an earlier checkpoint of its own goes on from there, and so must ``--resume`` (the
    run's metrics now end there too). The later checkpoints stay, to pass by path."""
    if _latest_name(ckpt.parent) != ckpt.name:
        _point_latest(ckpt.parent, ckpt.name)


def _aside_name(final: Path, kind: str) -> Path:
    return final.with_name(f"{OLD_PREFIX}{final.name}-{time.time_ns()}-{kind}")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _clean_leftovers(root: Path) -> None:
    """Remove directories of interrupted or failed saves and replaced copies, except the one that
    ``latest`` names (a re-save interrupted while ``latest`` named the old copy's twin). A re-save
    interrupted before its new copy was in place is rolled back: the moved old copy returns."""
    for moved in sorted(root.glob(f"{OLD_PREFIX}step_*-moved")):
        original = root / moved.name[len(OLD_PREFIX):].split("-")[0]
        if not original.exists():
            os.rename(moved, original)
    keep = _latest_name(root)
    for pattern in (f"{TMP_PREFIX}step_*", f"{OLD_PREFIX}step_*"):
        for leftover in root.glob(pattern):
            if leftover.name != keep:
                shutil.rmtree(leftover, ignore_errors=True)


def _prune(root: Path, keep: int, newest: str) -> None:
    """Drop all but the ``keep`` newest complete checkpoints, and leftovers of interrupted saves."""
    complete = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in complete[: max(0, len(complete) - keep)]:
        if old.name != newest:
            # Out of sight first: a kill while deleting leaves a hidden leftover, not a step_* folder without
            # some of its files.
            aside = _aside_name(old, "pruned")
            os.rename(old, aside)
            shutil.rmtree(aside)
    _clean_leftovers(root)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, its ``checkpoints`` folder, or a run directory (via ``latest``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / MANIFEST).exists():
        return path
    for root in (path / "checkpoints", path):
        pointer = root / LATEST
        if pointer.is_file():
            target = root / pointer.read_text().strip()
            if not (target / MANIFEST).is_file():
                raise CheckpointError(f"{pointer} names {target}, which is not a complete checkpoint"
                                      f"{_complete_ones(root)}")
            return target
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path} is a model folder (save_pretrained, moekit convert), not a training "
                              "checkpoint: load it in Python with MoEForCausalLM.from_pretrained")
    found = _complete_ones(path / "checkpoints") or _complete_ones(path)
    raise CheckpointError(f"no checkpoint in {path} (expected {MANIFEST} or checkpoints/{LATEST}){found}")


def _complete_ones(root: Path) -> str:
    """Where a pointer is lost or names a damaged checkpoint, the complete ones beside it, to pass by path
    (e.g. ``--resume-from``): the run is not lost with its pointer."""
    complete = sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file()) if root.is_dir() else []
    if not complete:
        return ""
    names = ", ".join(p.name for p in complete)
    return f"; complete checkpoints there: {names} (pass one by path, newest {complete[-1]})"


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest."""
    manifest_path = ckpt / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable or corrupt: {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
            for entry in files.values()):
        raise CheckpointError(f'checkpoint manifest {manifest_path} is malformed: "files" must map each file '
                              'name to {"bytes": SIZE, "sha256": DIGEST}')
    for name, expected in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt (size or SHA-256 differs from the manifest)")
    return manifest


def load_object(ckpt: Path, name: str, map_location: str | torch.device = "cpu") -> Any:
    """Load ``NAME.pt`` of a verified checkpoint (tensors and plain Python data only)."""
    path = ckpt / f"{name}.pt"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch's message does not name the file
        raise CheckpointError(f"checkpoint file {path} cannot be loaded: {exc}") from None
