"""What an optimizer sees of a state format: the :class:`StateFormat` protocol and its storage.

An optimizer keeps each moment (torch's keys ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) in a
:class:`Storage` made by a format, and does its arithmetic in float32 (or the parameter's dtype
for the ``native`` format) between ``load`` and ``store``::

    fmt = get_format("int8")
    m = fmt.zeros(param.shape, param.dtype, role="exp_avg")
    m32 = fmt.load(m)                  # float32 array of param.shape
    ...                                # the fp32 Adam step updates m32
    fmt.store(m, m32, rng=rng)         # compress back; rng is needed when fmt.needs_rng

Dtype policy (the one place it is written down), per moment:

======================  ==================================  =======================  ============
format                  storage                             ``load`` returns         bytes/param
======================  ==================================  =======================  ============
``native`` (None)       parameter's dtype                   the stored array itself  itemsize
``fp32``                float32                             the stored array itself  4
``bf16``                bfloat16 bits in uint16,            new float32 array        2
                        stochastic rounding
``int8``                uint8 dynamic-map codes + float32   new float32 array        1 + 4/256
                        absmax per block of 256; second
                        moments as ``sqrt(v)``
``int8-blockwise``      the same codec under its own name   new float32 array        1 + 4/256
``int8-companded``      int8/uint8 companded codes +        new float32 array        1 + 4/32
                        float32 absmax per block of 32;
                        second moments as ``sqrt(v)``
``int8-companded-64``   the same codes, float32 absmax per  new float32 array        1 + 4/64
                        block of 64 (inside an 8-bit
                        state's 2.15-byte budget)
======================  ==================================  =======================  ============

Small-tensor rule: formats that keep a per-block scale (``int8``, ``int8-companded``,
``int8-companded-64``, ``int8-blockwise``) store tensors with fewer than
:data:`MIN_QUANTIZED_SIZE` elements (4096, bitsandbytes' ``min_8bit_size``) densely in float32,
because for biases and norms the saving is negligible and their moments are the most sensitive.
``bf16`` has no per-tensor overhead and applies to all.

Signedness comes from the role: ``exp_avg`` is signed, the second moments are non-negative
(:data:`SIGNED_ROLES`), so quantized formats can use a different code for each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "MIN_QUANTIZED_SIZE",
    "ROLES",
    "SIGNED_ROLES",
    "STATE_DICT_VERSION",
    "StateFormat",
    "Storage",
    "check_role",
    "check_shape",
    "num_elements",
]

MIN_QUANTIZED_SIZE = 4096
"""Tensors with fewer elements than this keep float32 moments under block-quantized formats."""

ROLES: tuple[str, ...] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
"""The moments a format can store, with torch's state keys as names."""

SIGNED_ROLES: frozenset[str] = frozenset({"exp_avg"})
"""Roles whose values may be negative; the others are non-negative second moments."""

STATE_DICT_VERSION = 1
"""Version written by ``to_state_dict``; ``from_state_dict`` reads this version."""


@dataclass(eq=False)
class Storage:
    """One stored moment: the arrays a format keeps, and what they describe.

    ``format`` is the name of the format that made it, ``encoding`` how ``arrays`` are laid out
    (``"dense"``: ``arrays["values"]`` of ``shape``; ``"bf16"``: ``arrays["bits"]`` uint16 of
    ``shape``; ``"int8"`` and ``"int8-companded"``: flat ``arrays["codes"]`` of ``size`` 8-bit
    codes and ``arrays["scales"]`` float32, one per block of ``block`` elements, the last
    block partial).  ``role`` is one of :data:`ROLES`.  ``store`` overwrites the arrays in place,
    so views of them (e.g. torch tensors sharing memory) stay valid.
    """

    format: str
    encoding: str
    role: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    block: int = 0

    @property
    def size(self) -> int:
        """Number of elements of the stored moment."""
        return num_elements(self.shape)

    @property
    def signed(self) -> bool:
        """Whether the moment may hold negative values (its role is in :data:`SIGNED_ROLES`)."""
        return self.role in SIGNED_ROLES

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v.dtype}{list(v.shape)}" for k, v in self.arrays.items())
        return (
            f"Storage(format={self.format!r}, encoding={self.encoding!r}, role={self.role!r}, "
            f"shape={self.shape}, {parts})"
        )


@runtime_checkable
class StateFormat(Protocol):
    """How one optimizer group stores its moments.  All an optimizer may rely on.

    - ``name``: registry name (``"native"``, ``"fp32"``, ``"bf16"``, ``"int8"``, ...).
    - ``needs_rng``: ``store`` rounds stochastically and needs ``rng``.
    - ``zeros(shape, dtype, role=)``: zero storage for a parameter of that shape and dtype.
    - ``load(storage)``: the moment as an array of ``storage.shape`` (float32, or the parameter's
      dtype for ``native``); dense formats return their own buffer, others a fresh array.
    - ``store(storage, values, rng=None)``: overwrite the moment with ``values`` (any real array of
      ``storage.shape``), compressing it; leaves ``storage`` untouched when it raises.
    - ``nbytes(storage)``: bytes held by the storage's arrays.
    - ``to_state_dict(storage)`` / ``from_state_dict(d, shape)``: a plain dict of NumPy arrays and
      Python scalars (copies), and back, validated (``ValueError`` for a wrong format, version,
      role, shape, code length or dtype).
    """

    name: str
    needs_rng: bool

    def zeros(self, shape: Any, dtype: Any = np.float32, *, role: str = "exp_avg") -> Storage: ...

    def load(self, storage: Storage) -> np.ndarray: ...

    def store(
        self, storage: Storage, values: Any, rng: np.random.Generator | None = None
    ) -> None: ...

    def nbytes(self, storage: Storage) -> int: ...

    def to_state_dict(self, storage: Storage) -> dict[str, Any]: ...

    def from_state_dict(self, d: Mapping[str, Any], shape: Any) -> Storage: ...


def check_role(role: Any) -> str:
    """Return ``role`` if it is one of :data:`ROLES`; else raise ``ValueError``/``TypeError``."""
    if not isinstance(role, str):
        raise TypeError(f"role must be a str, got {type(role).__name__} {role!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(map(repr, ROLES))}, got {role!r}")
    return role


def check_shape(shape: Any, name: str = "shape") -> tuple[int, ...]:
    """Normalise a shape (an int or a sequence of ints >= 0) to a tuple; raise on anything else."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of ints, got {type(shape).__name__}") from None
    out = []
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"{name} must be a tuple of ints, got {shape!r}")
        if dim < 0:
            raise ValueError(f"{name} must have dimensions >= 0, got {shape!r}")
        out.append(int(dim))
    return tuple(out)


def num_elements(shape: tuple[int, ...]) -> int:
    """Number of elements of an array of ``shape`` (1 for the 0-d shape ``()``)."""
    return math.prod(shape)
