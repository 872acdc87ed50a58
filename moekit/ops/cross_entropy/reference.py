"""Plain-PyTorch reference of one chunk of the fused cross-entropy: per-row loss and the gradient
with respect to the chunk's logits, the same contract as the Triton kernel beside it."""

from __future__ import annotations

import torch


def row_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, scale: float, inv_count: torch.Tensor,
                      ignore_index: int, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [R, V] (unscaled), labels [R]. Returns (loss [R] float32: logsumexp(scale * logits)
    - scale * logits[label], 0 on ignored rows; grad [R, V] in logits' dtype: d(sum(loss) *
    inv_count) / d logits = (softmax - onehot) * scale * inv_count, or None)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale
    keep = labels != ignore_index
    target = torch.where(keep, labels, 0)
    lse = torch.logsumexp(x, dim=-1)
    loss = torch.where(keep, lse - x.gather(1, target[:, None]).squeeze(1), 0.0)
    if not want_grad:
        return loss, None
    grad = torch.softmax(x, dim=-1)
    grad.scatter_add_(1, target[:, None], torch.full_like(loss, -1.0)[:, None])
    grad *= (keep.to(x.dtype) * scale * inv_count.to(x.dtype))[:, None]
    return loss, grad.to(logits.dtype)
