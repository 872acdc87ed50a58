"""Save / load a model as a folder: ``config.json`` + ``model.safetensors``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moekit.models.config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TIED_HEAD = "lm_head.weight"


def _stored_state(model) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: the state dict without the tied head (one copy is enough)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop(TIED_HEAD)
    return state


def write_replacing(path: Path, write) -> None:
    """``write(tmp)`` next to ``path``, then rename it over ``path``: a save that fails or is
    interrupted (disk full, a killed job) leaves the file that was there whole."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_pretrained(model, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(model.config.to_dict(), indent=2)
    tensors = {name: t.detach().contiguous() for name, t in _stored_state(model).items()}
    write_replacing(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_replacing(directory / CONFIG_NAME, lambda tmp: tmp.write_text(config_text))


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return ModelConfig.from_dict(values)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source) -> None:
    """Refuse, by name, tensors that are missing, unexpected or of the wrong shape."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensor(s) {missing}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {unexpected}")
    for name in sorted(set(expected) & set(found)):
        if expected[name].shape != found[name].shape:
            problems.append(f"tensor {name!r} has shape {tuple(found[name].shape)}, "
                            f"the model expects {tuple(expected[name].shape)}")
    if problems:
        raise ValueError(f"{source} does not match the config: " + "; ".join(problems))


def _keep_saved_dtypes(model, tensors: dict[str, torch.Tensor]) -> None:
    """Parameters saved in another float precision than the embedding keep it (a converted
    DeepSeek-V3's float32 router in a bf16 model): load_state_dict would round them to the model's."""
    for name, param in model.named_parameters():
        saved = tensors[name].dtype
        if saved != param.dtype and saved.is_floating_point:
            param.data = param.data.to(saved)


def load_pretrained(cls, directory: str | Path, device=None, dtype=None):
    directory = Path(directory)
    config = load_config(directory)
    path = directory / WEIGHTS_NAME
    tensors = _load_tensors(path)
    model = cls(config)
    check_tensors(_stored_state(model), tensors, path)
    keep_saved = dtype is None
    if dtype is None:  # keep the precision the weights were saved in
        dtype = tensors["embed_tokens.weight"].dtype
    model.to(dtype=dtype)
    if keep_saved:
        _keep_saved_dtypes(model, tensors)
    if config.tie_word_embeddings:
        tensors[TIED_HEAD] = tensors["embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True)
    model.eval()  # as transformers returns it: no router jitter, no bias-balancing counts; .train() to fine-tune
    return model.to(device) if device is not None else model
