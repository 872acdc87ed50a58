"""Batches of fixed-length token windows with a resumable position.

The stream is cut into non-overlapping windows of ``seq_len`` tokens; each epoch visits them in
a fresh order drawn from the pair (seed, epoch). The whole position is ``(epoch, index)``, so a
checkpoint restores it exactly and a resumed run reads the same batches as an unbroken one.
The saved position also names its stream (window count, ``seq_len``, a fingerprint), so it is
refused on another stream, where it would point at other windows or past the end.
Labels equal the inputs (Hugging Face convention: the model shifts them).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


class TokenWindows:
    """Windows of ``seq_len`` tokens over a 1-D token array (in memory or memory-mapped)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int, name: str):
        if seq_len < 2:  # the loss has no target: NaN in training, a division by zero in evaluation
            raise ValueError(f"train.seq_len={seq_len}: a window needs at least 2 tokens (each predicts the next)")
        self.num_windows = len(tokens) // seq_len
        if self.num_windows == 0:
            raise ValueError(
                f"{name} holds {len(tokens)} tokens, fewer than one window of seq_len={seq_len}"
            )
        self.tokens, self.seq_len, self.vocab_size, self.name = tokens, seq_len, vocab_size, name

    def batch(self, window_ids: list[int]) -> torch.Tensor:
        rows = [np.asarray(self.tokens[i * self.seq_len : (i + 1) * self.seq_len]) for i in window_ids]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        top = int(batch.max())
        if top >= self.vocab_size:  # checked per batch: a .bin file may be too big to scan up front
            raise ValueError(f"{self.name}: token id {top} >= the model's vocab_size {self.vocab_size}")
        return batch

    def fingerprint(self) -> int:
        """CRC-32 of the first and last windows: reads two windows (cheap even memory-mapped), yet tells
        apart most other streams of the same length. Hashed as int64, so the file's dtype does not count."""
        last = (self.num_windows - 1) * self.seq_len
        ends = np.concatenate([self.tokens[: self.seq_len], self.tokens[last : last + self.seq_len]])
        return zlib.crc32(np.asarray(ends, dtype=np.int64).tobytes())


class ShuffledBatches:
    """Endless training batches; ``state_dict`` / ``load_state_dict`` carry the position."""

    # Epoch orders are seeded from (seed, epoch) by ORDER_SEEDING; version 1 (seed + epoch) gave seed s
    # at epoch 1 the order of seed s + 1 at epoch 0, so neighbouring seeds saw the same orders shifted.
    # A checkpoint without the key was written with version 1 and keeps it, so it resumes exactly.
    ORDER_SEEDING = 2

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.epoch, self.index = 0, 0
        self.order_seeding = self.ORDER_SEEDING
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            if self.order_seeding == 1:
                epoch_seed = self.seed + self.epoch
            else:  # distinct for every (seed, epoch) with epoch < 2**20
                epoch_seed = (self.seed << 20) + self.epoch
            gen = torch.Generator().manual_seed(epoch_seed)
            self._order = torch.randperm(self.windows.num_windows, generator=gen).tolist()
        return self._order

    def next_batch(self) -> torch.Tensor:
        ids = []
        while len(ids) < self.batch_size:
            ids.append(self._epoch_order()[self.index])
            self.index += 1
            if self.index == self.windows.num_windows:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return self.windows.batch(ids)

    def state_dict(self) -> dict[str, int]:
        w = self.windows
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "order_seeding": self.order_seeding,
                "num_windows": w.num_windows, "seq_len": w.seq_len, "fingerprint": w.fingerprint()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data position was saved with seed {state['seed']}, this run uses {self.seed}")
        w = self.windows
        if "num_windows" in state:  # absent from checkpoints written before these keys: not checked
            saved = f"data position saved for {state['num_windows']} windows of seq_len {state['seq_len']}"
            if (state["num_windows"], state["seq_len"]) != (w.num_windows, w.seq_len):
                raise ValueError(f"{saved}; this run has {w.num_windows} windows of seq_len {w.seq_len}: "
                                 "resume with the same data and train.seq_len")
            if state["fingerprint"] != w.fingerprint():
                raise ValueError(f"{saved}; this run's {w.name} has as many windows but other tokens: "
                                 "resume with the same data (and tokenizer)")
        if state["index"] >= w.num_windows:  # an old checkpoint on shorter data
            raise ValueError(f"data position {state['index']} is past this run's {w.num_windows} windows: "
                             "resume with the same data and train.seq_len")
        self.epoch, self.index, self._order = state["epoch"], state["index"], None
        self.order_seeding = state.get("order_seeding", 1)


def eval_batches(windows: TokenWindows, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """The first ``max_batches`` batches of held-out windows, in order (the same every evaluation)."""
    count = min(windows.num_windows, batch_size * max_batches)
    ids = list(range(count))
    return [windows.batch(ids[i : i + batch_size]) for i in range(0, count, batch_size)]
