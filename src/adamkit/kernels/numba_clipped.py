r"""Adam-atan2 (the stability guard's ``update_clip="atan2"``) as a numba kernel.

Twin of :func:`adamkit.guard.reference.clipped_adam_update_` with ``update_clip="atan2"`` (same
arguments, same result up to the rounding stated below) for parameters that
:func:`adamkit.kernels.numba_cpu.qualifies`; without it the NumPy-backed torch path runs the
reference, a chain of NumPy operations with temporaries.  One pass over memory, no reduction::

    m, v (, v_max) as numba_cpu;  p = p (1 - lr lambda) - lr a atan2(m / bc1, b sqrt(v_hat / bc2))

(``update_clip="rms"`` has its kernel already: :func:`adamkit.kernels.numba_tables.
rms_lr_factors`, one read-only pass for the per-tensor factors, then the fused step.)

Rounding versus the reference: the moments are numba_cpu's (float64 bit-identical, float32
within a few ulps: FMA); ``m / bc1``, ``v / bc2``, ``b * sqrt``, ``atan2`` and the final
multiply-subtract are done in the parameter's dtype as NumPy does them, but numba's float32
``atan2`` may differ from NumPy's by an ulp.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from numba import prange

from adamkit.core.config import AdamHyperParams
from adamkit.kernels.numba_cpu import (
    PARALLEL_MIN_SIZE,
    _flat_views,
    _jit,
    _max_nan,
    _moments,
    _unpack,
    check_rows,
    coefficients,
    not_qualifying,
)

__all__ = ["atan2_update_"]


@_jit(inline="always")
def _atan2_element(p, g, m, v, vmax, use_max, i, k, t):
    # t = (bc1, bc2, a, b, lr) in the parameter's dtype, each rounded once from a double.
    pd, mi, vi = _moments(p[i], g[i], m[i], v[i], k)
    m[i] = mi
    v[i] = vi
    w = vi
    if use_max:
        w = _max_nan(vmax[i], vi)
        vmax[i] = w
    update = t[2] * np.arctan2(mi / t[0], t[3] * np.sqrt(w / t[1]))
    p[i] = pd - t[4] * update


@_jit(parallel=True)
def _atan2_parallel(p, g, m, v, vmax, use_max, c, t):
    k = _unpack(c)
    for i in prange(p.size):
        _atan2_element(p, g, m, v, vmax, use_max, i, k, t)


@_jit()
def _atan2_serial(p, g, m, v, vmax, use_max, c, t):
    k = _unpack(c)
    for i in range(p.size):
        _atan2_element(p, g, m, v, vmax, use_max, i, k, t)


def _bias_corrections(step: int, hp: AdamHyperParams) -> tuple[float, float]:
    if not hp.bias_correction:
        return 1.0, 1.0
    return 1.0 - hp.beta1**step, 1.0 - hp.beta2**step


def atan2_update_(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
    max_exp_avg_sqs: Sequence[np.ndarray | None],
    steps: Sequence[int],
    hp: AdamHyperParams,
    *,
    grad_scale: float = 1.0,
    lr_scale: float = 1.0,
    atan2_a: float = 1.27,
    atan2_b: float = 1.0,
) -> None:
    """In place, as :func:`adamkit.guard.reference.clipped_adam_update_` with
    ``update_clip="atan2"`` (``steps[i]``: the 1-based index of the update being applied).

    Every parameter must qualify for :mod:`adamkit.kernels.numba_cpu` (C-contiguous float32 or
    float64 arrays of one shape and dtype): ``TypeError`` naming the first that does not;
    ``ValueError`` when ``max_exp_avg_sqs[i]`` is given other than exactly when ``hp.amsgrad``;
    both before anything is modified.  ``grads`` are only read (with ``grad_scale != 1`` a scaled
    copy is made, rounded to the parameter's dtype as the reference rounds it).
    """
    rows = check_rows(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp.amsgrad)
    views = []
    for index, row in enumerate(rows):
        flat = _flat_views(*row[:5])
        if flat is None:
            raise not_qualifying(index, row)
        views.append(flat)
    if lr_scale != 1.0:
        hp = dataclasses.replace(hp, lr=hp.lr * lr_scale)
    for row, flat in zip(rows, views, strict=True):
        p, g, m, v = flat[:4]
        if p.size == 0:
            continue
        vmax = flat[4] if hp.amsgrad else None
        step, dtype = row[5], p.dtype
        if grad_scale != 1.0:
            g = g * dtype.type(grad_scale)  # the reference's rounding: one multiply in dtype
        c = coefficients(hp, step, dtype)
        bc1, bc2 = _bias_corrections(step, hp)
        t = np.array([bc1, bc2, atan2_a, atan2_b, hp.lr], dtype=dtype)
        fn = _atan2_parallel if p.size >= PARALLEL_MIN_SIZE else _atan2_serial
        fn(p, g, m, v, vmax if vmax is not None else v, vmax is not None, c, t)
