"""The shared conversion machinery: check every name and shape, then copy tensor by tensor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from moekit.models.config import ModelConfig
from moekit.models.hf.sources import CONVERTIBLE, SafetensorsFolder, StateDictSource
from moekit.models.hf.spec import Architecture, Layout, Rule, architecture
from moekit.models.model import MoEForCausalLM

TIED_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"
LISTED = 20  # names shown per kind of problem; the count says how many more there are

# Fields that change training or speed, never the function a converted model computes.
RUNTIME_FIELDS = {"init_std", "max_seq_len", "hf_config"}
RUNTIME_MOE_FIELDS = {"aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate", "router_jitter",
                      "backend", "precision", "check_finite", "init_std"}


def hf_config_dict(hf_config) -> dict[str, Any]:
    """A transformers config as a full JSON-safe dict (defaults and derived fields included)."""
    return json.loads(hf_config.to_json_string(use_diff=False))


# transformers writes non-finite floats as {"__float__": "Infinity"} (GraniteMoeHybrid's time_step_limit)
SPECIAL_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def decode_floats(value: Any) -> Any:
    """``value`` with transformers' tagged non-finite floats turned back into floats."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in SPECIAL_FLOATS:
            return SPECIAL_FLOATS[value["__float__"]]
        return {k: decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_floats(v) for v in value]
    return value


def _load_folder_config(folder: Path) -> dict[str, Any]:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    import transformers

    try:
        return hf_config_dict(transformers.AutoConfig.from_pretrained(str(folder)))
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{folder / 'config.json'} is not a usable transformers config: {e}") from e


def _listing(kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:LISTED])
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return f"{kind} ({len(items)}): {shown}{more}"


def plan_import(arch: Architecture, rules: list[Rule], state: dict[str, torch.Tensor], source, hf: dict,
                where: str, tied: bool) -> list[tuple[Rule, Layout | None]]:
    """Pick each rule's layout and check every HF name, shape and dtype before any data is read;
    refuse, by name, missing, unexpected, mis-shaped and non-float tensors all at once."""
    _check_coverage(rules, state, tied)
    present = source.names()
    plan, used, missing, misshaped, not_float = [], set(), [], [], []
    for rule in rules:
        layout = rule.choose(present)
        plan.append((rule, layout))
        if layout is None:
            continue
        for name, shape in layout.shapes(tuple(state[rule.target].shape)).items():
            used.add(name)
            if name not in present:
                missing.append(name)
            elif source.shape(name) != shape:
                misshaped.append(f"{name} is {list(source.shape(name))}, expected {list(shape)}")
            elif source.dtype(name) not in CONVERTIBLE:  # copy_ would cast integer / fp8 data silently
                not_float.append(f"{name} is {source.dtype(name)}")
    unexpected = sorted(n for n in present - used
                        if not arch.ignored(n, hf) and not (tied and n == TIED_HEAD))
    problems = [_listing(kind, items) for kind, items in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("mis-shaped tensors", misshaped),
                 ("tensors not in float16 / bfloat16 / float32 / float64 (dequantize first)", not_float))
                if items]
    if tied and not _head_is_embedding(source, present):
        problems.append(f"{TIED_HEAD} differs from {EMBEDDING}, yet tie_word_embeddings=True (transformers then "
                        "unties them and uses the stored head; set tie_word_embeddings to false in config.json)")
    if problems:
        raise ValueError(f"cannot convert {where} ({arch.model_type}): " + "; ".join(problems))
    return plan


def _head_is_embedding(source, present: set[str]) -> bool:
    """Whether a tied model's stored head, if any, is a copy of the embedding (reads both)."""
    if TIED_HEAD not in present or EMBEDDING not in present:
        return True
    if source.shape(TIED_HEAD) != source.shape(EMBEDDING):
        return False
    return torch.equal(source.get(TIED_HEAD), source.get(EMBEDDING))


def _check_coverage(rules: list[Rule], state: dict[str, torch.Tensor], tied: bool) -> None:
    """One rule per moekit tensor (a bug in an architecture module otherwise); a tied head has
    none: it is the embedding."""
    targets = [r.target for r in rules]
    expected = set(state) - ({TIED_HEAD} if tied else set())
    if len(set(targets)) != len(targets) or set(targets) != expected:
        raise RuntimeError(f"conversion rules do not match the model: uncovered {sorted(expected - set(targets))}, "
                           f"unknown {sorted(set(targets) - expected)}")


