"""How routed tokens reach their experts.

The MoE layer hands its routing to a dispatcher object. ``LocalDispatcher`` (the default) runs
every expert on this device; ``moekit.parallel`` installs an all-to-all dispatcher for expert
parallelism through ``MoE.set_dispatcher``. A dispatcher has two calls per layer pass:
``start(x)`` before the router runs (a dispatcher whose token rows do not depend on the routing
can send them then, so the transfer overlaps the router) and ``__call__`` with the routing and
what ``start`` returned. The shared-expert callable is passed in so that a dispatcher can overlap
it with communication too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.moe.experts import RoutedExperts
from moekit.ops import moe as moe_ops


class LocalDispatcher:
    def __init__(self, backend: str = "auto", precision: str = "bf16"):
        self.backend = backend
        self.precision = precision

    def start(self, x: torch.Tensor) -> None:
        """Nothing to send ahead: every expert is here."""
        return None

    def __call__(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weight: torch.Tensor,
        experts: RoutedExperts,
        shared: Callable[[torch.Tensor], torch.Tensor] | None = None,
        started: None = None,
    ) -> torch.Tensor:
        out = moe_ops.routed_experts(x, topk_idx, topk_weight, experts.w_up, experts.w_down,
                                     experts.activation, self.backend, self.precision, experts.fp8_weights)
        return out if shared is None else out + shared(x)
