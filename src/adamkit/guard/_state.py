"""Strict readers for the guard's plain-Python ``state_dict`` entries.

Each reader raises ``TypeError`` for a wrong type and ``ValueError`` for a value out of range,
naming the entry by its dotted path (``grad_clipper.stats.count``), so that a corrupt checkpoint
fails loudly instead of resuming with nonsense.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any


def expect_mapping(value: Any, where: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    """Return ``value`` if it is a mapping with exactly ``keys``; raise otherwise."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    extra = sorted(str(k) for k in value if k not in keys)
    if missing or extra:
        raise ValueError(f"{where} has missing keys {missing} / unexpected keys {extra}")
    return value


def read_int(value: Any, where: str, low: int = 0) -> int:
    """An integer ``>= low`` (bool rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{where} must be an integer >= {low}, got {value!r}")
    return int(value)


def read_float(value: Any, where: str, *, low: float = -math.inf) -> float:
    """A finite real number ``>= low`` (bool rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a real number, got {type(value).__name__} {value!r}")
    x = float(value)
    if not (math.isfinite(x) and x >= low):
        raise ValueError(f"{where} must be a finite number >= {low}, got {x!r}")
    return x


def read_bool(value: Any, where: str) -> bool:
    """``True`` or ``False`` only."""
    if not isinstance(value, bool):
        raise TypeError(f"{where} must be True or False, got {type(value).__name__} {value!r}")
    return value
