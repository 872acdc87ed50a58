"""The hybrid Linear-MoE language model, its config, decoding cache, generation and checkpoints."""

from moekit.models.cache import ModelCache
from moekit.models.config import ModelConfig, available_configs
from moekit.models.generation import GenerateOutput, generate
from moekit.models.model import CausalLMOutput, MoEForCausalLM

__all__ = ["CausalLMOutput", "GenerateOutput", "ModelCache", "ModelConfig", "MoEForCausalLM",
           "available_configs", "generate"]
