"""Crash-safe checkpoints.

Layout of a run directory::

    checkpoints/step_00000200/   model.pt optimizer.pt trainer.pt config.yaml [tokenizer.json] manifest.json
    checkpoints/latest           the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory, every file fsynced, a manifest of
sizes and SHA-256 digests written last, then the directory is renamed into place and only
then is ``latest`` replaced (write a temp file, fsync, ``os.replace``). A crash or SIGKILL at
any moment leaves ``latest`` naming a complete checkpoint; older ones are pruned only after.
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
    with path.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, objects: dict[str, Any], files: dict[str, bytes], keep: int) -> Path:
    """Write ``objects`` (each ``torch.save``d as NAME.pt) and raw ``files`` as checkpoint ``step``.

    Returns the final directory. At most ``keep`` complete checkpoints remain afterwards.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    stall = os.environ.get(STALL_ENV) == str(step)
    for i, (name, obj) in enumerate(objects.items()):
        _write_file(tmp / f"{name}.pt", lambda f, obj=obj: torch.save(obj, f))
        if i == 0 and stall:
            print(f"checkpoint write stalled at step {step} (test hook)", flush=True)
            time.sleep(STALL_SECONDS)
    for name, data in files.items():
        _write_file(tmp / name, lambda f, data=data: f.write(data))
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    _write_file(tmp / MANIFEST, lambda f: f.write(json.dumps({"step": step, "files": manifest}, indent=1).encode()))
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): the new copy replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / f".{LATEST}.tmp"
    _write_file(pointer, lambda f: f.write(final.name.encode()))
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    """Drop all but the ``keep`` newest complete checkpoints, and leftovers of interrupted saves."""
    complete = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in complete[: max(0, len(complete) - keep)]:
        if old.name != newest:
            shutil.rmtree(old)
    for leftover in root.glob(".tmp-step_*"):
        shutil.rmtree(leftover, ignore_errors=True)


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
                raise CheckpointError(f"{pointer} names {target}, which is not a complete checkpoint")
            return target
    raise CheckpointError(f"no checkpoint in {path} (expected {MANIFEST} or checkpoints/{LATEST})")


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest."""
    manifest_path = ckpt / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable or corrupt: {exc}") from None
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
