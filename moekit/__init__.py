"""moekit: sparse Mixture-of-Experts language models in readable PyTorch."""

from moekit.moe import MoE, MoEConfig, MoEStats

__all__ = ["MoE", "MoEConfig", "MoEStats"]
__version__ = "0.1.0"
