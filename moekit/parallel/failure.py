"""Turn a collective that failed because a peer died or stalled into one clear error.

Every collective is bounded by the process group's timeout (``ParallelConfig.timeout_s``); a
peer that exits makes the transport fail at once. Either way the surviving ranks raise
``PeerFailure`` naming themselves and the likely cause, and exit, instead of hanging.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

# Transport errors of gloo / NCCL reach Python as a plain RuntimeError.
_TRANSPORT_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "peer")


class PeerFailure(RuntimeError):
    pass


def _is_transport_error(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _TRANSPORT_MARKERS)


@contextmanager
def peer_failure_guard(timeout_s: float) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        if not dist.is_initialized() or not _is_transport_error(error):
            raise
        cause = str(error).strip().splitlines()[0][:300]
        raise PeerFailure(
            f"rank {dist.get_rank()} of {dist.get_world_size()}: a collective failed, so another rank has "
            f"most likely died or stopped responding (collectives time out after {timeout_s:g} s). "
            f"Check the other ranks' logs. Transport error: {cause}") from error
