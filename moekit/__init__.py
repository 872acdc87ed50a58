"""moekit: sparse Mixture-of-Experts language models in readable PyTorch."""

from moekit.models import ModelConfig, MoEForCausalLM
from moekit.moe import MoE, MoEConfig, MoEStats

__all__ = ["MoE", "MoEConfig", "MoEStats", "ModelConfig", "MoEForCausalLM"]
__version__ = "0.1.0"
