r"""float32 <-> bfloat16, with bfloat16 held as its bit pattern in ``uint16`` (NumPy has no bf16).

bfloat16 is the top half of a float32: sign, the same 8 exponent bits, 7 stored significand bits
(precision p = 8).  So ``decode`` is exact and cheap (shift into the high half), and encoding only
chooses how to drop the low 16 bits.

Error bounds, for finite ``x`` whose magnitude stays at most the largest finite bfloat16
(:data:`BF16_MAX` = 3.3895e38; beyond it nearest rounding and, with some probability, stochastic
rounding give ``inf``):

- :func:`encode_nearest` (round to nearest, ties to even):
  ``|decode(encode_nearest(x)) - x| <= 2**-8 * |x|`` for normal ``|x| >= 2**-126``, and
  ``<= 2**-134`` (half the bf16 spacing) below that, where bf16 is subnormal like float32.
- :func:`encode_stochastic`: rounds to one of the two bf16 neighbours ``lo <= x <= hi``, up with
  probability ``(x - lo) / (hi - lo)`` resolved to 2**-16, so ``E[decode(...)] == x`` exactly for
  every float32 ``x`` (the 16 dropped bits are compared with 16 uniform random bits).  The error is
  below one bf16 ulp: ``< 2**-7 * |x|`` for normal ``x``, ``< 2**-133`` below.
- :func:`encode_stochastic_at`: the same rounding with the noise of :func:`weyl_noise`, indexed
  by element position and a key instead of drawn from a generator (what the fused kernels use;
  unbiased over a uniform key, and a tensor's contiguous parts rounded with their offsets get
  the bits of the whole).

All keep zero's sign, never change the sign of ``x``, map ``±inf`` to ``±inf`` and NaN to a quiet
NaN of the same sign.  Inputs are converted to float32 first (float64 input is rounded once there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "BF16_MAX",
    "WEYL_MULTIPLIER",
    "decode",
    "encode_nearest",
    "encode_stochastic",
    "encode_stochastic_at",
    "weyl_noise",
]

BF16_MAX = float(np.uint32(0x7F7F0000).view(np.float32))
"""Largest finite bfloat16 value, (2 - 2**-7) * 2**127."""

WEYL_MULTIPLIER = 0x9E3779B9
"""Multiplier of the Weyl sequence of :func:`weyl_noise`: 2**32 divided by the golden ratio,
rounded to an odd number (so ``i -> i * WEYL_MULTIPLIER mod 2**32`` is a bijection)."""

_QUIET_NAN = np.uint32(0x7FC0)
_SIGN = np.uint32(0x8000)


def _bits32(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """``x`` as a float32 array and its uint32 bit pattern (a view of the same buffer)."""
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"x must be a real array, got dtype {arr.dtype}")
    # Work on 1-d arrays: operations on 0-d arrays return NumPy scalars, which warn on wrap-around.
    with np.errstate(over="ignore"):  # beyond float32 is inf, as a float32 cast defines it
        x32 = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    return x32, x32.view(np.uint32)


def _fix_nan(x32: np.ndarray, bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    # A NaN whose payload sits only in the low 16 bits would truncate to inf (or carry into it),
    # so NaNs are rewritten as the canonical quiet NaN with their sign.
    nan = np.isnan(x32)
    if nan.any():
        out[nan] = (_QUIET_NAN | ((bits[nan] >> 16) & _SIGN)).astype(np.uint16)
    return out


def encode_nearest(x: Any) -> np.ndarray:
    """Round ``x`` to the nearest bfloat16 (ties to even); return the bits as ``uint16``.

    The result has ``x``'s shape (0-d stays 0-d).  Raises ``TypeError`` for non-real input.
    """
    x32, bits = _bits32(x)
    # Adding 0x7FFF plus the lowest kept bit rounds half to even; a carry into the exponent is the
    # correct next binade (and finite values above BF16_MAX correctly become inf).
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    return _fix_nan(x32, bits, rounded.astype(np.uint16)).reshape(np.shape(x))


def encode_stochastic(x: Any, rng: np.random.Generator) -> np.ndarray:
    """Round ``x`` stochastically to a neighbouring bfloat16, unbiased; return ``uint16`` bits.

    ``rng`` supplies 16 random bits per element (so the draw is reproducible from its state).
    The result has ``x``'s shape.  Raises ``TypeError`` for non-real input or a missing ``rng``.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            "rng must be a numpy.random.Generator for stochastic rounding, "
            f"got {type(rng).__name__}"
        )
    x32, bits = _bits32(x)
    noise = rng.integers(0, 1 << 16, size=bits.shape, dtype=np.uint32)
    # Rounds the magnitude up exactly when the dropped 16 bits plus the noise carry, i.e. with
    # probability (dropped bits) / 2**16 = (|x| - lo) / (hi - lo): the spacing is uniform below hi.
    rounded = (bits + noise) >> 16
    return _fix_nan(x32, bits, rounded.astype(np.uint16)).reshape(np.shape(x))


