"""The MoE layer and its parts: router, balancing, dispatch, experts, statistics."""

from torch import nn

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoE
from moekit.moe.stats import MoEStats


def update_expert_biases(model: nn.Module, reduce_load=None) -> None:
    """Apply the aux-loss-free bias step in every MoE layer of ``model`` (after optimizer.step())."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_expert_bias(reduce_load)


__all__ = ["MoE", "MoEConfig", "MoEStats", "update_expert_biases"]
