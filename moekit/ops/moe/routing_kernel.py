"""The routing metadata of a decode-sized call in one Triton program.

``triton_meta.routing_meta`` builds ``counts`` and the stable counting-sort ``order`` from torch
ops: a range check, a scatter-add and a sort, about a dozen kernel launches. A decode step of a
few hundred assignments spends more time launching them than computing, once per MoE layer. Up to
``MAX_ASSIGNMENTS`` assignments one program does it all: each assignment's sorted position is the
number of assignments with a smaller key, plus those with the same key before it (key = expert,
-1 sorting after every expert), counted over the assignments a chunk at a time. The torch path
stays as the reference (and does larger calls).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ASSIGNMENTS = 256  # a decode batch of 32 at top-8; the rank count grows as the square of it
MAX_EXPERTS = 1024
_CHUNK = 16  # assignments compared per step: [N_PAD, 16] tiles stay small


@triton.jit
def _sort_key(idx, live, num_experts):
    """-1 (no expert) after every expert; rows past the end after that (never stored). An index out
    of range sorts like -1: the call fails its range check, and meanwhile every position stays
    below n (a larger key would count the padding rows as ahead of it and store past the end).
    Checked on the index as loaded (an int64 one would wrap if cast first)."""
    key = tl.where((idx < 0) | (idx >= num_experts), num_experts, idx).to(tl.int32)
    return tl.where(live, key, num_experts + 1)


@triton.jit
def _routing_meta_kernel(idx_ptr, counts_ptr, order_ptr, ok_ptr, n, num_experts,
                         N_PAD: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    rows = tl.arange(0, N_PAD)
    live = rows < n
    idx = tl.load(idx_ptr + rows, mask=live, other=-1)
    bad = live & ((idx < -1) | (idx >= num_experts))
    key = _sort_key(idx, live, num_experts)
    pos = tl.zeros([N_PAD], dtype=tl.int32)
    for c0 in range(0, N_PAD, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        col_live = cols < n
        other = _sort_key(tl.load(idx_ptr + cols, mask=col_live, other=-1), col_live, num_experts)
        ahead = (other[None, :] < key[:, None]) | ((other[None, :] == key[:, None]) & (cols[None, :] < rows[:, None]))
        pos += tl.sum(ahead.to(tl.int32), 1)
    tl.store(order_ptr + pos, rows, mask=live)
    experts = tl.arange(0, E_PAD)
    tl.store(counts_ptr + experts, tl.histogram(key, E_PAD, mask=key < num_experts), mask=experts < num_experts)
    tl.store(ok_ptr, (tl.sum(bad.to(tl.int32), 0) == 0).to(tl.int32))


def fits(num_assignments: int, num_experts: int) -> bool:
    """Whether ``routing_meta_small`` takes a call of this size."""
    return 0 < num_assignments <= MAX_ASSIGNMENTS and num_experts <= MAX_EXPERTS


def routing_meta_small(flat: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts [E] int32, order [n] int32, ok [1] int32: 1 when every index lies in [-1, E)) of the
    flattened int32/int64 expert indices ``flat`` [n]; the same counts and order as the torch path."""
    n = flat.numel()
    counts = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
    order = torch.empty(n, dtype=torch.int32, device=flat.device)
    ok = torch.empty(1, dtype=torch.int32, device=flat.device)
    _routing_meta_kernel[(1,)](flat, counts, order, ok, n, num_experts,
                               N_PAD=max(_CHUNK, triton.next_power_of_2(n)),
                               E_PAD=max(2, triton.next_power_of_2(num_experts)), CHUNK=_CHUNK, num_warps=4)
    return counts, order, ok
