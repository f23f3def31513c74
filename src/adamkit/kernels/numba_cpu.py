r"""Fused, in-place Adam step for CPU arrays, compiled with numba.

One pass over memory per parameter: ``param``, ``grad``, ``exp_avg``, ``exp_avg_sq`` (and
``max_exp_avg_sq`` with AMSGrad) are each read once and ``param`` and the moments written once, the
arithmetic of :func:`adamkit.core.reference.adam_step` done in registers in between::

    g  = ±g (+ lambda * p if coupled)        p = p * (1 - lr * lambda)     (decoupled; else * 1)
    m  = m + (1 - beta1) * (g - m)           one rounding, as torch.lerp (mirrors reference.ema)
    v  = (1 - beta2) * g * g + beta2 * v     one rounding for the last multiply-add
    v_max = max(v_max, v)                     AMSGrad; NaN propagates like np.maximum
    p  = p + (-(lr / bc1) * m) / (sqrt(v) / sqrt(bc2) + eps)

All options are runtime scalars packed in a small array of the parameter's dtype
(:func:`coefficients`), computed in Python (double precision) exactly as the reference computes
them, so ``beta2 ** t`` is never rounded to float32.

Rounding versus the reference:

- float64: operation for operation the reference (``a * b + c`` rounded twice, divisions kept):
  results are bit-identical.
- float32: two deliberate shortcuts that the kernel needs to stay memory-bound (vectorised
  ``sqrt`` + two divisions + float64 widening make it compute-bound, about 1.4x slower, measured
  in ``benchmarks/``): the multiply-adds use the hardware FMA (one rounding) where the reference
  emulates FMA through float64 (double rounding, differs in about one case in 2**29), and
  ``sqrt(v) / sqrt(bc2)`` is ``sqrt(v) * (1 / sqrt(bc2))``.  Each can move the denominator by
  one ulp; the moments ``m`` and ``v`` are almost always bit-identical.  Tests hold the step to
  ``max|a - b| / max|b| <= 1e-6`` and 100-step trajectories to ``1e-5``.

No ``fastmath``: NaN and infinity behave as in the reference (the non-finite guard relies on it),
and ``error_model="numpy"`` gives IEEE division (``0/0 -> nan``) without Python's zero check, which
would also block vectorisation.

Tensors of at least :data:`PARALLEL_MIN_SIZE` elements run on numba's thread pool (all cores
the process may use; ``numba.set_num_threads`` and ``NUMBA_NUM_THREADS`` are honoured); smaller
ones run single-threaded, where a call costs about a microsecond instead of a thread wake-up.
Compiled code is cached on disk (``cache=True``) when a cache directory is writable, so only the
first run ever pays the JIT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import bias_corrections

__all__ = [
    "PARALLEL_MIN_SIZE",
    "SUPPORTED_DTYPES",
    "adam_update_",
    "coefficients",
    "qualifies",
]

#: Tensors with fewer elements run single-threaded: below about 2**15 a thread wake-up (several
#: microseconds, far more on a loaded machine) costs more than the second core saves.
PARALLEL_MIN_SIZE = 1 << 16

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Slots of the coefficient array handed to the kernels (one per call and dtype/step).
_GSIGN, _WD, _COUPLED, _PSCALE, _W1, _W1_SMALL, _W2, _BETA2, _NEG_SS, _BC2S, _INV_BC2S, _EPS = (
    range(12)
)
_NCOEF = 12


def _jit(**options):
    """``numba.njit`` with the kernel options, cached on disk when a cache location exists."""

    def decorate(fn):
        try:
            return njit(cache=True, error_model="numpy", **options)(fn)
        except RuntimeError:  # no writable cache directory: numba refuses cache=True
            return njit(cache=False, error_model="numpy", **options)(fn)

    return decorate


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` as ``reference.fused_multiply_add``: one rounding below float64, two at it."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        x, y, z = args
        if signature.return_type.bitwidth >= 64:
            return builder.fadd(builder.fmul(x, y), z)
        return builder.fma(x, y, z)

    return a(a, b, c), codegen


def _unbias(root, bc2_sqrt, inv_bc2_sqrt):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


@overload(_unbias, inline="always")
def _unbias_overload(root, bc2_sqrt, inv_bc2_sqrt):
    # float32: a multiply (see the module docstring); float64: the reference's division.
    if isinstance(root, types.Float) and root.bitwidth < 64:
        return lambda root, bc2_sqrt, inv_bc2_sqrt: root * inv_bc2_sqrt
    return lambda root, bc2_sqrt, inv_bc2_sqrt: root / bc2_sqrt


@_jit(inline="always")
def _moments(p, g, m, v, c):
    """Return ``(decayed p, new m, new v)`` for one element; ``c`` holds the coefficients."""
    g = g * c[_GSIGN]
    if c[_COUPLED] != 0:
        g = g + c[_WD] * p
    p = p * c[_PSCALE]
    base = m if c[_W1_SMALL] != 0 else g
    m = _fma(g - m, c[_W1], base)
    v = _fma(c[_W2] * g, g, v * c[_BETA2])
    return p, m, v


@_jit(inline="always")
def _apply(p, m, second, c):
    denom = _unbias(np.sqrt(second), c[_BC2S], c[_INV_BC2S]) + c[_EPS]
    return p + (c[_NEG_SS] * m) / denom


@_jit(inline="always")
def _max_nan(a, b):
    # np.maximum: NaN in either argument wins.
    return a if (a >= b or a != a) else b


@_jit()
def _step_serial(p, g, m, v, c):
    for i in range(p.size):
        pi, mi, vi = _moments(p[i], g[i], m[i], v[i], c)
        m[i] = mi
        v[i] = vi
        p[i] = _apply(pi, mi, vi, c)


@_jit(parallel=True)
def _step_parallel(p, g, m, v, c):
    for i in prange(p.size):
        pi, mi, vi = _moments(p[i], g[i], m[i], v[i], c)
        m[i] = mi
        v[i] = vi
        p[i] = _apply(pi, mi, vi, c)


@_jit()
def _step_amsgrad_serial(p, g, m, v, vmax, c):
    for i in range(p.size):
        pi, mi, vi = _moments(p[i], g[i], m[i], v[i], c)
        wi = _max_nan(vmax[i], vi)
        m[i] = mi
        v[i] = vi
        vmax[i] = wi
        p[i] = _apply(pi, mi, wi, c)


@_jit(parallel=True)
def _step_amsgrad_parallel(p, g, m, v, vmax, c):
    for i in prange(p.size):
        pi, mi, vi = _moments(p[i], g[i], m[i], v[i], c)
        wi = _max_nan(vmax[i], vi)
        m[i] = mi
        v[i] = vi
        vmax[i] = wi
        p[i] = _apply(pi, mi, wi, c)


def coefficients(hp: AdamHyperParams, step: int, dtype: np.dtype) -> np.ndarray:
    """The kernel's scalars for update number ``step`` (1-based), as a 1-d array of ``dtype``.

    Each is formed in double precision as :func:`adamkit.core.reference.adam_step` forms it and
    then rounded once to ``dtype``, which is where the reference's NumPy scalars are rounded too.
    """
    bc1, bc2_sqrt = bias_corrections(step, hp.beta1, hp.beta2, hp.bias_correction)
    decay = hp.weight_decay != 0.0
    coupled = decay and not hp.decoupled_weight_decay
    w1 = 1.0 - hp.beta1
    w1_small = w1 < 0.5  # reference.ema's two lerp forms
    c = np.empty(_NCOEF, dtype=dtype)
    c[_GSIGN] = -1.0 if hp.maximize else 1.0
    c[_WD] = hp.weight_decay if coupled else 0.0
    c[_COUPLED] = 1.0 if coupled else 0.0
    c[_PSCALE] = 1.0 - hp.lr * hp.weight_decay if decay and not coupled else 1.0
    c[_W1] = w1 if w1_small else -(1.0 - w1)
    c[_W1_SMALL] = 1.0 if w1_small else 0.0
    c[_W2] = 1.0 - hp.beta2
    c[_BETA2] = hp.beta2
    c[_NEG_SS] = -(hp.lr / bc1)
    c[_BC2S] = bc2_sqrt
    c[_INV_BC2S] = 1.0 / bc2_sqrt
    c[_EPS] = hp.eps
    return c


def qualifies(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
) -> bool:
    """True when the kernel can update this parameter in place.

    Every array must be a plain, C-contiguous ``numpy.ndarray`` with the parameter's shape and
    dtype, that dtype native float32 or float64, and every array but ``grad`` writeable.
    """
    if type(param) is not np.ndarray or param.dtype not in SUPPORTED_DTYPES:
        return False
    dtype = param.dtype
    shape = param.shape
    arrays = (param, grad, exp_avg, exp_avg_sq)
    if max_exp_avg_sq is not None:
        arrays += (max_exp_avg_sq,)
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype != dtype or a.shape != shape:
            return False
        flags = a.flags
        if not flags.c_contiguous or not (flags.writeable or a is grad):
            return False
    return True


def _flat(a: np.ndarray) -> np.ndarray:
    return a if a.ndim == 1 else a.reshape(-1)  # a view: callers pass C-contiguous arrays


def adam_update_(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
    max_exp_avg_sqs: Sequence[np.ndarray | None],
    steps: Sequence[int],
    hp: AdamHyperParams,
    *,
    fallback: Callable[..., None] | None = None,
) -> None:
    """Update each parameter in place; the contract of :func:`adamkit.kernels.adam_update_`.

    Parameters for which :func:`qualifies` is false are passed, one at a time and with the same
    arguments (``hp`` last), to ``fallback``; without one, a ``TypeError`` naming the first such
    parameter is raised before anything is modified.
    """
    if fallback is None:
        for index, arrays in enumerate(
            zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, strict=True)
        ):
            if not qualifies(*arrays):
                raise TypeError(
                    "impl='numba' needs C-contiguous float32/float64 arrays of the parameter's "
                    f"shape and dtype; parameter {index} does not qualify "
                    f"({', '.join(_describe(a) for a in arrays if a is not None)})"
                )
    cache: dict[tuple[np.dtype, int], np.ndarray | None] = {}
    amsgrad = hp.amsgrad
    for p, g, m, v, vmax, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, strict=True
    ):
        if fallback is not None and not qualifies(p, g, m, v, vmax):
            fallback(p, g, m, v, vmax, step, hp)
            continue
        size = p.size
        if size == 0:
            continue
        key = (p.dtype, step)
        c = cache.get(key)
        if c is None:
            c = cache[key] = coefficients(hp, step, p.dtype)
        parallel = size >= PARALLEL_MIN_SIZE
        if amsgrad:
            kernel = _step_amsgrad_parallel if parallel else _step_amsgrad_serial
            kernel(_flat(p), _flat(g), _flat(m), _flat(v), _flat(vmax), c)
        else:
            kernel = _step_parallel if parallel else _step_serial
            kernel(_flat(p), _flat(g), _flat(m), _flat(v), c)


def _describe(a: object) -> str:
    if not isinstance(a, np.ndarray):
        return type(a).__name__
    layout = "C-contiguous" if a.flags.c_contiguous else "non-contiguous"
    return f"{a.dtype} {a.shape} {layout}"
