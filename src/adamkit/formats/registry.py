"""Format names -> format objects: the one place a ``state=`` option is resolved."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from adamkit.formats import int8_companded
from adamkit.formats.base import StateFormat, Storage
from adamkit.formats.containers import Bf16Format, DenseFormat, QuantizedFormat

__all__ = ["FORMATS", "from_state_dict", "get_format"]

FORMATS: dict[str, StateFormat] = {
    "native": DenseFormat("native", None),
    "fp32": DenseFormat("fp32", np.dtype(np.float32)),
    "bf16": Bf16Format("bf16", "stochastic"),
    "int8": QuantizedFormat("int8"),
    "int8-companded": QuantizedFormat(
        "int8-companded", int8_companded, int8_companded.DEFAULT_BLOCK, sqrt_second_moment=True
    ),
}
"""Registered formats by name; ``None`` (torch's behaviour) is an alias of ``"native"``."""


def get_format(name: str | StateFormat | None) -> StateFormat:
    """The format for a group's ``state=`` option: ``None``, a registered name, or a format.

    Raises ``ValueError`` for an unknown name and ``TypeError`` for anything that is neither a
    str, ``None`` nor an object with the :class:`~adamkit.formats.base.StateFormat` methods.
    """
    if name is None:
        return FORMATS["native"]
    if isinstance(name, str):
        try:
            return FORMATS[name]
        except KeyError:
            allowed = ", ".join(repr(k) for k in FORMATS)
            raise ValueError(
                f"Unknown state format {name!r} (state must be None or one of {allowed})"
            ) from None
    if isinstance(name, StateFormat):
        return name
    raise TypeError(
        f"state must be None, a format name or a StateFormat, got {type(name).__name__} {name!r}"
    )


def from_state_dict(d: Mapping[str, Any], shape: Any) -> Storage:
    """Rebuild a storage with the format named in ``d`` (see ``StateFormat.from_state_dict``).

    To continue in another format: ``new_fmt.store(new, old_fmt.load(old), rng)``.  Raises
    ``ValueError`` when ``d`` names no registered format or fails that format's validation.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"state dict must be a mapping, got {type(d).__name__}")
    name = d.get("format")
    if not isinstance(name, str) or name not in FORMATS:
        raise ValueError(f"state dict names an unknown state format {name!r}")
    return FORMATS[name].from_state_dict(d, shape)
