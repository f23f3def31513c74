r"""Block-wise dynamic 8-bit quantization (Dettmers et al. 2021, "8-bit Optimizers via Block-wise
Quantization"), as pure vectorised NumPy.

A flat array is cut into blocks of ``block`` elements (the last one may be shorter).  Each block
keeps its absolute maximum ``s`` as a float32 scale and each element the index (``uint8``) of the
entry of a 256-entry map nearest to ``x / s``::

    encode:  s_b = max_{i in b} |x_i|,   c_i = argmin_k |x_i / s_b - q_k|    (ties: lower k)
    decode:  x_i ~ q[c_i] * s_b          (a block of zeros has s_b = 0 and decodes to zeros)

The maps are "dynamic tree" codes: decade ``j = 0..6`` covers ``[10**(j-7), 10**(j-6)]`` with
``2**j`` points (signed map, mirrored for negatives) or ``2**(j+1)`` points (unsigned map), placed
at the midpoints of a uniform split of ``[0.1, 1] * 10**(j-6)``; ``0`` and ``1`` complete the 256
entries.  So relative precision is best near the block maximum and coarsens by 2x per decade, down
to about ``3e-7 * s``.  The signed map reaches ``+1`` but its most negative entry is
``-(1 - 0.9/128) = -0.99297`` (127 negative, 127 positive, 0 and 1).  This is the layout of
bitsandbytes' ``create_dynamic_map(signed)``, built independently here.

Error bound: for ``y = x / s`` the decoded value differs from ``x`` by at most ``s * h(y)`` where
``h(y)`` is half the gap between the two map entries around ``y`` (or the distance to the end entry
outside them); over a whole block ``|x - decode| <= s * (max_half_gap + 2**-23)`` with
:func:`max_half_gap` = 0.00703 (signed) or 0.00352 (unsigned), the top decade being the coarsest;
``2**-23`` covers the float32 rounding of ``x / s`` and ``q * s`` (plus ``2**-149`` absolute when
the result is subnormal).

Non-finite values have no code: ``encode`` raises ``ValueError`` for NaN or inf (in an optimizer
they mean the non-finite guard was bypassed; silently saturating would hide it), and for negative
values when ``signed=False``.  Inputs are converted to float32 first; float64 values beyond the
float32 range therefore count as non-finite.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from adamkit.formats._blocks import (
    as_flat32,
    block_absmax,
    check_block,
    num_blocks,
    per_block,
    safe_divide,
)

__all__ = [
    "DEFAULT_BLOCK",
    "code_dtype",
    "code_range",
    "decode",
    "dynamic_map",
    "encode",
    "max_half_gap",
    "num_blocks",
    "quantize",
    "thresholds",
    "zero_code",
]

DEFAULT_BLOCK = 256
_CHUNK = 1 << 16  # elements per pass: keeps the int64 searchsorted temporaries in cache


@functools.cache
def dynamic_map(signed: bool = True) -> np.ndarray:
    """The 256-entry dynamic code, float32, strictly increasing, in ``[-1, 1]`` (read-only).

    ``signed=True``: 127 negative entries, 0, 127 positive entries and 1.  ``signed=False``: 0, 254
    positive entries and 1.  Entries are computed in float64 and rounded once to float32.
    """
    values = [0.0, 1.0]
    for j in range(7):
        points = 2**j if signed else 2 ** (j + 1)
        edges = np.linspace(0.1, 1.0, points + 1)
        mids = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (j - 6)
        values.extend(mids)
        if signed:
            values.extend(-mids)
    qmap = np.sort(np.asarray(values, dtype=np.float64)).astype(np.float32)
    qmap.setflags(write=False)
    return qmap


@functools.cache
def thresholds(signed: bool = True) -> np.ndarray:
    """The 255 decision thresholds between neighbouring map entries, float32, read-only.

    ``code = number of thresholds < y`` (``searchsorted(thresholds, y, side="left")``, or a
    branch-free binary search in a compiled kernel) is the exact nearest entry for a float32
    ``y``, ties going to the lower entry.
    """
    # Midpoints rounded *down* to float32: for a float32 y, y <= float32_down(mid) exactly when
    # y <= mid, so comparisons stay in float32 without widening y to float64.
    qmap = dynamic_map(signed).astype(np.float64)
    mids = (qmap[1:] + qmap[:-1]) / 2.0
    down = mids.astype(np.float32)
    too_big = down.astype(np.float64) > mids
    down[too_big] = np.nextafter(down[too_big], np.float32(-np.inf))
    down.setflags(write=False)
    return down


def max_half_gap(signed: bool = True) -> float:
    """Largest distance from a point of the map's range to its nearest entry (float64).

    The range is ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned); the signed map's uncovered end near
    ``-1`` is included.  ``|x - decode(encode(x))| <= max_half_gap(signed) * absmax(block)``.
    """
    qmap = dynamic_map(signed).astype(np.float64)
    low = -1.0 if signed else 0.0
    return float(max(np.max(np.diff(qmap)) / 2.0, qmap[0] - low, 1.0 - qmap[-1]))


def code_dtype(signed: bool = True) -> np.dtype:
    """dtype of the codes: always ``uint8`` (indices into the sorted map)."""
    return np.dtype(np.uint8)


def code_range(signed: bool = True) -> tuple[int, int]:
    """Smallest and largest valid code (0 and 255: every index of the map)."""
    return 0, 255


@functools.cache
def zero_code(signed: bool = True) -> int:
    """Index of the entry ``0.0`` of the map (what a zero encodes to)."""
    return int(np.flatnonzero(dynamic_map(signed) == 0.0)[0])


@functools.cache
def _bucket_table(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    # Searching 255 thresholds costs ~8 unpredictable branches per element (~15 M/s in NumPy).
    # Instead bucket y by its top 17 bits (sign, exponent, 8 significand bits): a bucket spans a
    # relative width of 2**-8 = 0.39%, less than the narrowest relative gap between thresholds
    # (0.7%, top decade of the unsigned map), so it holds at most one threshold and
    #     code = table[bucket] + (y > thresholds[table[bucket]])
    # is the exact nearest code.  Both ends of every bucket are checked when the table is built.
    cuts = thresholds(signed)
    keys = np.arange(1 << 17, dtype=np.uint32) << 15
    ends = np.stack([keys, keys | np.uint32(0x7FFF)]).view(np.float32)
    ends = np.where(np.isfinite(ends), np.clip(ends, -1.0, 1.0), 0.0).astype(np.float32)
    codes = np.searchsorted(cuts, ends, side="left")
    low, high = codes.min(axis=0), codes.max(axis=0)
    if np.any(high - low > 1):  # pragma: no cover - a property of the map, checked once
        raise AssertionError("dynamic map too fine for a 17-bit bucket table")
    table = low.astype(np.uint8)
    upper = np.append(cuts, np.float32(np.inf)).astype(np.float32)
    table.setflags(write=False)
    upper.setflags(write=False)
    return table, upper


def quantize(y: Any, signed: bool = True) -> np.ndarray:
    """Nearest-entry codes (``uint8``, shape of ``y``) for normalised float32 values ``y``.

    Exact nearest entry of :func:`dynamic_map` with ties to the lower entry; values outside the
    map's range get the end codes.  ``y`` must be finite (NaN gets an arbitrary code).
    """
    y = np.asarray(y, dtype=np.float32)
    flat = np.ascontiguousarray(y).reshape(-1)
    table, upper = _bucket_table(signed)
    # Values beyond +-1 would fall in buckets the table clipped; clip them into the range first.
    flat = np.clip(flat, np.float32(-1.0), np.float32(1.0))
    code = table[flat.view(np.uint32) >> 15]
    code += flat > upper[code]
    return code.reshape(y.shape)


def encode(
    x: Any,
    block: int = DEFAULT_BLOCK,
    signed: bool = True,
    *,
    keep_nonzero: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``x`` (any shape, read as float32) block-wise to the dynamic map.

    Returns ``(codes, scales)``: ``codes`` is a flat ``uint8`` array of ``x.size`` map indices,
    ``scales`` a float32 array of :func:`num_blocks` block maxima.  Each code is the nearest entry
    to ``y = x / scale``, or with ``rng`` one of the two entries around ``y``, the upper with
    probability ``(y - lower) / (upper - lower)`` (unbiased inside the map's range; below the
    signed map's lowest entry it takes that entry).  With ``keep_nonzero`` a non-zero value that
    would get the code of 0 gets the smallest entry of its sign instead (for second moments: a
    flushed ``v`` turns ``m / (sqrt(v) + eps)`` into ``m / eps``, rounding it up only shortens
    the step).  Raises ``ValueError`` for non-finite values, for negative values when
    ``signed=False``, and for ``block < 1``; ``TypeError`` for an ``rng`` that is not a Generator.
    """
    block = check_block(block)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}")
    flat = as_flat32(x, signed)
    scales = block_absmax(flat, block)
    codes = np.empty(flat.size, dtype=np.uint8)
    table, upper = _bucket_table(signed)
    step = max(1, _CHUNK // block) * block  # whole blocks per chunk
    for start in range(0, flat.size, step):
        part = flat[start : start + step]
        first = start // block
        y = np.empty_like(part)
        per_block(safe_divide, part, scales[first : first + num_blocks(part.size, block)], block, y)
        # Same as quantize(y); inlined to reuse the chunk's buffers.  |y| <= 1 here.
        code = table[y.view(np.uint32) >> 15]
        code += y > upper[code]
        if rng is not None:
            code = _round_stochastically(code, y, dynamic_map(signed), rng)
        if keep_nonzero:
            _unflush(code, y, zero_code(signed))
        codes[start : start + step] = code
    return codes, scales


def _round_stochastically(
    nearest: np.ndarray, y: np.ndarray, qmap: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    # The bracketing entries are the nearest one and its neighbour on y's side.
    low = nearest.astype(np.int16) - (qmap[nearest] > y)
    np.clip(low, 0, qmap.size - 2, out=low)
    q_low, q_high = qmap[low], qmap[low + 1]
    p_up = (y - q_low) / (q_high - q_low)
    return (low + (rng.random(y.size, dtype=np.float32) < p_up)).astype(np.uint8)


def _unflush(code: np.ndarray, y: np.ndarray, zero: int) -> None:
    # The entries next to 0 in the sorted map are the smallest of each sign.
    flushed = (code == zero) & (y != 0)
    if flushed.any():
        code[flushed] = np.where(y[flushed] > 0, zero + 1, zero - 1)


def decode(
    codes: Any,
    scales: Any,
    shape: Any = None,
    block: int = DEFAULT_BLOCK,
    signed: bool = True,
) -> np.ndarray:
    """Dequantize: ``map[codes] * scale`` per block, as a new float32 array of ``shape``.

    ``codes`` holds ``size`` ``uint8`` indices (any shape, read flat), ``scales`` the
    ``ceil(size / block)`` float32 maxima; ``shape`` defaults to ``(size,)``.  Raises ``ValueError``
    when the lengths do not match each other or ``shape``, ``TypeError`` for wrong dtypes.
    """
    block = check_block(block)
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be a uint8 array, got dtype {codes.dtype}")
    scales = np.asarray(scales)
    if scales.dtype != np.float32:
        raise TypeError(f"scales must be a float32 array, got dtype {scales.dtype}")
    size = codes.size
    shape = (size,) if shape is None else tuple(shape)
    if math.prod(shape) != size:
        raise ValueError(f"codes has {size} elements, shape {shape} needs {math.prod(shape)}")
    if scales.size != num_blocks(size, block):
        raise ValueError(
            f"scales has {scales.size} entries, {size} codes in blocks of {block} need "
            f"{num_blocks(size, block)}"
        )
    out = dynamic_map(signed)[codes.reshape(-1)]
    per_block(np.multiply, out, scales.reshape(-1), block, out)
    return out.reshape(shape)
