"""Hugging Face transformers <-> moekit conversion.

``from_hf(model_or_folder)`` gives a ``MoEForCausalLM`` computing the same logits;
``to_hf(model)`` goes back to the source architecture. Each architecture is one module that
registers an ``Architecture`` (HF config -> ``ModelConfig``, one tensor rule per moekit
tensor); ``convert`` holds the shared checking and copying.
"""

from moekit.models.hf import (  # noqa: F401  (registration)
    deepseek_v3,
    granitemoehybrid,
    minimax,
    mixtral,
    olmoe,
    qwen3_moe,
    qwen3_next,
)
from moekit.models.hf.convert import from_hf, to_hf
from moekit.models.hf.spec import ARCHITECTURES

__all__ = ["ARCHITECTURES", "from_hf", "to_hf"]
