"""All-to-all bandwidth between the GPUs of one host, as the expert-parallel dispatcher uses it
(issue #9): ``all_to_all_single`` of bf16 rows, each rank sending an equal block to every rank,
beside a copy-engine peer copy of the same block (what NVLink gives without NCCL's kernels).

    torchrun --standalone --nproc-per-node 2 benchmarks/all_to_all.py
    NCCL_MIN_P2P_NCHANNELS=32 torchrun --standalone --nproc-per-node 2 benchmarks/all_to_all.py

NCCL reads its settings when the communicator starts, so each setting is one launch; the NCCL_*
variables set are printed in the header. GB/s counts the bytes a rank sends to other ranks.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the lent machines

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def timed(fn, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, each between a barrier and a device sync."""
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="4096,16384,32768", help="rows each rank sends to each rank")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    settings = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("NCCL_"))
    if rank == 0:
        print(f"# {world} x {torch.cuda.get_device_name()}, torch {torch.__version__}, NCCL "
              f"{'.'.join(map(str, torch.cuda.nccl.version()))}; {settings}", flush=True)
        print("rows/peer | MB/peer | all_to_all ms | GB/s off-rank | peer copy ms | GB/s", flush=True)
    for rows in (int(r) for r in args.rows.split(",")):
        src = torch.randn(world * rows, args.hidden, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        for _ in range(3):  # warm-up: connection setup, buffer registration
            dist.all_to_all_single(dst, src)
        a2a = timed(functools.partial(dist.all_to_all_single, dst, src), args.reps)
        block_bytes = rows * args.hidden * 2
        off_rank = (world - 1) * block_bytes
        copy_ms = copy_gbs = float("nan")
        if world > 1 and torch.cuda.device_count() >= world:  # peer copy needs the peer visible
            peer = torch.empty(rows, args.hidden, device=torch.device("cuda", (local + 1) % world),
                               dtype=torch.bfloat16)
            block = src[:rows]
            peer.copy_(block)
            copy = timed(functools.partial(peer.copy_, block), args.reps)
            copy_ms, copy_gbs = copy * 1e3, block_bytes / copy / 1e9
        worst = [None] * world
        dist.all_gather_object(worst, a2a)
        a2a = max(worst)
        if rank == 0:
            print(f"{rows} | {block_bytes / 1e6:.0f} | {a2a * 1e3:.2f} | {off_rank / a2a / 1e9:.0f} | "
                  f"{copy_ms:.2f} | {copy_gbs:.0f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
