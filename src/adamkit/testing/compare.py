"""How parity tests measure agreement, and where their random inputs come from.

The relative difference between a result and its reference is ``max|a - b| / max|b|`` over the whole
tensor: elementwise relative error is meaningless for entries near zero, and a per-tensor scale is
what float rounding produces.  Inputs may be NumPy arrays, scalars or tensors of any framework with
``detach``/``numpy`` (torch) or ``__array__``; the comparison is done in float64.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["as_float64", "assert_rel_close", "assert_trees_equal", "rel_diff", "seeded_rng"]


def as_float64(x: Any) -> np.ndarray:
    """``x`` as a float64 NumPy array (torch tensors are detached and moved to the CPU first)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_diff(actual: Any, expected: Any) -> float:
    """``max|actual - expected| / max|expected|``, computed in float64.

    ``actual`` and ``expected`` must have the same shape (``ValueError`` otherwise).  Entries that
    are equal, or NaN in both, count as no difference; any other non-finite mismatch gives ``inf``.
    The scale is the largest finite ``|expected|``; when that is 0 the absolute difference is
    returned.  Empty inputs give 0.0.
    """
    a = as_float64(actual)
    b = as_float64(expected)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: actual {a.shape}, expected {b.shape}")
    if a.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        diff = np.where(same, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite = np.abs(b[np.isfinite(b)])
    scale = float(finite.max()) if finite.size else 0.0
    worst = float(diff.max())
    return worst / scale if scale > 0.0 else worst


def assert_rel_close(actual: Any, expected: Any, tol: float, what: str = "") -> None:
    """Raise ``AssertionError`` (with both scales in the message) when ``rel_diff > tol``."""
    diff = rel_diff(actual, expected)
    if not diff <= tol:
        scale = float(np.max(np.abs(as_float64(expected)), initial=0.0))
        label = f"{what}: " if what else ""
        raise AssertionError(
            f"{label}relative difference {diff:.3g} exceeds {tol:.3g} (max|expected| = {scale:.3g})"
        )


def seeded_rng(*keys: Any) -> np.random.Generator:
    """A NumPy generator seeded from ``keys`` (e.g. the test name and its parameters).

    Each test gets its own stream of random inputs, and a failure reproduces with the same keys.
    """
    text = "\x1f".join(map(str, keys)).encode()
    return np.random.default_rng(zlib.crc32(text))


def assert_trees_equal(actual: Any, expected: Any, path: str = "tree") -> None:
    """Assert two nested structures are bit-identical, e.g. two ``state_dict()`` results.

    Dicts must have the same keys, lists/tuples the same length and type, NumPy arrays the same
    dtype, shape and values; anything else is compared with ``==`` after checking the types match.
    NaN equals NaN (in arrays: in the same place).  The ``AssertionError`` names the first
    differing path.
    """
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{path}: {type(actual).__name__} is not a dict"
        assert set(actual) == set(expected), f"{path}: keys {set(actual)} != {set(expected)}"
        for key in expected:
            assert_trees_equal(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
            assert_trees_equal(a, b, f"{path}[{i}]")
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert isinstance(actual, type(expected)), f"{path}: {type(actual)} != {type(expected)}"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert np.array_equal(actual, expected, equal_nan=expected.dtype.kind in "fc"), (
            f"{path}: values differ (rel_diff {rel_diff(actual, expected):.3g})"
        )
    else:
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        both_nan = isinstance(expected, float) and math.isnan(expected) and math.isnan(actual)
        assert both_nan or actual == expected, f"{path}: {actual!r} != {expected!r}"