def weyl_noise(key: int, offset: int, size: int) -> np.ndarray:
    """Rounding noise of elements ``offset .. offset + size - 1`` of the stream ``key``: the top
    16 bits of ``(i * WEYL_MULTIPLIER + key) mod 2**32`` for element ``i``, as ``uint32`` values
    in ``[0, 2**16)`` (only ``key mod 2**32`` and ``i mod 2**32`` matter).

    With ``key`` uniform over 32 bits, each element's noise is exactly uniform over its 2**16
    values (so :func:`encode_stochastic_at` is unbiased); neighbours get a low-discrepancy
    sequence (golden-ratio steps), not independent draws.  ``ValueError`` for negative
    ``offset`` or ``size``.
    """
    if offset < 0 or size < 0:
        raise ValueError(f"offset and size must be >= 0, got offset={offset}, size={size}")
    index = np.arange(offset, offset + size, dtype=np.uint64).astype(np.uint32)
    with np.errstate(over="ignore"):  # wrap-around mod 2**32 is the definition
        u = index * np.uint32(WEYL_MULTIPLIER) + np.uint32(int(key) & 0xFFFFFFFF)
    return u >> np.uint32(16)


def encode_stochastic_at(x: Any, key: int, offset: int = 0) -> np.ndarray:
    """Round ``x`` stochastically to a neighbouring bfloat16 with the noise of
    :func:`weyl_noise` ``(key, offset, x.size)`` (element ``k`` of ``x`` in C order is element
    ``offset + k`` of the stream); return ``uint16`` bits of ``x``'s shape.

    Deterministic for given ``key`` and ``offset``; over a uniformly random 32-bit ``key`` it has
    the distribution of :func:`encode_stochastic` for each element (unbiased), so a tensor split
    into contiguous shards, each rounded with its own ``offset`` and the same ``key``, gets the
    bits of the whole.  The fused kernels of :mod:`adamkit.kernels.numba_formats` round with
    this noise.  Raises ``TypeError`` for non-real input, ``ValueError`` for ``offset < 0``.
    """
    x32, bits = _bits32(x)
    noise = weyl_noise(key, offset, bits.size)
    rounded = (bits + noise) >> 16
    return _fix_nan(x32, bits, rounded.astype(np.uint16)).reshape(np.shape(x))


def decode(bits: Any) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) to float32, exactly; the shape is kept.

    Raises ``TypeError`` when ``bits`` is not a ``uint16`` array.
    """
    arr = np.asarray(bits)
    if arr.dtype != np.uint16:
        raise TypeError(f"bits must be a uint16 array of bfloat16 patterns, got dtype {arr.dtype}")
    wide = arr.astype(np.uint32).reshape(-1)
    return (wide << 16).view(np.float32).reshape(arr.shape)
