"""``ModelConfig``: the hybrid Linear-MoE language model's shape, with YAML / dict round trips."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import yaml

from moekit.mixers.config import MixerConfig
from moekit.mixers.mla_config import MLAConfig
from moekit.mixers.registry import LAYER_LETTERS, check_linear_mixer, linear_mixers_reading
from moekit.mixers.rope_scaling import YarnScaling
from moekit.moe.config import MoEConfig
from moekit.validation import check_known_keys, is_int, is_number

_FIELD_TYPES = {"int": int, "float": Real, "bool": bool, "str": str}  # the scalar annotations checked

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ResidualScaling:
    """How a block adds each branch to its residual: ``alpha * r + beta * branch(norm(x))``.

    ``r`` is the block input x, or with ``from_norm`` the normalised input norm(x) (MiniMax-
    Text-01 keeps that as its residual stream). The mixer branch takes ``attention_*`` in
    softmax layers and ``linear_*`` in linear ones; the FFN branch ``ffn_*``. GraniteMoeHybrid's
    residual_multiplier is every beta, MiniMax's alpha / beta factors map one to one.
    """

    from_norm: bool = False
    attention_alpha: float = 1.0
    attention_beta: float = 1.0
    linear_alpha: float = 1.0
    linear_beta: float = 1.0
    ffn_alpha: float = 1.0
    ffn_beta: float = 1.0

    def __post_init__(self) -> None:
        # A quoted YAML "false" would be true, and a NaN or string factor surfaced only in the forward.
        if not isinstance(self.from_norm, bool):
            raise TypeError(f"ResidualScaling: from_norm must be true or false, got {self.from_norm!r}")
        for name in (f.name for f in dataclasses.fields(self) if f.name != "from_norm"):  # the alphas and betas
            value = getattr(self, name)
            if not (is_number(value) and math.isfinite(value)):
                raise ValueError(f"ResidualScaling: {name} must be a finite number, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ResidualScaling:
        check_known_keys(cls, values)
        return cls(**values)

    def mixer(self, letter: str) -> tuple[float, float]:
        return (self.attention_alpha, self.attention_beta) if letter == "N" else (self.linear_alpha, self.linear_beta)


@dataclass
class ModelConfig:
    """A decoder-only LM: ``layer_pattern`` has one letter per layer, ``L`` a linear mixer of
    kind ``linear_mixer`` and ``N`` softmax attention. The first ``first_k_dense`` layers use a
    dense FFN of width ``dense_ffn_hidden_size``, the rest an ``MoE`` layer configured by ``moe``
    (whose ``hidden_size`` always equals the model's).

    ``qk_norm_scope`` says what ``qk_norm`` normalises: each head ("head", Qwen3) or the whole
    projection ("all", OLMoE). ``mla`` (an ``MLAConfig``) makes the ``N`` layers multi-head
    latent attention (DeepSeek-V2/V3; ``num_heads`` heads, ``head_dim`` unused).
    ``rope_scaling`` (a ``YarnScaling``) extends softmax layers' RoPE with YaRN.

    Options of converted architectures (see ``MixerConfig`` for the mixer-level ones):
    ``linear_num_heads`` / ``linear_head_dim`` / ``linear_num_v_heads`` shape the ``L`` layers
    when they differ from the softmax ones (None: as the softmax layers; value heads as q/k
    heads); ``norm_unit_offset`` makes every RMSNorm of the model apply 1 + weight (Qwen3-Next);
    ``residual`` (a ``ResidualScaling``) scales the residual sums (None: plain x + branch);
    ``embedding_multiplier`` scales the embeddings and ``logits_scaling`` divides the logits
    (GraniteMoeHybrid's muP multipliers).
    ``hf_config`` is the transformers config a converted model came from
    (``moekit.models.hf``); moekit only reads it to convert back.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    layer_pattern: str = "LLLN"
    linear_mixer: str = "gla"
    num_heads: int = 4
    num_kv_heads: int | None = None  # softmax layers; None means num_heads
    head_dim: int = 16
    expand_v: int = 1  # linear layers: value width = expand_v * head_dim
    conv_size: int = 4
    ssm_state_size: int = 16
    qk_norm: bool = False
    qk_norm_scope: str = "head"
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    first_k_dense: int = 0
    dense_ffn_hidden_size: int | None = None  # None means 4 * hidden_size
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)
    mla: MLAConfig | None = None
    linear_num_heads: int | None = None
    linear_head_dim: int | None = None
    linear_num_v_heads: int | None = None
    partial_rotary_factor: float = 1.0
    attention_output_gate: bool = False
    attention_scale: float | None = None
    norm_unit_offset: bool = False
    ssm_groups: int = 1
    conv_bias: bool = False
    residual: ResidualScaling | None = None
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    hf_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._build_nested_configs()
        self._check_types()  # before anything below computes with the values
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.dense_ffn_hidden_size is None:
            self.dense_ffn_hidden_size = 4 * self.hidden_size
        if self.moe.hidden_size != self.hidden_size:
            self.moe = dataclasses.replace(self.moe, hidden_size=self.hidden_size)
        self.validate()

    def _build_nested_configs(self) -> None:
        """Mappings (from YAML / JSON) become their config classes; any other value is refused here, not met
        as an AttributeError when the model is built or run (``mla: true`` built nothing but a crash)."""
        for name, cls in (("moe", MoEConfig), ("mla", MLAConfig), ("rope_scaling", YarnScaling),
                          ("residual", ResidualScaling)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(value))
            elif not isinstance(value, cls) and (value is not None or name == "moe"):
                allowed = f"a {cls.__name__} or a mapping" + ("" if name == "moe" else " or None")
                raise TypeError(f"ModelConfig: {name} must be {allowed}, got {value!r}")

    def _check_types(self) -> None:
        """Each field's value has its annotated type (an int field takes no bool or float, a bool field
        no string): a YAML or Python slip must not build another model than the one described."""
        for f in dataclasses.fields(self):
            kinds = [kind.strip() for kind in f.type.split("|")]  # annotations are strings here
            value = getattr(self, f.name)
            if value is None and "None" in kinds:
                continue
            expected = _FIELD_TYPES.get(kinds[0])
            if expected is None:
                continue
            ok = (type(value) is bool if expected is bool else is_int(value) if expected is int
                  else isinstance(value, expected) and not isinstance(value, bool))
            if not ok:
                allowed = kinds[0] + (" or None" if "None" in kinds else "")
                raise TypeError(f"ModelConfig: {f.name} must be {allowed}, got {value!r}")

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        self._check_types()
        for name in ("vocab_size", "hidden_size", "max_seq_len", "dense_ffn_hidden_size"):  # ints: _check_types
            need(getattr(self, name) > 0, f"{name} must be a positive integer, got {getattr(self, name)!r}")
        # Construction makes them equal; a width edited afterwards would build MoE layers of the old width.
        need(self.moe.hidden_size == self.hidden_size,
             f"moe.hidden_size ({self.moe.hidden_size}) differs from hidden_size ({self.hidden_size}); "
             "build a new config (dataclasses.replace(config, hidden_size=...)) instead of editing the width")
        need(len(self.layer_pattern) > 0, "layer_pattern must have at least one letter")
        bad = sorted(set(self.layer_pattern) - set(LAYER_LETTERS))
        need(not bad, f"layer_pattern {self.layer_pattern!r} has unknown letter(s) {bad}; "
                      f"use {', '.join(f'{k} ({v})' for k, v in LAYER_LETTERS.items())}")
        if "L" in self.layer_pattern:
            check_linear_mixer(self.linear_mixer)
        need(0 <= self.first_k_dense <= self.num_layers,
             f"first_k_dense must be in [0, {self.num_layers}], got {self.first_k_dense}")
        for name in ("init_std", "rope_theta", "embedding_multiplier", "logits_scaling"):
            need(0 < getattr(self, name) < math.inf, f"{name} must be > 0 and finite, got {getattr(self, name)}")
        need(0 <= self.norm_eps < math.inf, f"norm_eps must be finite and >= 0, got {self.norm_eps}")
        need(self.rope_scaling is None or self.rope_theta > 1,  # YaRN's correction range divides by log(theta)
             f"rope_theta must be > 1 with rope_scaling (YaRN), got {self.rope_theta}")
        for name in ("linear_num_heads", "linear_head_dim", "linear_num_v_heads"):  # None: as the softmax layers
            value = getattr(self, name)
            need(value is None or value > 0, f"{name} must be None or a positive integer, got {value}")
        if "L" in self.layer_pattern:  # linear-only options the L layers' mixer would not implement
            for name, option, neutral in (("linear_num_v_heads", "num_v_heads", (None, self.linear_num_heads
                                                                                 or self.num_heads)),
                                          ("conv_bias", "conv_bias", (False,)), ("ssm_groups", "ssm_groups", (1,))):
                readers = linear_mixers_reading(option)
                need(getattr(self, name) in neutral or self.linear_mixer in readers,
                     f"{name} ({getattr(self, name)!r}) is read only by linear_mixer {' / '.join(readers)}, "
                     f"not {self.linear_mixer!r}")
        for letter in sorted(set(self.layer_pattern)):  # checks heads / dims of each kind of layer
            self.mixer_config(self.layer_pattern.index(letter))

    @property
    def num_layers(self) -> int:
        return len(self.layer_pattern)

    def mixer_config(self, layer_idx: int) -> MixerConfig:
        heads = dict(num_heads=self.num_heads, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads)
        if self.layer_pattern[layer_idx] == "L":
            heads = dict(num_heads=self.num_heads if self.linear_num_heads is None else self.linear_num_heads,
                         head_dim=self.head_dim if self.linear_head_dim is None else self.linear_head_dim,
                         num_v_heads=self.linear_num_v_heads)
        return MixerConfig(
            hidden_size=self.hidden_size, **heads, expand_v=self.expand_v, rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            norm_eps=self.norm_eps, conv_size=self.conv_size, ssm_state_size=self.ssm_state_size,
            qk_norm=self.qk_norm, qk_norm_scope=self.qk_norm_scope, attention_bias=self.attention_bias,
            layer_idx=layer_idx, num_layers=self.num_layers, mla=self.mla,
            partial_rotary_factor=self.partial_rotary_factor, attention_output_gate=self.attention_output_gate,
            attention_scale=self.attention_scale, norm_unit_offset=self.norm_unit_offset,
            ssm_groups=self.ssm_groups, conv_bias=self.conv_bias,
        )

    # --- serialisation ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a mapping; unknown keys (here or in ``moe``) are refused by name."""
        check_known_keys(cls, values)
        values = dict(values)
        moe = values.pop("moe", None)
        if moe is not None and not isinstance(moe, MoEConfig):
            if not isinstance(moe, dict):
                raise TypeError(f"ModelConfig: 'moe' must be a mapping, got {type(moe).__name__}")
            hidden = values.get("hidden_size", cls.hidden_size)
            if moe.get("hidden_size", hidden) != hidden:
                raise ValueError(f"ModelConfig: moe.hidden_size ({moe['hidden_size']}) differs from "
                                 f"hidden_size ({hidden}); leave it out, it follows the model")
            moe = MoEConfig.from_dict({**moe, "hidden_size": hidden})
        return cls(**values) if moe is None else cls(**values, moe=moe)

    def to_dict(self) -> dict[str, Any]:
        return _plain_numbers(dataclasses.asdict(self))

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        with path.open() as f:
            try:
                values = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"ModelConfig: {path} is not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"ModelConfig: {path} must hold a mapping of config keys")
        return cls.from_dict(values)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A config shipped in ``moekit/configs/<name>.yaml``."""
        path = CONFIG_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"ModelConfig: no built-in config {name!r}; available: {available_configs()}")
        return cls.from_yaml(path)


def _plain_numbers(value: Any) -> Any:
    """``value`` with Python ints / floats for the NumPy scalars the checks accept: JSON (save_pretrained)
    and YAML cannot write those."""
    if isinstance(value, dict):
        return {key: _plain_numbers(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain_numbers(item) for item in value)
    return int(value) if is_int(value) else float(value) if is_number(value) else value


def available_configs() -> list[str]:
    """Names of the built-in model configs (the folder also holds training configs, skipped)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    names = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        if isinstance(values, dict) and set(values) <= fields:
            names.append(path.stem)
    return names
