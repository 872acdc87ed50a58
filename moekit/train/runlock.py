"""One training process per run folder: ``train()`` on a ``train.out_dir`` another run is using is refused.

Two runs in one folder would truncate each other's ``metrics.jsonl``, write their checkpoints over
each other's and delete each other's saves in progress (as leftovers of an interrupted save). The
lock is an advisory ``flock`` on ``OUT_DIR/.lock``; the kernel drops it when its process ends,
SIGKILL included, so a crashed run never leaves its folder locked.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, and no guard there
    fcntl = None

LOCK_FILE = ".lock"


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block; raise ``ValueError`` naming the holder if another has it."""
    if fcntl is None:
        yield
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that did not say"
            raise ValueError(f"train.out_dir {run_dir} is in use by another moekit train ({holder}): wait for it "
                             "to end (or stop it), or choose another train.out_dir") from None
        except OSError as exc:  # a file system without locks (some network mounts): train, unguarded
            warnings.warn(f"cannot lock {run_dir / LOCK_FILE} ({exc.strerror}): a second moekit train on this "
                          "train.out_dir would not be refused", stacklevel=1)  # one line from the CLI
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.close(fd)  # releases the lock
