"""Configuration of one MoE layer."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moekit.validation import check_known_keys, is_int, is_number

SCORE_FUNCS = ("softmax", "sigmoid")
ROUTER_TYPES = ("topk", "expert_choice")
ACTIVATIONS = ("swiglu", "geglu", "gelu")
BACKENDS = ("auto", "reference", "grouped_mm", "triton")
PRECISIONS = ("bf16", "fp8", "mxfp8")
DROP_POLICIES = ("probability", "position")
FLAGS = ("shared_expert_gate", "norm_topk_prob", "router_bias", "cache_fp8_weights", "check_finite")
REALS = ("route_scale", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate", "router_jitter",
         "init_std")


@dataclass
class MoEConfig:
    """Every knob of an MoE layer. Field names are public API (see DESIGN.md).

    Routing: each token's router scores (``score_func``) pick ``top_k`` experts; with
    ``num_groups > 1`` the choice is first limited to the ``topk_groups`` best groups
    (a group's rank is the sum of its two best biased scores, as in DeepSeek-V3; DeepSeek-V2's
    rank by the best score alone is not offered). The expert bias (aux-loss-free balancing)
    changes which experts are chosen, never the weights. A weight is the chosen expert's score,
    divided by the sum of the token's chosen scores when ``norm_topk_prob`` (at ``top_k=1`` too, as
    Hugging Face's Mixtral / Qwen-MoE do: the weight is then 1 and the router learns from the
    balancing losses alone; DeepSeek-V2 and Megatron-Core's sigmoid router skip it at top-1, so
    Switch-style top-1 wants ``norm_topk_prob=False``), then multiplied by ``route_scale``
    (DeepSeek-V3's ``routed_scaling_factor``, after the normalisation, and without it too).

    Capacity: ``capacity_factor=None`` is dropless. Otherwise each expert takes at most
    ``ceil(capacity_factor * tokens * top_k / num_experts)`` assignments (``tokens``: the real ones,
    padding excluded, so padding a batch changes no drop) and ``drop_policy``
    says which survive: "probability" keeps the highest routing scores (the unbiased score of
    the expert, not the normalised or scaled weight that Megatron-Core's "probs" policy ranks by),
    "position" keeps first choices before second choices and, within a choice rank, earlier tokens
    first (the GShard / Switch order; Megatron-Core's "position" is token order alone).

    Expert choice (Zhou et al., 2022): each expert takes its ``ceil(capacity_factor * tokens *
    top_k / num_experts)`` best-scoring real tokens, i.e. the paper's capacity factor c (experts
    per token on average) is ``capacity_factor * top_k``; ``capacity_factor=None`` means 1.0 here.

    Balancing in your own training loop: add the layer's ``aux_loss`` (the ``*_loss_coef``-weighted
    losses; ``MoEForCausalLM``'s ``loss`` already includes them) to the loss. ``bias_update_rate``
    only counts the load during training forwards: the bias moves when you call
    ``moekit.moe.update_expert_biases(model)`` (or ``MoE.update_expert_bias``) after each
    ``optimizer.step()``; without that call it stays 0.
    """

    hidden_size: int = 256
    ffn_hidden_size: int = 512
    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 0
    shared_ffn_hidden_size: int | None = None
    shared_expert_gate: bool = False  # Qwen2/Qwen3-Next: sigmoid(x @ w) scales the shared output
    score_func: str = "softmax"
    num_groups: int = 1
    topk_groups: int = 1
    norm_topk_prob: bool = True
    route_scale: float = 1.0
    router_type: str = "topk"
    router_bias: bool = False  # a learned bias in the router projection (rare; GPT-OSS style)
    aux_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    capacity_factor: float | None = None
    drop_policy: str = "probability"
    router_jitter: float = 0.0
    activation: str = "swiglu"
    backend: str = "auto"
    precision: str = "bf16"
    cache_fp8_weights: bool = False  # keep the quantized expert weights between calls (fp8 / mxfp8)
    check_finite: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    @property
    def shared_hidden_size(self) -> int:
        """Intermediate size of the fused shared-expert MLP (all shared experts as one)."""
        per_expert = self.shared_ffn_hidden_size or self.ffn_hidden_size
        return self.num_shared_experts * per_expert

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"MoEConfig: {msg}")

        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "num_groups", "topk_groups"):
            value = getattr(self, name)
            need(is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(is_int(self.num_shared_experts) and self.num_shared_experts >= 0,
             f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        width = self.shared_ffn_hidden_size  # None (or 0): ffn_hidden_size
        need(width is None or (is_int(width) and width >= 0),
             f"shared_ffn_hidden_size must be None or an integer >= 0, got {width!r}")
        # Before any comparison: a string is truthy ("false" would switch a flag on) and cannot be compared.
        for name in FLAGS:
            need(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in REALS:
            need(is_number(getattr(self, name)), f"{name} must be a number, got {getattr(self, name)!r}")
        need(self.capacity_factor is None or is_number(self.capacity_factor),
             f"capacity_factor must be None or a number, got {self.capacity_factor!r}")
        if self.num_shared_experts == 0:
            # These configure nothing then: a layer meant to have a (gated) shared expert would silently have none.
            unused = [f"{name}={getattr(self, name)!r}" for name in ("shared_expert_gate", "shared_ffn_hidden_size")
                      if getattr(self, name)]
            need(not unused, f"num_shared_experts is 0: there is no shared expert for {', '.join(unused)}")
        need(self.score_func in SCORE_FUNCS, f"unknown score_func {self.score_func!r}; choose from {SCORE_FUNCS}")
        need(self.router_type in ROUTER_TYPES,
             f"unknown router_type {self.router_type!r}; choose from {ROUTER_TYPES}")
        need(self.activation in ACTIVATIONS, f"unknown activation {self.activation!r}; choose from {ACTIVATIONS}")
        need(self.backend in BACKENDS, f"unknown backend {self.backend!r}; choose from {BACKENDS}")
        need(self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose from {PRECISIONS}")
        need(self.drop_policy in DROP_POLICIES,
             f"unknown drop_policy {self.drop_policy!r}; choose from {DROP_POLICIES}")
        need(self.top_k <= self.num_experts,
             f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        need(self.num_experts % self.num_groups == 0,
             f"num_experts ({self.num_experts}) must be divisible by num_groups ({self.num_groups})")
        need(self.topk_groups <= self.num_groups,
             f"topk_groups ({self.topk_groups}) must be <= num_groups ({self.num_groups})")
        if self.num_groups > 1:
            per_group = self.num_experts // self.num_groups
            need(per_group >= 2, "group-limited routing ranks groups by their two best scores: "
                 f"each group needs >= 2 experts, got {per_group}")
            need(self.top_k <= self.topk_groups * per_group,
                 f"top_k ({self.top_k}) exceeds the experts in topk_groups ({self.topk_groups} x {per_group})")
        need(self.capacity_factor is None or 0 < self.capacity_factor < math.inf,
             f"capacity_factor must be None (dropless) or finite and > 0, got {self.capacity_factor}")
        need(self.router_type != "expert_choice" or self.num_groups == 1,
             "expert_choice routing does not combine with group-limited routing")
        if self.router_type == "expert_choice":
            # Balanced by construction, its weights are the raw scores, and an expert keeps its
            # best-scoring tokens: the balancing, weight and drop settings of top-k routing do nothing.
            unused = [f"{name}={getattr(self, name)!r}" for name, default in
                      (("aux_loss_coef", 0.0), ("seq_aux_loss_coef", 0.0), ("bias_update_rate", 0.0),
                       ("route_scale", 1.0), ("norm_topk_prob", True), ("drop_policy", "probability"))
                      if getattr(self, name) != default]
            need(not unused, f"expert_choice routing does not use {', '.join(unused)}: leave them at their defaults")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate", "init_std"):
            value = getattr(self, name)
            need(0 <= value < math.inf, f"{name} must be finite and >= 0, got {value}")
        # The jitter multiplies the router input by uniform(1 - eps, 1 + eps): eps >= 1 could zero or flip it.
        need(0 <= self.router_jitter < 1, f"router_jitter must lie in [0, 1), got {self.router_jitter}")
        need(0 < self.route_scale < math.inf, f"route_scale must be finite and > 0, got {self.route_scale}")
        need(not self.cache_fp8_weights or self.precision != "bf16",
             "cache_fp8_weights keeps quantized copies of the expert weights: it needs precision 'fp8' or 'mxfp8'")
        if self.precision != "bf16":
            # FP8 / MXFP8 GEMMs work in whole 128-wide scale blocks (DeepSeek-V3's 128x128 weight tiles).
            for name in ("hidden_size", "ffn_hidden_size"):
                need(getattr(self, name) % 128 == 0,
                     f"precision {self.precision!r} needs {name} to be a multiple of 128, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoEConfig:
        """Build from a mapping, refusing keys that are not fields (typos must not pass silently)."""
        check_known_keys(cls, values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
