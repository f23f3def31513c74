"""Low-memory optimizer state: codecs and the small format objects optimizers use.

Layers (compute in fp32, store compressed):

1. codecs, pure and vectorised over blocks: :mod:`~adamkit.formats.bf16` (nearest and stochastic
   rounding), :mod:`~adamkit.formats.int8_blockwise` (dynamic-map block quantization, Dettmers et
   al. 2021), :mod:`~adamkit.formats.int8_companded` (elementwise companded 8-bit, FlashOptim);
2. format objects (:mod:`~adamkit.formats.containers`) with the
   :class:`~adamkit.formats.base.StateFormat` interface: ``zeros``, ``load``, ``store``,
   ``nbytes``, ``to_state_dict``/``from_state_dict``;
3. :func:`get_format` resolves a group's ``state=`` option (``None``, ``"fp32"``, ``"bf16"``,
   ``"int8"`` (the dynamic map in blocks of 256; also ``"int8-blockwise"``),
   ``"int8-companded"`` (elementwise companded, blocks of 32) and ``"int8-companded-64"``
   (the same code in blocks of 64: 2.125 bytes per parameter)).

The dtype policy per format and the small-tensor rule are written in :mod:`adamkit.formats.base`.
Only NumPy is imported.
"""

from adamkit.formats.base import (
    MIN_QUANTIZED_SIZE,
    ROLES,
    SIGNED_ROLES,
    StateFormat,
    Storage,
)
from adamkit.formats.containers import Bf16Format, DenseFormat, QuantizedFormat
from adamkit.formats.registry import FORMATS, from_state_dict, get_format

__all__ = [
    "FORMATS",
    "MIN_QUANTIZED_SIZE",
    "ROLES",
    "SIGNED_ROLES",
    "Bf16Format",
    "DenseFormat",
    "QuantizedFormat",
    "StateFormat",
    "Storage",
    "from_state_dict",
    "get_format",
]
