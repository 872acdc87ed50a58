"""Rebuild a trained model (and its tokenizer and config) from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from moekit.data import load_tokenizer
from moekit.data.tokenizer import Tokenizer
from moekit.models import MoEForCausalLM
from moekit.train.checkpoint import CheckpointError, load_object, resolve_checkpoint, verify_checkpoint
from moekit.train.config import TrainConfig


def read_checkpoint_config(ckpt: Path) -> dict:
    path = ckpt / "config.yaml"
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"checkpoint config {path} is unreadable: {exc}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint config {path} is not a mapping")
    return values


def load_model_state(model: nn.Module, ckpt: Path) -> None:
    state = load_object(ckpt, "model")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [s.strip() for s in str(exc).strip().splitlines()]
        detail = " ".join(lines[:3])
        raise CheckpointError(f"checkpoint {ckpt / 'model.pt'} does not fit this model: {detail}") from None


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, TrainConfig, Tokenizer]:
    """The model (in eval mode), its training config and tokenizer, from a checkpoint or run directory."""
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt)
    config = TrainConfig.from_dict(read_checkpoint_config(ckpt))
    model = MoEForCausalLM(config.model)
    if (ckpt / ".metadata").is_file():  # written by a multi-process (torchrun) run
        from moekit.parallel import load_checkpoint
        load_checkpoint(str(ckpt), model)
    else:
        load_model_state(model, ckpt)
    tokenizer = load_tokenizer(None if config.data.tokenizer == "byte" else str(ckpt / "tokenizer.json"))
    return model.to(device).eval(), config, tokenizer
