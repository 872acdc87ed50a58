"""How one architecture maps onto moekit: its config translation and one rule per tensor.

A ``Rule`` fills one moekit state-dict entry from one or more Hugging Face tensors. It lists
the ``Layout``s the HF side may use (transformers 5 keeps routed experts fused in memory,
while checkpoints on disk hold one tensor per expert); the first layout whose names are all
present wins, so the same rules read a live model and a saved folder, and write back whatever
layout the target model has.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from moekit.models.config import ModelConfig


@dataclass(frozen=True)
class Layout:
    """HF tensors ``parts`` concatenated along dim 0 form the moekit tensor (e.g. gate + up
    projections -> our fused up-projection). With ``experts > 0`` the names hold ``{e}`` and
    each expert's concatenation is one slice of a moekit tensor stacked along a new dim 0."""

    parts: tuple[str, ...]
    experts: int = 0

    def _slices(self) -> list[tuple[str, ...]]:
        if self.experts:
            return [tuple(p.format(e=e) for p in self.parts) for e in range(self.experts)]
        return [self.parts]

    def names(self) -> list[str]:
        return [name for group in self._slices() for name in group]

    def shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Each HF tensor's expected shape, given the moekit tensor's."""
        inner = shape[1:] if self.experts else shape
        part = (inner[0] // len(self.parts), *inner[1:])
        return {name: part for name in self.names()}

    def load_into(self, dest: torch.Tensor, get: Callable[[str], torch.Tensor]) -> None:
        targets = list(dest) if self.experts else [dest]
        for target, group in zip(targets, self._slices(), strict=True):
            row = 0
            for name in group:
                t = get(name)
                target[row:row + t.shape[0]].copy_(t)
                row += t.shape[0]

    def export(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = list(tensor) if self.experts else [tensor]
        out = {}
        for piece, group in zip(pieces, self._slices(), strict=True):
            out.update(zip(group, piece.chunk(len(group), dim=0), strict=True))
        return out


@dataclass(frozen=True)
class Rule:
    """One moekit tensor ``target`` and the HF layouts it may come from. No layout means a
    moekit-only tensor that starts at zero; ``zero_on_export`` says it changes the function
    when non-zero (an expert bias), so export refuses to drop it then. ``perm`` reorders dim 0
    on the way in (its inverse on the way out)."""

    target: str
    layouts: tuple[Layout, ...] = ()
    perm: torch.Tensor | None = field(default=None, compare=False)
    zero_on_export: bool = False

    def choose(self, present: Collection[str]) -> Layout | None:
        """The first layout fully present; else the one most present (to name what is missing)."""
        if not self.layouts:
            return None
        for layout in self.layouts:
            if all(n in present for n in layout.names()):
                return layout
        return max(self.layouts, key=lambda lay: sum(n in present for n in lay.names()))

    def load_into(self, dest: torch.Tensor, layout: Layout | None, get: Callable[[str], torch.Tensor]) -> None:
        if layout is None:
            dest.zero_()
            return
        layout.load_into(dest, get)
        if self.perm is not None:
            dest.copy_(dest[self.perm])  # advanced indexing reads a copy first

    def export(self, tensor: torch.Tensor, layout: Layout | None) -> dict[str, torch.Tensor]:
        if layout is None:
            if self.zero_on_export and bool(tensor.any()):
                raise ValueError(f"to_hf: {self.target} is non-zero (aux-loss-free balancing moved it), and the "
                                 "HF architecture has no place for it; exporting would change the routing")
            return {}
        if self.perm is not None:
            tensor = tensor[torch.argsort(self.perm)]
        return layout.export(tensor)


def same(target: str, *hf_names: str) -> Rule:
    """A tensor stored as is, under the first of ``hf_names`` that the source has."""
    return Rule(target, tuple(Layout((n,)) for n in hf_names))


def moekit_only(target: str, zero_on_export: bool = False) -> Rule:
    return Rule(target, zero_on_export=zero_on_export)


@dataclass(frozen=True)
class Architecture:
    """One transformers architecture: ``model_type`` (config.json's), the causal-LM class name,
    ``to_config`` (full HF config dict -> ``ModelConfig``, refusing what moekit cannot
    reproduce), ``rules`` (``ModelConfig``, HF config dict -> one ``Rule`` per moekit tensor),
    ``ignored`` (HF tensor names that are deliberately dropped, e.g. DeepSeek's MTP layers) and
    ``keeps_float32`` (moekit parameters that transformers keeps in float32 in a bf16 / fp16 model,
    its ``_keep_in_fp32_modules``: DeepSeek's router)."""

    model_type: str
    hf_class: str
    to_config: Callable[[dict[str, Any]], ModelConfig]
    rules: Callable[[ModelConfig, dict[str, Any]], list[Rule]]
    ignored: Callable[[str, dict[str, Any]], bool] = lambda name, hf: False
    keeps_float32: Callable[[str], bool] = lambda name: False


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> None:
    if arch.model_type in ARCHITECTURES:
        raise ValueError(f"architecture {arch.model_type!r} is registered twice")
    ARCHITECTURES[arch.model_type] = arch


def architecture(model_type: str | None) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ValueError(f"HF architecture {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def refuse(model_type: str, option: str, value: Any, why: str) -> None:
    raise ValueError(f"{model_type}: {option}={value!r} is not supported ({why}); "
                     "converting would give a model that computes something else")
