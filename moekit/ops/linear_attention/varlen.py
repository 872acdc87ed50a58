"""Packed variable-length sequences (``cu_seqlens``) for the reference forms.

The reference runs each sequence on its own, each from its own initial state; a fused kernel
would walk the packed tensor directly but must give the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def run_per_sequence(fn: Callable, per_token: Sequence[torch.Tensor | None], bounds: list[int],
                     initial_state: torch.Tensor | None):
    """Call ``fn(*pieces, initial_state=...)`` on each [1, T_i, ...] slice of the packed
    per-token tensors; concatenate the outputs along T and stack the final states along dim 0."""
    outputs, states = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        pieces = [None if t is None else t[:, start:end] for t in per_token]
        init = None if initial_state is None else initial_state[i:i + 1]
        o, s = fn(*pieces, initial_state=init)
        outputs.append(o)
        states.append(s)
    return torch.cat(outputs, dim=1), torch.cat(states, dim=0)