def from_hf(model_or_path, dtype: torch.dtype | None = None, device=None) -> MoEForCausalLM:
    """A ``MoEForCausalLM`` computing what a transformers causal LM computes.

    ``model_or_path`` is a transformers model, or a folder with ``config.json`` and
    ``*.safetensors`` (sharded with an index, or not), read lazily one tensor at a time.
    ``dtype`` defaults to the source's embedding dtype, ``device`` to the source model's
    (CPU for a folder). The result is in eval mode; its ``config.hf_config`` keeps the source
    config, which ``to_hf`` uses to go back.
    """
    if dtype is not None and dtype not in CONVERTIBLE:
        raise ValueError(f"from_hf: dtype={dtype} is not one of {sorted(map(str, CONVERTIBLE))} "
                         "(moekit quantizes experts through MoEConfig.precision, not the weights' dtype)")
    if isinstance(model_or_path, (str, Path)):
        folder = Path(model_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"from_hf: {folder} is not a folder")
        hf = _load_folder_config(folder)
        source, where = SafetensorsFolder(folder), str(folder)
    else:
        # A transformers config serialises itself (to_json_string); moekit's ModelConfig does not.
        if not hasattr(getattr(model_or_path, "config", None), "to_json_string") or \
                not hasattr(model_or_path, "state_dict"):
            already = " (it is a moekit model already)" if isinstance(model_or_path, MoEForCausalLM) else ""
            raise TypeError(f"from_hf: expected a transformers model or a folder path, got "
                            f"{type(model_or_path).__name__}{already}")
        hf = hf_config_dict(model_or_path.config)
        source, where = StateDictSource(model_or_path.state_dict()), type(model_or_path).__name__
        if device is None:
            device = next(model_or_path.parameters()).device
    try:
        return _import(architecture(hf.get("model_type")), hf, source, where, dtype, device)
    finally:
        source.close()


def _import(arch: Architecture, hf: dict, source, where: str, dtype, device) -> MoEForCausalLM:
    config = arch.to_config(hf)
    with torch.device("meta"):  # no random init: every tensor is about to be overwritten
        model = MoEForCausalLM(config)
    rules = arch.rules(config, hf)
    plan = plan_import(arch, rules, model.state_dict(), source, hf, where, config.tie_word_embeddings)
    if dtype is None:
        dtype = source.dtype(EMBEDDING)
    model.to_empty(device=device or "cpu").to(dtype)
    _keep_float32(model, arch, dtype)
    if config.tie_word_embeddings:  # to_empty gives each module its own tensor
        model.lm_head.weight = model.embed_tokens.weight
    state = model.state_dict()
    with torch.no_grad():
        for rule, layout in plan:
            rule.load_into(state[rule.target], layout, source.get)
    return model.eval()


def _keep_float32(model: MoEForCausalLM, arch: Architecture, dtype: torch.dtype) -> None:
    """The parameters transformers keeps in float32 in a lower-precision model stay float32 here:
    rounded to bf16, DeepSeek's router weight picks other experts than the source does."""
    if dtype.itemsize >= 4:
        return
    for name, param in model.named_parameters():
        if arch.keeps_float32(name):
            param.data = param.data.float()


def _differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    out = [f"{k}: {da[k]!r} != {db[k]!r}" for k in da if k not in RUNTIME_FIELDS | {"moe"} and da[k] != db[k]]
    out += [f"moe.{k}: {da['moe'][k]!r} != {db['moe'][k]!r}" for k in da["moe"]
            if k not in RUNTIME_MOE_FIELDS and da["moe"][k] != db["moe"][k]]
    return out


def to_hf(model: MoEForCausalLM):
    """The transformers model ``model`` was converted from (same class and config), holding
    ``model``'s current weights, in eval mode. Refuses a model without ``config.hf_config``
    or whose architecture fields were changed since the conversion."""
    hf = model.config.hf_config
    if not hf:
        raise ValueError("to_hf: this model was not converted from transformers (config.hf_config is empty), "
                         "so there is no architecture to go back to")
    arch = architecture(hf.get("model_type"))
    changed = _differences(arch.to_config(hf), model.config)
    if changed:
        raise ValueError(f"to_hf: the model no longer matches its {arch.model_type} config: " + "; ".join(changed))
    import transformers

    values = {k: decode_floats(v) for k, v in hf.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(arch.model_type, **values)
    # Built in the model's precision; transformers keeps its own float32 exceptions (DeepSeek's router).
    hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=model.embed_tokens.weight.dtype)
    target = hf_model.state_dict()
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for rule in arch.rules(model.config, hf):
        tensors.update(rule.export(state[rule.target].detach(), rule.choose(target.keys())))
    if model.config.tie_word_embeddings and TIED_HEAD in target:
        tensors[TIED_HEAD] = state["embed_tokens.weight"]
    # Ignored HF tensors (MiniMax's decay buffers) keep what transformers computes from the config.
    expected = {n for n in target if not arch.ignored(n, hf)}
    if set(tensors) != expected:
        raise RuntimeError(f"to_hf: rules produced {sorted(set(tensors) - expected)} that {arch.hf_class} "
                           f"lacks, and miss {sorted(expected - set(tensors))}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            target[name].copy_(tensor)
    device = model.embed_tokens.weight.device
    return hf_model.to(device=device).eval()
