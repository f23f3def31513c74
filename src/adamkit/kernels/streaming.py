"""The bandwidth floor of an Adam step: the same memory traffic with trivial arithmetic.

:func:`stream_update_` reads ``param``, ``grad``, ``exp_avg`` and ``exp_avg_sq`` once and writes
``param``, ``exp_avg`` and ``exp_avg_sq`` once (each gets ``+ grad``), with the same threading
rule, tensor loop and per-call costs as :mod:`adamkit.kernels.numba_cpu`.  No Adam step can move
those bytes faster, so ``time(floor) / time(step)`` is the fraction of the achievable speed that a
step reaches.  It is a benchmark instrument, not an optimizer; it needs numba.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import prange

from adamkit.kernels.numba_cpu import PARALLEL_MIN_SIZE, _flat_views, _jit

__all__ = ["stream_update_"]


@_jit()
def _stream_serial(p, g, m, v):
    for i in range(p.size):
        gi = g[i]
        m[i] = m[i] + gi
        v[i] = v[i] + gi
        p[i] = p[i] + gi


@_jit(parallel=True)
def _stream_parallel(p, g, m, v):
    for i in prange(p.size):
        gi = g[i]
        m[i] = m[i] + gi
        v[i] = v[i] + gi
        p[i] = p[i] + gi


def stream_update_(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
) -> None:
    """Add each ``grads[i]`` to ``params[i]``, ``exp_avgs[i]`` and ``exp_avg_sqs[i]`` in place.

    The arrays of one parameter must be C-contiguous float32/float64 of one shape and dtype
    (``TypeError`` otherwise, raised before anything is modified).  ``grads`` are only read.
    """
    views = []
    for index, arrays in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        flat = _flat_views(*arrays, None)
        if flat is None:
            raise TypeError(
                f"stream_update_ needs C-contiguous float32/float64 arrays of one shape and "
                f"dtype; parameter {index} does not qualify"
            )
        views.append(flat)
    for flat in views:
        size = flat[0].size
        if size:
            (_stream_parallel if size >= PARALLEL_MIN_SIZE else _stream_serial)(*flat)
