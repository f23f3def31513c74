"""Block bookkeeping shared by the block-scaled codecs: validation, absmax scales, per-block ops.

A flat array of ``n`` elements is split into ``ceil(n / block)`` blocks, the last one partial when
``block`` does not divide ``n``; nothing is padded.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def num_blocks(size: int, block: int) -> int:
    """Number of scales for ``size`` elements: ``ceil(size / block)`` (0 for an empty array)."""
    return -(-size // block)


def check_block(block: Any) -> int:
    """Return ``block`` as an int >= 1; ``TypeError``/``ValueError`` otherwise."""
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
        raise TypeError(f"block must be an int, got {type(block).__name__} {block!r}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return int(block)


def as_flat32(x: Any, signed: bool) -> np.ndarray:
    """``x`` as a flat contiguous float32 array (a copy unless it already is one).

    Raises ``TypeError`` for non-real dtypes and ``ValueError`` for non-finite values (after the
    conversion to float32) or, when ``signed`` is false, negative ones.
    """
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"x must be a real array, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
        flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    if flat.size and not np.isfinite(flat).all():
        bad = flat[~np.isfinite(flat)][0]
        raise ValueError(
            f"x must be finite to be quantized, got {bad} (in float32); a non-finite optimizer "
            "moment means the non-finite guard was skipped"
        )
    if not signed and flat.size and flat.min() < 0.0:
        raise ValueError(f"x must be >= 0 with signed=False, got {flat.min()}")
    return flat


def block_absmax(flat: np.ndarray, block: int) -> np.ndarray:
    """Per-block ``max |x|`` of a flat float32 array (the last block may be partial)."""
    n = flat.size
    full = n // block
    scales = np.empty(num_blocks(n, block), dtype=np.float32)
    if full:
        np.max(np.abs(flat[: full * block]).reshape(full, block), axis=1, out=scales[:full])
    if n > full * block:
        scales[full] = np.max(np.abs(flat[full * block :]))
    return scales


def per_block(op: Any, values: np.ndarray, scales: np.ndarray, block: int, out: np.ndarray) -> None:
    """``out = op(values, scale of each element's block)`` for flat arrays, vectorised over blocks.

    ``op`` is a ufunc-like ``op(a, b, out=)``; ``out`` may be ``values`` (in place).
    """
    n = values.size
    full = n // block
    if full:
        shaped = (full, block)
        op(
            values[: full * block].reshape(shaped),
            scales[:full, None],
            out=out[: full * block].reshape(shaped),
        )
    if n > full * block:
        op(values[full * block :], scales[full], out=out[full * block :])


def safe_divide(x: np.ndarray, s: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = x / s`` with ``s = 0`` treated as 1 (a block of zeros normalises to zeros)."""
    # |x| <= s, so the correctly rounded quotient stays in [-1, 1]; an all-zero block (s = 0)
    # divides by 1 instead, giving the zeros it holds.
    return np.divide(x, np.where(s > 0, s, np.float32(1.0)), out=out)
