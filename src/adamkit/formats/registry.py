"""Format names -> format objects: the one place a ``state=`` option is resolved."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from adamkit.formats import int8_blockwise, int8_companded
from adamkit.formats.base import StateFormat, Storage
from adamkit.formats.containers import Bf16Format, DenseFormat, QuantizedFormat

__all__ = ["FORMATS", "from_state_dict", "get_format"]

# "int8" is the block-wise dynamic map (Dettmers et al. 2021): 2.03 bytes of state per
# parameter, inside the 2.15 budget.  The companded code in blocks of 32 has the faster kernel
# (about 1.2x) and smaller errors, but its float32 scale per 32 values costs 2.25 bytes per
# parameter, so it is offered under its own name (numbers: adamkit.kernels.numba_formats).
_BLOCKWISE = QuantizedFormat("int8", int8_blockwise, int8_blockwise.DEFAULT_BLOCK)

FORMATS: dict[str, StateFormat] = {
    "native": DenseFormat("native", None),
    "fp32": DenseFormat("fp32", np.dtype(np.float32)),
    "bf16": Bf16Format("bf16", "stochastic"),
    "int8": _BLOCKWISE,
    # The same codec under its explicit name (equal results; state dicts name the one used).
    "int8-blockwise": QuantizedFormat(
        "int8-blockwise", int8_blockwise, int8_blockwise.DEFAULT_BLOCK
    ),
    "int8-companded": QuantizedFormat(
        "int8-companded", int8_companded, int8_companded.DEFAULT_BLOCK, sqrt_second_moment=True
    ),
    # The companded code in blocks of 64: 2.125 bytes per parameter, inside the budget.
    "int8-companded-64": QuantizedFormat(
        "int8-companded-64", int8_companded, int8_companded.BUDGET_BLOCK, sqrt_second_moment=True
    ),
}
"""Registered formats by name; ``None`` (torch's behaviour) is an alias of ``"native"``.

``"int8"`` (also ``"int8-blockwise"``) is the block-wise dynamic map in blocks of 256
(:mod:`~adamkit.formats.int8_blockwise`, about 2.03 bytes per parameter);
``"int8-companded"`` the elementwise companded code in blocks of 32
(:mod:`~adamkit.formats.int8_companded`, 2.25 bytes per parameter, faster and more accurate);
``"int8-companded-64"`` the same code in blocks of 64 (2.125 bytes per parameter, inside the
2.15-byte budget of an 8-bit state, the fastest fused step; a little less accurate than blocks of
32, well ahead of the dynamic map).  Measurements in :mod:`adamkit.kernels.numba_formats`."""


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
