"""The MoE layer: router -> balancing losses -> dispatch to experts (+ shared experts)."""

from __future__ import annotations

import torch
from torch import nn

from moekit.moe import balancing
from moekit.moe.config import MoEConfig
from moekit.moe.dispatch import LocalDispatcher
from moekit.moe.experts import FeedForward, RoutedExperts
from moekit.moe.router import Router
from moekit.moe.stats import MoEStats, expert_counts
from moekit.ops.moe.weight_cache import WeightCache


class MoE(nn.Module):
    """A sparse Mixture-of-Experts FFN. ``MoE(config)(x)`` maps [..., hidden] to the same shape.

    After each forward, ``last_stats`` holds an ``MoEStats`` and ``aux_loss`` the sum of the
    enabled balancing losses, weighted by their coefficients (a scalar in the graph). Inputs of
    three or more dims are read as [..., sequence, hidden] for the sequence-wise loss. A forward
    without autograd computes both only when they are read (``balancing.Balance``). So under
    ``torch.utils.checkpoint``, pass ``use_reentrant=False``: the reentrant form runs the forward
    without autograd, and an ``aux_loss`` read after it carries no gradient to the router.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.router = Router(config)
        self.experts = RoutedExperts(config.num_experts, config.hidden_size, config.ffn_hidden_size,
                                     config.activation, config.init_std)
        self.shared = None
        self.shared_gate = None
        if config.num_shared_experts > 0:
            self.shared = FeedForward(config.hidden_size, config.shared_hidden_size, config.activation,
                                      config.init_std)
            if config.shared_expert_gate:
                self.shared_gate = nn.Linear(config.hidden_size, 1, bias=False)
        if config.cache_fp8_weights:
            self.experts.fp8_weights = WeightCache()
        self.dispatcher = LocalDispatcher(config.backend, config.precision)
        self.balance: balancing.Balance | None = None  # the last forward's

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return None if self.balance is None else self.balance.value()[0]

    @property
    def last_stats(self) -> MoEStats | None:
        return None if self.balance is None else self.balance.value()[1]

    def __getstate__(self) -> dict:
        """A copy (copy.deepcopy, pickle, torch.save of the module) starts without the last forward's
        losses and statistics: after a training forward they are tensors of its autograd graph,
        which deepcopy refuses."""
        state = super().__getstate__()
        state["balance"] = None
        return state

    def set_dispatcher(self, dispatcher) -> None:
        self.dispatcher = dispatcher

    def _check_input(self, x: torch.Tensor) -> None:
        if not torch.is_floating_point(x):
            raise TypeError(f"MoE: input must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"MoE: expected input [..., hidden_size={self.config.hidden_size}], "
                             f"got shape {tuple(x.shape)}")

    def _shared_output(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        if self.shared_gate is not None:
            out = out * torch.sigmoid(self.shared_gate(x))
        return out

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [..., H]; ``token_mask`` (x's leading shape, bool) is False at padding tokens: they take
        no expert, no capacity and no share of the balancing losses, statistics or bias load."""
        self._check_input(x)
        cfg = self.config
        shape = x.shape
        h = x.reshape(-1, cfg.hidden_size)
        num_sequences = h.shape[0] // shape[-2] if x.dim() >= 3 and shape[-2] else 1
        valid = None
        if token_mask is not None:
            if token_mask.shape != shape[:-1]:
                raise ValueError(f"MoE: token_mask shape {tuple(token_mask.shape)} != the input's leading shape "
                                 f"{tuple(shape[:-1])}")
            valid = token_mask.reshape(-1).bool()
            # Padding rows may hold anything (NaN from a fully masked attention row): zeroed, they cannot
            # reach the router's losses, statistics or gradients through a 0 weight (0 * NaN is NaN).
            h = h.masked_fill(~valid[:, None], 0)
        if cfg.check_finite and not torch.isfinite(h).all():  # after the masking: padding may hold anything
            raise ValueError("MoE: input contains NaN or Inf (check_finite=True)")

        started = self.dispatcher.start(h)  # e.g. the token rows leave while the router runs
        routing = self.router(h, valid)
        self.balance = balancing.Balance(routing, cfg, num_sequences)
        # Only training batches count: a forward without autograd (a sample generated mid-training with the
        # model left in train mode) feeds no optimizer step, and must not move the bias at the next one.
        if self.training and cfg.bias_update_rate > 0 and torch.is_grad_enabled():
            self.router.load_since_update += expert_counts(routing.chosen_idx, cfg.num_experts)

        shared = self._shared_output if self.shared is not None else None
        out = self.dispatcher(h, routing.topk_idx, routing.topk_weight, self.experts, shared, started)
        return out.view(shape)

    @torch.no_grad()
    def update_expert_bias(self, reduce_load=None) -> None:
        """Aux-loss-free balancing step; call after each optimizer step. ``reduce_load`` (e.g. an
        all-reduce over the expert-parallel group) makes every rank apply the same update."""
        if self.config.bias_update_rate <= 0:
            return
        load = self.router.load_since_update
        if reduce_load is not None:
            load = reduce_load(load)
        if load.sum() > 0:
            self.router.expert_bias.copy_(balancing.bias_step(self.router.expert_bias, load,
                                                              self.config.bias_update_rate))
        self.router.load_since_update.zero_()
