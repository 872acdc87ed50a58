"""Launch N ranks of ``workers.py`` as plain subprocesses (what torchrun's workers see:
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), on a free port of 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

WORKERS = Path(__file__).with_name("workers.py")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _launch(scenario: str, nprocs: int, args: dict, timeout: float = 150.0,
            stop_when_rank0_exits: bool = False) -> list[RankResult]:
    port = free_port()
    procs = []
    start = time.monotonic()
    for rank in range(nprocs):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        if nprocs == 1:  # a plain single process: no process group at all
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key)
        procs.append(subprocess.Popen([sys.executable, str(WORKERS), scenario, json.dumps(args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO))
    results = []
    for rank, proc in enumerate(procs):
        stop_now = rank > 0 and stop_when_rank0_exits
        try:
            out, err = proc.communicate(timeout=0 if stop_now else max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n[launcher] killed after rank 0 exited" if stop_now else f"\n[launcher] killed after {timeout} s"
        results.append(RankResult(proc.returncode, out, err, time.monotonic() - start))
    return results


def _check_ok(results: list[RankResult]) -> None:
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exited with {r.returncode}:\n{r.stderr[-4000:]}"


@pytest.fixture(scope="session")
def launch():
    """``launch(scenario, nprocs, args)`` -> every rank's RankResult; fails the test unless all
    ranks exit 0 (pass ``check=False`` to inspect failures). ``stop_when_rank0_exits`` kills
    the ranks still running once rank 0 has exited."""

    def run(scenario: str, nprocs: int, args: dict | None = None, check: bool = True, timeout: float = 150.0,
            stop_when_rank0_exits: bool = False):
        results = _launch(scenario, nprocs, args or {}, timeout, stop_when_rank0_exits)
        if check:
            _check_ok(results)
        return results

    return run


@pytest.fixture(scope="session")
def torchrun():
    """``torchrun(nprocs, args)`` -> the command line of ``torchrun`` on a free 127.0.0.1 port."""

    def command(nprocs: int, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nprocs}",
                "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]

    return command
