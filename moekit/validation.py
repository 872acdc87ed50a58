"""Checks of user-given values that several configs and entry points share."""

from __future__ import annotations

from numbers import Integral


def is_int(value) -> bool:
    """An integer (Python or NumPy), and not a bool: ``True`` must not pass for 1 (a count, a size, an id)."""
    return isinstance(value, Integral) and not isinstance(value, bool)
