"""Triton kernel of one chunk of the fused cross-entropy (``reference.row_loss_and_grad``): one
program per row streams its logits twice, once for an online logsumexp and once to overwrite
them with their gradient, so the [rows, vocab] block is never copied to float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 2048


@triton.jit
def _row_loss_grad_kernel(logits, stride, labels, loss, inv_count, V, scale, ignore_index,
                          WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride
    label = tl.load(labels + row).to(tl.int64)
    keep = label != ignore_index
    cols = tl.arange(0, BLOCK)
    # Online logsumexp: running max m and sum s of exp(x - m), both per lane, merged at the end.
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, x)
        # lanes still at -inf (no value seen yet) keep s = 0 without computing inf - inf
        s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(x - m_new))
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    target = tl.load(base + tl.where(keep, label, 0)).to(tl.float32) * scale
    tl.store(loss + row, tl.where(keep, lse - target, 0.0))
    if WANT_GRAD:
        factor = tl.where(keep, scale * tl.load(inv_count).to(tl.float32), 0.0)
        for v0 in range(0, V, BLOCK):
            mask = v0 + cols < V
            x = tl.load(base + v0 + cols, mask=mask, other=0.0).to(tl.float32) * scale
            g = (tl.exp(x - lse) - tl.where(v0 + cols == label, 1.0, 0.0)) * factor
            tl.store(base + v0 + cols, g.to(logits.dtype.element_ty), mask=mask)


def row_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, scale: float, inv_count: torch.Tensor,
                      ignore_index: int, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as the reference; the gradient overwrites ``logits`` (returned as it)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(BLOCK_V, triton.next_power_of_2(vocab))
        _row_loss_grad_kernel[(rows,)](logits, logits.stride(0), labels, loss, inv_count, vocab, scale,
                                       ignore_index, WANT_GRAD=want_grad, BLOCK=block, num_warps=8)
    return loss, (logits if want_grad else None)
