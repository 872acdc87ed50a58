"""Checks of user-given values that several configs and entry points share."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from numbers import Integral, Real


def is_int(value) -> bool:
    """An integer (Python or NumPy), and not a bool: ``True`` must not pass for 1 (a count, a size, an id)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number (int, float, NumPy), and not a bool or a string such as a quoted YAML value."""
    return isinstance(value, Real) and not isinstance(value, bool)


def check_known_keys(cls, values) -> None:
    """``values`` (for the dataclass ``cls``) is a mapping with no key that is not a field: a typo
    must be an error naming it, not a setting silently left at its default."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(known)}")
