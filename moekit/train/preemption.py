"""SIGTERM, a scheduler's preemption notice, as a request to checkpoint and stop.

Without a handler SIGTERM ends the process at once, losing the steps since the last checkpoint.
While a ``StopRequest`` is active (all of ``Trainer.train``), the signal only sets a flag that the loop
reads at its next log point, where it checkpoints and returns. Signal handlers can only be set
from the main thread; elsewhere the default behaviour stays.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
