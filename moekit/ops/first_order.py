"""First-order-only autograd Functions refuse a backward that would build a graph.

Several ops form their gradients in plain (non-differentiable) kernels, or in the forward pass, and
their backward only scales or combines them. Under ``create_graph=True`` (Hessian-vector products,
gradient penalties, MAML) such a backward would hand back a gradient that looks differentiable but
leaves out the op's own curvature: silently wrong second derivatives. ``once_differentiable`` does not
catch that case: it only fires when the incoming gradient itself requires grad.
"""

from __future__ import annotations

import torch


def refuse_create_graph(op: str, instead: str) -> None:
    """Call first in a backward: autograd runs it in grad mode exactly when ``create_graph=True``.
    ``instead`` names the differentiable path the caller can take."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} has no second derivative: its backward is not differentiable, so "
                           f"create_graph=True (double backward) would silently leave out its curvature; "
                           f"for second derivatives use {instead}")
