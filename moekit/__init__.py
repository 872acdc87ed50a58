"""moekit: sparse Mixture-of-Experts language models in readable PyTorch."""

from moekit.moe.config import MoEConfig

__all__ = ["MoEConfig"]
__version__ = "0.1.0"
