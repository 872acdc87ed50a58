"""Language-model head and cross-entropy in one op, in row chunks.

``F.cross_entropy(lm_head(h).float(), labels)`` over a batch of B*T tokens and a vocabulary of V
materialises [B*T, V] logits several times (the head's output, its float32 copy, log-softmax,
their gradients): at 16k tokens and a 152k vocabulary that is 10 GB a copy, and on an H200 the
softmax and elementwise passes took a third of a training step. Here the head runs on chunks of
rows; each chunk's logits are reduced to a per-row loss and overwritten in place by their
gradient, which is multiplied into the hidden-state and weight gradients at once, so the backward
pass only scales them by the incoming gradient. The chunk's logits are the only [rows, V] buffer.
"""

from __future__ import annotations

import torch

from moekit.ops.first_order import refuse_create_graph
from moekit.validation import is_int

from . import reference

MAX_CHUNK_BYTES = 1 << 30  # one chunk's logits in the compute dtype


def _row_kernel_for(logits: torch.Tensor):
    """The Triton row kernel on CUDA (not float64), else the reference: same contract."""
    if logits.is_cuda and logits.dtype != torch.float64:
        from . import triton as kernel  # noqa: PLC0415  (Triton only where it can run)

        return kernel.row_loss_and_grad
    return reference.row_loss_and_grad


def chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: about MAX_CHUNK_BYTES of logits, a multiple of 64."""
    return max(64, MAX_CHUNK_BYTES // (vocab * dtype.itemsize) // 64 * 64)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, ignore_index, rows, compute_dtype, want_grad):
        h_all, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        count = (labels != ignore_index).sum()
        loss_dtype = torch.promote_types(compute_dtype, torch.float32)
        inv_count = 1.0 / count.clamp_min(1).to(loss_dtype)
        total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        grad_h = torch.empty_like(h_all) if want_grad else None
        grad_w = torch.zeros(weight.shape, dtype=loss_dtype, device=weight.device) if want_grad else None
        for start in range(0, hidden.shape[0], rows):
            h = h_all[start:start + rows]
            logits = h @ w.t()
            loss, grad = _row_kernel_for(logits)(logits, labels[start:start + rows], scale, inv_count, ignore_index,
                                                 want_grad)
            total += loss.sum()
            if want_grad:
                torch.mm(grad, w, out=grad_h[start:start + rows])
                grad_w += grad.t() @ h  # summed over chunks in float32
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total / count  # NaN when every label is ignored, as F.cross_entropy gives

    @staticmethod
    def backward(ctx, grad_out):
        # the saved gradients are constants in grad_out
        refuse_create_graph("linear_cross_entropy", "F.cross_entropy on the full logits (return_logits=True)")
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return ((grad_h * grad_out).to(h_dtype) if ctx.needs_input_grad[0] else None,
                (grad_w * grad_out).to(w_dtype) if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None)


@torch.compiler.disable  # eager under torch.compile: a host-side label check and a Python chunk loop
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float = 1.0,
                         ignore_index: int = -100, rows: int | None = None) -> torch.Tensor:
    """Mean over non-ignored rows of cross_entropy(scale * hidden @ weight.T, labels), without the
    full logits: hidden [N, H], weight [V, H], labels [N] in [0, V) or ``ignore_index``. Runs in
    the autocast dtype when autocast is on (as ``nn.Linear`` would), else in hidden's dtype."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden [N, H] and weight [V, H] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1] or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"linear_cross_entropy: labels must be an integer tensor of shape "
                         f"[{hidden.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
    if rows is not None and not (is_int(rows) and rows > 0):
        # range() with a step <= 0 would run no chunk: a loss of 0 and unwritten gradients
        raise ValueError(f"linear_cross_entropy: rows must be None or a positive integer, got {rows!r}")
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        # float(scale) below would cut it from the graph: a learned temperature would silently get no gradient
        raise ValueError("linear_cross_entropy: scale is a constant here: a tensor that requires grad gets no "
                         "gradient; pass a number, or scale hidden (or weight) by it before the call")
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise ValueError(f"linear_cross_entropy: labels must lie in [0, {vocab}) or equal ignore_index "
                         f"{ignore_index}; got {labels[bad][0].item()}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    # Gradients are formed in the forward pass (grad mode is off inside it), only when wanted.
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, labels.contiguous(), float(scale), ignore_index,
                                         rows if rows is not None else chunk_rows(vocab, dtype), dtype, want_grad)
