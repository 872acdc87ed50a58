"""``TrainConfig``: model + data + loop settings, loadable from YAML with dotted overrides.

A YAML file has up to three sections, ``model`` (a ``ModelConfig``), ``data`` (a
``DataConfig``) and ``train`` (a ``LoopConfig``); overrides are ``section.key=value`` strings
(``model.moe.top_k=4``, ``train.lr=1e-3``) whose values are read as YAML scalars. Unknown keys
are refused with their full dotted name.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moekit.data.config import DataConfig
from moekit.models import ModelConfig
from moekit.parallel.config import ParallelConfig

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "train_default.yaml"
DTYPES = ("auto", "fp32", "bf16")


@dataclass
class LoopConfig:
    """The training loop: optimisation, schedule, logging, checkpoints (the ``train`` section)."""

    out_dir: str = "runs/default"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "auto"  # "auto": bf16 autocast on cuda, fp32 on cpu
    compile: bool = False
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    sample_tokens: int = 200
    sample_prompt: str = "def "
    temperature: float = 0.8
    top_k: int = 40

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
                     "eval_batches", "ckpt_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        for name in ("lr", "weight_decay", "grad_clip", "warmup_steps", "sample_tokens", "top_k"):
            if not getattr(self, name) >= 0 or getattr(self, name) == float("inf"):
                raise ValueError(f"train.{name} must be finite and >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:  # outside: a negative (ascending) or rising learning rate
            raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if not 0 <= self.temperature < float("inf"):  # 0: a greedy sample
            raise ValueError(f"train.temperature (of the end-of-run sample) must be finite and >= 0 (0: greedy), "
                             f"got {self.temperature!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # torchrun runs: moekit.parallel

    def __post_init__(self) -> None:
        # Checked here so the run stops before it loads data and makes its folder, not at the first forward.
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len {self.train.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = normalize(cls, values, "")
        return cls(
            model=ModelConfig.from_dict(values.get("model") or {}),
            data=DataConfig(**(values.get("data") or {})),
            train=LoopConfig(**(values.get("train") or {})),
            parallel=ParallelConfig.from_dict(values.get("parallel") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        model = self.model.to_dict()
        model["moe"].pop("hidden_size", None)  # follows model.hidden_size; keeping it would pin it
        return {"model": model, "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train),
                "parallel": self.parallel.to_dict()}

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
        """``path`` (default: the built-in ``train_default.yaml``) plus ``key=value`` overrides."""
        return cls.from_dict(apply_overrides(read_yaml(path or DEFAULT_CONFIG_PATH), overrides))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    return values


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``values`` with each ``a.b.c=value`` set (the value parsed as a YAML scalar)."""
    out = yaml.safe_load(yaml.safe_dump(values))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        *parents, leaf = key.split(".")
        node = out
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[: i + 1])} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else None
    return out


def _field_types(hint) -> tuple:
    """The member types of a field's annotation (``X | None`` -> (X, NoneType))."""
    return typing.get_args(hint) or (hint,)


def _coerce(value: Any, types: tuple, where: str) -> Any:
    """Check a scalar against its field's types; numbers written as strings (YAML reads ``1e-3``
    as a string) become floats where a float is expected."""
    if value is None and type(None) in types:
        return None
    if float in types and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    simple = [t for t in types if t in (int, float, bool, str)]
    if simple and not any(type(value) is t for t in simple):
        names = " or ".join(t.__name__ for t in simple)
        raise ValueError(f"{where} must be {names}, got {value!r}")
    return value


def normalize(cls: type, values: Any, prefix: str) -> dict[str, Any]:
    """``values`` checked against the dataclass ``cls`` (recursively): unknown keys are refused
    by their dotted name, scalars type-checked, numeric strings read as floats."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ValueError(f"unknown config key {names}; {where} accepts: {', '.join(sorted(hints))}")
    out = {}
    for name, value in values.items():
        types = _field_types(hints[name])
        sub = next((t for t in types if dataclasses.is_dataclass(t)), None)
        if sub is not None and value is not None and not dataclasses.is_dataclass(value):
            out[name] = normalize(sub, value, f"{prefix}{name}.")
        else:
            out[name] = _coerce(value, types, prefix + name)
    return out
