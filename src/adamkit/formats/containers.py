"""The format objects: each turns a codec into the :class:`~adamkit.formats.base.StateFormat`
interface (``zeros``/``load``/``store``/``nbytes``/state dicts) that optimizers use.

Formats are frozen dataclasses: compare by value, share freely, and hold no state of their own
(the random generator for stochastic rounding is the caller's, so a run is reproducible from the
optimizer's seed).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from adamkit.formats import bf16, int8_blockwise
from adamkit.formats._blocks import check_block, num_blocks
from adamkit.formats.base import (
    MIN_QUANTIZED_SIZE,
    SIGNED_ROLES,
    STATE_DICT_VERSION,
    Storage,
    check_role,
    check_shape,
    num_elements,
)

__all__ = ["Bf16Format", "DenseFormat", "QuantizedFormat"]


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}") from None
    if not np.issubdtype(dt, np.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dt}")
    return dt


def _real_array(values: Any, storage: Storage) -> np.ndarray:
    arr = np.asarray(values)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{storage.role} values must be a real array, got dtype {arr.dtype}")
    if arr.shape != storage.shape:
        raise ValueError(f"{storage.role} values have shape {arr.shape}, expected {storage.shape}")
    return arr


def _float_array(d: Mapping[str, Any], key: str, size: int, what: str) -> np.ndarray:
    # Floating arrays may come back from torch's load_state_dict cast to the parameter's dtype;
    # any floating dtype is accepted and converted back to float32.
    arr = np.asarray(d[key])
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what}: {key!r} must be a floating array, got dtype {arr.dtype}")
    if arr.size != size:
        raise ValueError(f"{what}: {key!r} has {arr.size} entries, expected {size}")
    return arr


class _FormatBase:
    """State-dict plumbing common to all formats; subclasses define the codec parts."""

    name: str
    needs_rng: ClassVar[bool] = False

    # -- what a subclass provides -------------------------------------------------------------
    def _encoding(self, shape: tuple[int, ...]) -> str:
        raise NotImplementedError

    def _header(self, storage: Storage) -> dict[str, Any]:
        """Format parameters written to the state dict and checked on loading."""
        return {}

    def _arrays_from_state_dict(
        self, d: Mapping[str, Any], encoding: str, role: str, shape: tuple[int, ...], what: str
    ) -> tuple[dict[str, np.ndarray], int]:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def _own(self, storage: Storage) -> None:
        if not isinstance(storage, Storage):
            raise TypeError(f"storage must be a Storage, got {type(storage).__name__}")
        if storage.format != self.name:
            raise ValueError(
                f"storage was made by format {storage.format!r}, not {self.name!r}; convert it "
                "with load() of its own format and store() of this one"
            )

    def nbytes(self, storage: Storage) -> int:
        """Bytes held by the storage's arrays (codes, scales or values)."""
        self._own(storage)
        return int(sum(a.nbytes for a in storage.arrays.values()))

    def to_state_dict(self, storage: Storage) -> dict[str, Any]:
        """A plain dict (copied arrays, Python scalars) that :meth:`from_state_dict` reads back."""
        self._own(storage)
        d: dict[str, Any] = {
            "format": self.name,
            "version": STATE_DICT_VERSION,
            "encoding": storage.encoding,
            "role": storage.role,
            "shape": list(storage.shape),
        }
        d.update(self._header(storage))
        d.update({key: arr.copy() for key, arr in storage.arrays.items()})
        return d

    def from_state_dict(self, d: Mapping[str, Any], shape: Any) -> Storage:
        """Storage rebuilt from :meth:`to_state_dict` output for a parameter of ``shape``.

        Raises ``ValueError`` when ``d`` is for another format, version or shape, names an unknown
        role, lacks or has extra entries, or holds arrays of the wrong length, dtype or range;
        ``TypeError`` when ``d`` is not a mapping.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"state dict must be a mapping, got {type(d).__name__}")
        shape = check_shape(shape)
        what = f"{self.name} state dict"
        for key in ("format", "version", "encoding", "role", "shape"):
            if key not in d:
                raise ValueError(f"{what}: missing {key!r}")
        if d["format"] != self.name:
            raise ValueError(f"{what}: it is for format {d['format']!r}, not {self.name!r}")
        if d["version"] != STATE_DICT_VERSION:
            raise ValueError(
                f"{what}: unsupported version {d['version']!r} (this release reads "
                f"{STATE_DICT_VERSION})"
            )
        try:
            role = check_role(d["role"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what}: {err}") from None
        try:
            saved_shape = check_shape(d["shape"], "shape")
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what}: {err}") from None
        if saved_shape != shape:
            raise ValueError(f"{what}: saved for shape {saved_shape}, the parameter has {shape}")
        encoding = self._encoding(shape)
        if d["encoding"] != encoding:
            raise ValueError(
                f"{what}: encoding {d['encoding']!r}, expected {encoding!r} for shape {shape}"
            )
        storage = Storage(self.name, encoding, role, shape)
        for key, expected in self._header(storage).items():
            if d.get(key) != expected:
                raise ValueError(f"{what}: {key} is {d.get(key)!r}, this format uses {expected!r}")
        arrays, block = self._arrays_from_state_dict(d, encoding, role, shape, what)
        known = {"format", "version", "encoding", "role", "shape", *self._header(storage), *arrays}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"{what}: unexpected entries {extra}")
        storage.arrays = arrays
        storage.block = block
        return storage


@dataclass(frozen=True)
class DenseFormat(_FormatBase):
    """Uncompressed moments: ``dtype=None`` keeps the parameter's dtype (torch's behaviour, format
    ``"native"``), ``dtype=float32`` stores float32 whatever the parameter (``"fp32"``).

    ``load`` returns the stored array itself (no copy), so an in-place update followed by
    ``store(storage, same_array)`` costs nothing.  Non-finite values are stored as they are.
    """

    name: str = "native"
    dtype: np.dtype | None = None

    def _encoding(self, shape: tuple[int, ...]) -> str:
        return "dense"

    def zeros(self, shape: Any, dtype: Any = np.float32, *, role: str = "exp_avg") -> Storage:
        """Zero moment of ``shape`` in ``self.dtype`` (or ``dtype``, the parameter's)."""
        shape = check_shape(shape)
        dt = _check_dtype(dtype) if self.dtype is None else np.dtype(self.dtype)
        values = np.zeros(shape, dtype=dt)
        return Storage(self.name, "dense", check_role(role), shape, {"values": values})

    def load(self, storage: Storage) -> np.ndarray:
        """The stored array itself (shape ``storage.shape``)."""
        self._own(storage)
        return storage.arrays["values"]

    def store(self, storage: Storage, values: Any, rng: np.random.Generator | None = None) -> None:
        """Copy ``values`` (cast to the storage dtype) into the storage; ``rng`` is unused."""
        self._own(storage)
        target = storage.arrays["values"]
        if values is target:
            return
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, as a cast defines it
            np.copyto(target, _real_array(values, storage), casting="unsafe")

    def _arrays_from_state_dict(
        self, d: Mapping[str, Any], encoding: str, role: str, shape: tuple[int, ...], what: str
    ) -> tuple[dict[str, np.ndarray], int]:
        if "values" not in d:
            raise ValueError(f"{what}: missing 'values'")
        arr = _float_array(d, "values", num_elements(shape), what)
        dt = arr.dtype if self.dtype is None else np.dtype(self.dtype)
        return {"values": np.array(arr, dtype=dt).reshape(shape)}, 0


@dataclass(frozen=True)
class Bf16Format(_FormatBase):
    """Both moments as bfloat16 bits (``uint16``), 2 bytes per value; compute in float32.

    ``rounding="stochastic"`` (default, ``needs_rng``) rounds unbiasedly so that increments much
    smaller than a bf16 ulp (``(1 - beta2) * g**2`` against a large ``v``) still move the moment on
    average; ``"nearest"`` rounds to nearest even and loses them.  Error bounds are in
    :mod:`adamkit.formats.bf16`; NaN and inf are kept.
    """

    name: str = "bf16"
    rounding: str = "stochastic"

    def __post_init__(self) -> None:
        if self.rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be 'stochastic' or 'nearest', got {self.rounding!r}")

    @property
    def needs_rng(self) -> bool:  # type: ignore[override]
        """True with stochastic rounding: ``store`` then needs a ``numpy.random.Generator``."""
        return self.rounding == "stochastic"

    def _encoding(self, shape: tuple[int, ...]) -> str:
        return "bf16"

    def zeros(self, shape: Any, dtype: Any = np.float32, *, role: str = "exp_avg") -> Storage:
        """Zero moment of ``shape`` (the parameter's ``dtype`` is only checked)."""
        shape = check_shape(shape)
        _check_dtype(dtype)
        bits = np.zeros(shape, dtype=np.uint16)
        return Storage(self.name, "bf16", check_role(role), shape, {"bits": bits})

    def load(self, storage: Storage) -> np.ndarray:
        """The moment as a new float32 array (exact: bf16 widens without rounding)."""
        self._own(storage)
        return bf16.decode(storage.arrays["bits"])

    def store(self, storage: Storage, values: Any, rng: np.random.Generator | None = None) -> None:
        """Round ``values`` to bf16 into the storage; stochastic rounding needs ``rng``.

        Raises ``TypeError`` when ``rng`` is missing with stochastic rounding, ``ValueError`` for a
        wrong shape.
        """
        self._own(storage)
        arr = _real_array(values, storage)
        if self.rounding == "stochastic":
            if not isinstance(rng, np.random.Generator):
                raise TypeError(
                    "bf16 state rounds stochastically: store() needs rng=numpy.random.Generator, "
                    f"got {type(rng).__name__}"
                )
            bits = bf16.encode_stochastic(arr, rng)
        else:
            bits = bf16.encode_nearest(arr)
        np.copyto(storage.arrays["bits"], bits)

    def _arrays_from_state_dict(
        self, d: Mapping[str, Any], encoding: str, role: str, shape: tuple[int, ...], what: str
    ) -> tuple[dict[str, np.ndarray], int]:
        if "bits" not in d:
            raise ValueError(f"{what}: missing 'bits'")
        bits = np.asarray(d["bits"])
        if bits.dtype != np.uint16:
            raise ValueError(f"{what}: 'bits' must be uint16, got dtype {bits.dtype}")
        if bits.size != num_elements(shape):
            raise ValueError(
                f"{what}: 'bits' has {bits.size} entries, expected {num_elements(shape)}"
            )
        return {"bits": np.array(bits).reshape(shape)}, 0


@dataclass(frozen=True)
class QuantizedFormat(_FormatBase):
    """8-bit moments with one float32 scale per block of ``block`` elements; compute in float32.

    ``codec`` is a module with ``encode(x, block, signed, keep_nonzero=, rng=) -> (codes,
    scales)``, ``decode(codes, scales, shape, block, signed)``, ``code_dtype(signed)``,
    ``code_range(signed)`` and ``zero_code(signed)``: :mod:`~adamkit.formats.int8_blockwise`
    (format ``"int8"``) or :mod:`~adamkit.formats.int8_companded` (``"int8-companded"``).

    ``exp_avg`` uses the signed code.  Second moments use the unsigned code on ``sqrt(v)`` when
    ``sqrt_second_moment`` (``load`` squares it back): that doubles the dynamic range in ``v`` and
    makes the code's relative error the error of ``sqrt(v)``, the Adam denominator.  A positive
    second moment is never rounded to 0 (``keep_nonzero``): a flushed ``v`` turns the step into
    ``m / eps``.

    ``rounding="nearest"`` (the default, as bitsandbytes) loses increments below half a code gap,
    so with ``beta2 = 0.999`` a ``v`` whose gradient vanished stops decaying while its block
    maximum stays (its steps then stay smaller than fp32's: the safe direction);
    ``"stochastic"`` (``needs_rng``) rounds unbiasedly in the stored domain and lets it decay.

    Tensors with fewer than ``min_size`` elements are stored densely in float32 (the rule in
    :mod:`adamkit.formats.base`).  ``store`` raises ``ValueError`` for non-finite values and for
    negative second moments, leaving the storage unchanged.
    """

    name: str = "int8"
    codec: types.ModuleType = int8_blockwise
    block: int = int8_blockwise.DEFAULT_BLOCK
    sqrt_second_moment: bool = True
    min_size: int = MIN_QUANTIZED_SIZE
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        check_block(self.block)
        if self.rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be 'stochastic' or 'nearest', got {self.rounding!r}")
        for attr in ("encode", "decode", "code_dtype", "code_range", "zero_code"):
            if not callable(getattr(self.codec, attr, None)):
                raise TypeError(f"codec must provide {attr}(), {self.codec!r} does not")

    @property
    def needs_rng(self) -> bool:  # type: ignore[override]
        """True with stochastic rounding: ``store`` then needs a ``numpy.random.Generator``."""
        return self.rounding == "stochastic"

    def _encoding(self, shape: tuple[int, ...]) -> str:
        return "dense" if num_elements(shape) < self.min_size else self.name

    def _header(self, storage: Storage) -> dict[str, Any]:
        if storage.encoding == "dense":
            return {}
        return {"block": self.block, "sqrt_second_moment": self.sqrt_second_moment}

    def _sqrt(self, role: str) -> bool:
        return self.sqrt_second_moment and role not in SIGNED_ROLES

    def zeros(self, shape: Any, dtype: Any = np.float32, *, role: str = "exp_avg") -> Storage:
        """Zero moment of ``shape``: dense float32 below ``min_size`` elements, codes otherwise."""
        shape = check_shape(shape)
        _check_dtype(dtype)
        role = check_role(role)
        n = num_elements(shape)
        encoding = self._encoding(shape)
        if encoding == "dense":
            values = np.zeros(shape, dtype=np.float32)
            return Storage(self.name, encoding, role, shape, {"values": values})
        signed = role in SIGNED_ROLES
        codes = np.full(n, self.codec.zero_code(signed), dtype=self.codec.code_dtype(signed))
        scales = np.zeros(num_blocks(n, self.block), dtype=np.float32)
        return Storage(
            self.name, encoding, role, shape, {"codes": codes, "scales": scales}, self.block
        )

    def load(self, storage: Storage) -> np.ndarray:
        """The moment as float32 of ``storage.shape`` (the buffer itself when stored densely)."""
        self._own(storage)
        if storage.encoding == "dense":
            return storage.arrays["values"]
        out = self.codec.decode(
            storage.arrays["codes"],
            storage.arrays["scales"],
            storage.shape,
            self.block,
            storage.signed,
        )
        if self._sqrt(storage.role):
            np.square(out, out=out)
        return out

    def store(self, storage: Storage, values: Any, rng: np.random.Generator | None = None) -> None:
        """Quantize ``values`` into the storage (``rng`` is used only with stochastic rounding).

        Raises ``ValueError`` for a wrong shape, non-finite values or a negative second moment,
        ``TypeError`` when stochastic rounding has no ``rng``; the storage is then unchanged.
        """
        self._own(storage)
        if self.rounding == "stochastic" and not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"{self.name} state rounds stochastically: store() needs "
                f"rng=numpy.random.Generator, got {type(rng).__name__}"
            )
        arr = _real_array(values, storage)
        if not np.isfinite(arr).all():
            raise ValueError(
                f"{storage.role} has non-finite values, which {self.name} state cannot hold "
                "(a NaN/inf moment means the non-finite guard was bypassed)"
            )
        if not storage.signed and arr.size and arr.min() < 0:
            raise ValueError(f"{storage.role} must be >= 0, got {arr.min()}")
        with np.errstate(over="ignore"):  # overflow is reported just below
            x = arr.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{storage.role} overflows float32 (max |x| = {np.abs(arr).max()})")
        if storage.encoding == "dense":
            np.copyto(storage.arrays["values"], x)
            return
        if self._sqrt(storage.role):
            np.sqrt(x, out=x)
        # Second moments never round to 0 (see int8_blockwise.encode): the step stays bounded.
        codes, scales = self.codec.encode(
            x,
            self.block,
            storage.signed,
            keep_nonzero=not storage.signed,
            rng=rng if self.rounding == "stochastic" else None,
        )
        np.copyto(storage.arrays["codes"], codes)
        np.copyto(storage.arrays["scales"], scales)

    def _arrays_from_state_dict(
        self, d: Mapping[str, Any], encoding: str, role: str, shape: tuple[int, ...], what: str
    ) -> tuple[dict[str, np.ndarray], int]:
        n = num_elements(shape)
        if encoding == "dense":
            if "values" not in d:
                raise ValueError(f"{what}: missing 'values'")
            values = _float_array(d, "values", n, what)
            return {"values": np.array(values, dtype=np.float32).reshape(shape)}, 0
        for key in ("codes", "scales"):
            if key not in d:
                raise ValueError(f"{what}: missing {key!r}")
        signed = role in SIGNED_ROLES
        dtype = self.codec.code_dtype(signed)
        codes = np.asarray(d["codes"])
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"{what}: 'codes' must be integers, got dtype {codes.dtype}")
        if codes.size != n:
            raise ValueError(f"{what}: 'codes' has {codes.size} entries, expected {n}")
        low, high = self.codec.code_range(signed)
        if codes.size and (codes.min() < low or codes.max() > high):
            raise ValueError(
                f"{what}: 'codes' must be in [{low}, {high}], got [{codes.min()}, {codes.max()}]"
            )
        scales = _float_array(d, "scales", num_blocks(n, self.block), what)
        if scales.size and not (np.isfinite(scales).all() and scales.min() >= 0):
            raise ValueError(f"{what}: 'scales' must be finite and >= 0")
        arrays = {
            "codes": np.array(codes, dtype=dtype).reshape(-1),
            "scales": np.array(scales, dtype=np.float32).reshape(-1),
        }
        return arrays, self.block
