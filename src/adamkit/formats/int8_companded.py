r"""Group-wise companded 8-bit quantization, elementwise (no lookup table), after FlashOptim (2026).

Like :mod:`adamkit.formats.int8_blockwise` a flat array is cut into blocks with one float32
absmax scale ``s`` each, but the code is arithmetic instead of a 256-entry map, which suits
vectorised and fused CPU kernels (no search, no gather)::

    signed (first moment):     y = x / s in [-1, 1],  z = 2y / (1 + |y|),  c = rint(127 z)  (int8)
                               decode: z = c / 127,   y = z / (2 - |z|)
    unsigned (sqrt of v etc.): y = x / s in [0, 1],   c = rint(255 y)                     (uint8)
                               decode: y = c / 255

The compander ``2y/(1+|y|)`` has slope 2 at 0 and 1/2 at 1, so small entries get 4x finer steps
than large ones.  Error bounds (plus float32 rounding, a few ``2**-24 * s``): unsigned
``|x - decode| <= s / 510``; signed ``|x - decode| <= s * (y(z + 1/254) - y(z))`` for the code
interval around ``x``, at most ``s * 0.0079`` (near ``|y| = 1``, where ``dy/dz = 2``) and
``s / 508`` near 0.  Entries below ``s / 508`` (signed) or ``s / 510`` (unsigned) become 0, so the
dynamic range per block is only ~2.5 decades: that is why FlashOptim uses small groups (32) and
stores ``sqrt(v)`` rather than ``v``.

The signed code uses -127..127 (-128 is never produced).  Non-finite input raises ``ValueError``,
as do negative values with ``signed=False`` (see :mod:`~adamkit.formats.int8_blockwise`).
"""

from __future__ import annotations

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
    "BUDGET_BLOCK",
    "DEFAULT_BLOCK",
    "code_dtype",
    "code_range",
    "decode",
    "encode",
    "levels",
    "zero_code",
]

DEFAULT_BLOCK = 32
#: The block of format ``"int8-companded-64"``: with a float32 scale per 64 codes, two moments
#: take ``2 * (1 + 4 / 64) = 2.125`` bytes per parameter, inside an 8-bit state's 2.15 budget.
BUDGET_BLOCK = 64


def code_dtype(signed: bool = True) -> np.dtype:
    """dtype of the codes: ``int8`` (signed, -127..127) or ``uint8`` (unsigned, 0..255)."""
    return np.dtype(np.int8 if signed else np.uint8)


def code_range(signed: bool = True) -> tuple[int, int]:
    """Smallest and largest valid code: -127..127 (signed) or 0..255 (unsigned)."""
    return (-127, 127) if signed else (0, 255)


def zero_code(signed: bool = True) -> int:
    """The code of 0.0 (0 in both codes)."""
    return 0


def levels(signed: bool = True) -> np.ndarray:
    """Every value a code decodes to before scaling, ascending, float64 (255 or 256 entries)."""
    if signed:
        z = np.arange(-127, 128) / 127.0
        return z / (2.0 - np.abs(z))
    return np.arange(256) / 255.0


def encode(
    x: Any,
    block: int = DEFAULT_BLOCK,
    signed: bool = True,
    *,
    keep_nonzero: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``x`` (any shape, read as float32) per block with the companded code.

    Returns ``(codes, scales)``: flat codes of ``x.size`` elements (dtype :func:`code_dtype`) and
    float32 block maxima, ``ceil(size / block)`` of them.  Codes round to nearest in the code
    domain, or with ``rng`` stochastically there (``floor(c + u)``: unbiased for the unsigned
    linear code, slightly biased toward zero in ``y`` for the convex signed compander).  With
    ``keep_nonzero`` a non-zero value never gets code 0 (it gets +-1 instead; see
    :func:`adamkit.formats.int8_blockwise.encode`), so its error can reach a full first step
    (``s / 255`` unsigned, ``0.004 s`` signed) instead of half of one.  Raises ``ValueError``
    for non-finite values, for negative values when ``signed=False``, and for ``block < 1``.
    """
    block = check_block(block)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}")
    flat = as_flat32(x, signed)
    scales = block_absmax(flat, block)
    y = np.empty_like(flat)
    per_block(safe_divide, flat, scales, block, y)
    if signed:
        # z = 2y / (1 + |y|) scaled by 127, in place to keep one temporary
        denom = np.abs(y)
        denom += np.float32(1.0)
        y *= np.float32(254.0)
        y /= denom
    else:
        y *= np.float32(255.0)
    if rng is None:
        rounded = np.rint(y)
    else:
        rounded = np.floor(y + rng.random(y.size, dtype=np.float32))
        np.clip(rounded, *code_range(signed), out=rounded)
    codes = rounded.astype(code_dtype(signed))
    if keep_nonzero:
        flushed = (codes == 0) & (y != 0)
        codes[flushed] = np.sign(y[flushed]).astype(codes.dtype)
    return codes, scales


def decode(
    codes: Any,
    scales: Any,
    shape: Any = None,
    block: int = DEFAULT_BLOCK,
    signed: bool = True,
) -> np.ndarray:
    """Dequantize to a new float32 array of ``shape`` (default ``(size,)``).

    ``codes`` must have dtype :func:`code_dtype` and ``scales`` float32 with
    ``ceil(size / block)`` entries; raises ``TypeError``/``ValueError`` otherwise.
    """
    block = check_block(block)
    codes = np.asarray(codes)
    if codes.dtype != code_dtype(signed):
        raise TypeError(f"codes must be a {code_dtype(signed)} array, got dtype {codes.dtype}")
    scales = np.asarray(scales)
    if scales.dtype != np.float32:
        raise TypeError(f"scales must be a float32 array, got dtype {scales.dtype}")
    size = codes.size
    shape = (size,) if shape is None else tuple(shape)
    if int(np.prod(shape, dtype=np.int64)) != size:
        raise ValueError(f"codes has {size} elements, shape {shape} needs {int(np.prod(shape))}")
    if scales.size != num_blocks(size, block):
        raise ValueError(
            f"scales has {scales.size} entries, {size} codes in blocks of {block} need "
            f"{num_blocks(size, block)}"
        )
    z = codes.reshape(-1).astype(np.float32)
    if signed:
        z /= np.float32(127.0)
        denom = np.abs(z)
        np.subtract(np.float32(2.0), denom, out=denom)
        z /= denom
    else:
        z /= np.float32(255.0)
    per_block(np.multiply, z, scales.reshape(-1), block, z)
    return z.reshape(shape)
