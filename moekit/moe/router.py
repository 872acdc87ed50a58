"""Routers: score tokens against experts and choose each token's experts.

All router math runs in float32 (float64 when the input is float64, so that gradcheck works),
whatever the activation dtype. The pure functions here are the definition; ``Router`` holds the
parameters and buffers. A top-k forward on a GPU without autograd (a decode step) runs as one
Triton kernel instead (``moekit.ops.moe.router_kernel``), checked against these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.moe.config import MoEConfig
from moekit.ops.float32_buffers import kept_in_float32
from moekit.ops.moe.counts import count_per_bin


@dataclass
class Routing:
    """One forward's routing decision for T tokens.

    ``topk_idx`` [T, K] (-1 = no expert: dropped by capacity, a padding token, or padding for
    expert choice), ``topk_weight`` [T, K] (0 where the index is -1), ``logits`` / ``scores``
    [T, E], ``chosen_idx`` [T, K]: the choices before capacity drops (what balancing looks at),
    ``valid`` [T] bool: False at padding tokens, which take no expert and no share of the
    balancing (None: every token is real).
    """

    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor
    chosen_idx: torch.Tensor
    valid: torch.Tensor | None = None


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def score(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    if score_func == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"unknown score_func {score_func!r}")


def normalized_scores(scores: torch.Tensor, score_func: str) -> torch.Tensor:
    """Scores as a distribution over experts (sigmoid scores need normalising)."""
    if score_func == "softmax":
        return scores
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def select_experts(
    scores: torch.Tensor,
    top_k: int,
    expert_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> torch.Tensor:
    """Indices [T, K] of each token's chosen experts.

    The bias (aux-loss-free balancing) shifts the choice only. With groups, the ``topk_groups``
    groups with the largest sum of their two best (biased) scores are kept and the others masked
    out before the top-k (DeepSeek-V3's node-limited routing).
    """
    choice = scores if expert_bias is None else scores + expert_bias
    if num_groups > 1:
        tokens, experts = choice.shape
        grouped = choice.view(tokens, num_groups, experts // num_groups)
        group_rank = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep_groups = group_rank.topk(topk_groups, dim=-1).indices
        group_mask = torch.zeros_like(group_rank, dtype=torch.bool).scatter_(1, keep_groups, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(tokens, experts)
    return choice.topk(top_k, dim=-1).indices


def gate_weights(scores: torch.Tensor, idx: torch.Tensor, norm_topk_prob: bool, route_scale: float):
    """Combine weights [T, K] of the chosen experts: their scores, optionally renormalised to sum
    to 1 (also at K = 1, where that makes every weight 1), then scaled (see ``MoEConfig``)."""
    weight = scores.gather(1, idx)
    if norm_topk_prob:
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weight if route_scale == 1.0 else weight * route_scale  # x * 1.0 == x: spare the kernel


def capacity_of(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def real_capacity(valid: torch.Tensor, top_k: int, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """``capacity_of`` the real tokens (``valid`` True) as a device scalar: no host sync. The same
    float64 operations in the same order as ``capacity_of``, so that a padded batch gets exactly the
    capacity of the same batch without its padding."""
    real = valid.sum(dtype=torch.float64)
    return torch.ceil(capacity_factor * real * top_k / num_experts).clamp_min(1)


def apply_capacity(
    idx: torch.Tensor, weight: torch.Tensor, priority: torch.Tensor, num_experts: int, capacity: int | torch.Tensor
):
    """Drop assignments past each expert's capacity; ``priority`` [T, K] says who stays (higher first).

    Returns (idx, weight) with dropped entries set to -1 / 0. Ties in priority keep the
    (slot-major, then token) order, so "position" priority is just a constant.
    """
    tokens, top_k = idx.shape
    # Slot-major flattening: all first choices, then all second choices, ... An index of -1 (a
    # padding token) sorts after every expert and is never kept: it takes no expert's room.
    flat_e = idx.t().reshape(-1)
    key = torch.where(flat_e < 0, num_experts, flat_e)
    flat_p = priority.t().reshape(-1)
    by_priority = torch.sort(-flat_p, stable=True).indices
    sorted_e, perm = torch.sort(key[by_priority], stable=True)
    order = by_priority[perm]
    counts = count_per_bin(key, num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat_e.numel(), device=idx.device) - starts[sorted_e]
    keep = torch.empty_like(flat_e, dtype=torch.bool)
    keep[order] = (rank < capacity) & (sorted_e < num_experts)
    keep = keep.view(top_k, tokens).t()
    return torch.where(keep, idx, -1), torch.where(keep, weight, 0)


def expert_choice(scores: torch.Tensor, capacity: int):
    """Each expert takes its ``capacity`` highest-scoring tokens (Zhou et al., 2022), weighted by
    the raw score. The router sizes ``capacity`` as ``capacity_of`` (see ``MoEConfig``).

    Returns token-major (idx [T, Kmax], weight [T, Kmax]) with -1 / 0 padding, Kmax being the
    most experts any token got. Finding Kmax needs one host sync; expert choice also lets a
    token's routing depend on later tokens, so it is for encoders or non-causal use.
    """
    tokens, num_experts = scores.shape
    capacity = min(capacity, tokens)
    picked = scores.t().topk(capacity, dim=-1).indices  # [E, C]
    chosen = torch.zeros(num_experts, tokens, dtype=torch.bool, device=scores.device)
    chosen.scatter_(1, picked, True)
    chosen = chosen.t()  # [T, E]
    kmax = max(1, int(chosen.sum(dim=-1).max()) if tokens else 0)
    masked = torch.where(chosen, scores, -1.0)
    top = masked.topk(kmax, dim=-1)
    valid = top.values >= 0
    return torch.where(valid, top.indices, -1), torch.where(valid, top.values, 0)


def _router_kernel():
    from moekit.ops.moe import router_kernel  # triton is optional (moekit[kernels]): import it where it runs

    return router_kernel


class Router(nn.Module):
    """Linear router with the expert-bias buffer used by aux-loss-free balancing."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        # Float32 buffers: the bias moves by small steps that bf16 would round away.
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self.register_buffer("load_since_update", torch.zeros(config.num_experts, dtype=torch.float32))
        nn.init.normal_(self.weight, std=config.init_std)

    def _apply(self, fn, recurse=True):
        # The balancing buffers stay float32, values intact, when the module is cast (.double(), .bfloat16()).
        with kept_in_float32(self, ("expert_bias", "load_since_update")):
            return super()._apply(fn, recurse)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        dtype = router_dtype(x.dtype)
        x = x.to(dtype)
        if self.training and self.config.router_jitter > 0:
            eps = self.config.router_jitter
            # Drawn in float32: in bf16, 1 +- 0.01 takes four values, none above 1.
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, self.weight.to(dtype), bias)

    def _one_kernel(self, x: torch.Tensor) -> bool:
        """Whether a GPU runs this forward as one Triton kernel (``router_kernel``): top-k routing
        without autograd or jitter, e.g. a decode step."""
        cfg = self.config
        return (cfg.router_type == "topk" and cfg.num_groups == 1 and not (self.training and cfg.router_jitter > 0)
                and _router_kernel().fits(x, self.weight, self.bias, cfg.top_k))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> Routing:
        """Route tokens ``x`` [T, H]; ``valid`` [T] bool is False at padding tokens (None: all real)."""
        # The router's math in float32 under autocast too: autocast would run its GEMM in bf16,
        # and the routing and balancing losses would then follow bf16 logits.
        with torch.autocast(x.device.type, enabled=False):
            return self._route(x, valid)

    def _route(self, x: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        cfg = self.config
        tokens = x.shape[0]
        if x.is_cuda and self._one_kernel(x):
            logits, scores, idx, weight = _router_kernel().route_topk(
                x, self.weight, self.bias, self.expert_bias, cfg.score_func, cfg.top_k, cfg.norm_topk_prob,
                cfg.route_scale)
        else:
            logits = self.logits(x)
            scores = score(logits, cfg.score_func)
            if cfg.router_type == "expert_choice":
                # Sized by the real tokens (one host sync; expert choice has one anyway, for Kmax).
                real = tokens if valid is None else int(valid.sum())
                capacity = capacity_of(real, cfg.top_k, cfg.num_experts, cfg.capacity_factor or 1.0)
                # Padding below every score: experts take it last, and then it counts as not chosen.
                ranked = scores if valid is None else scores.masked_fill(~valid[:, None], -1.0)
                idx, weight = expert_choice(ranked, capacity)
            else:
                idx = select_experts(scores, cfg.top_k, self.expert_bias.to(scores.dtype),
                                     cfg.num_groups, cfg.topk_groups)
                weight = gate_weights(scores, idx, cfg.norm_topk_prob, cfg.route_scale)
        if valid is not None:  # padding takes no expert (and so no capacity, no load)
            idx = idx.masked_fill(~valid[:, None], -1)
            weight = weight.masked_fill(~valid[:, None], 0)
        chosen_idx = idx
        if cfg.capacity_factor is not None and cfg.router_type == "topk":
            # Sized by the real tokens: padding must not enlarge the experts' room any more than fill it.
            capacity = (capacity_of(tokens, cfg.top_k, cfg.num_experts, cfg.capacity_factor) if valid is None
                        else real_capacity(valid, cfg.top_k, cfg.num_experts, cfg.capacity_factor))
            priority = (scores.gather(1, idx.clamp_min(0)) if cfg.drop_policy == "probability"
                        else torch.zeros_like(weight))  # (a padding token's -1 is never kept whatever its priority)
            idx, weight = apply_capacity(idx, weight, priority, cfg.num_experts, capacity)
        return Routing(idx, weight, logits, scores, chosen_idx, valid)
