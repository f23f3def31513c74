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
- float32: two deliberate shortcuts that keep the kernel memory-bound (with float64 widening and
  two divisions it is compute-bound: 1.7x slower on cache-resident data, 1.07x on a 10M tensor
  with 2 threads, 1.15x with 1; ``benchmarks/kernel_variants.py``).  The multiply-adds use the
  hardware FMA (one rounding) where the reference emulates FMA through float64 (two roundings,
  which differ only when the float64 result lies exactly halfway between two float32 values),
  and ``sqrt(v) / sqrt(bc2)`` is ``sqrt(v) * (1 / sqrt(bc2))``, which can move the denominator by
  one ulp.  ``m`` and ``v`` were bit-identical in every comparison made during development; the
  tests hold the step to ``max|a - b| / max|b| <= 1e-6`` and 100 steps to ``1e-5``.

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

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

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

#: Tensors with fewer elements run single-threaded.  Measured on 2 idle cores (float32, median
#: per call): 4,096 elements 3.7 us serial / 3.9 us on the pool, 16,384: 10.8 / 8.9, 32,768:
#: 16.0 / 9.6.  The threshold sits above the break-even because on a busy machine waking a
#: second thread can cost a scheduler time slice (milliseconds).
PARALLEL_MIN_SIZE = 1 << 15

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_F32, _F64 = SUPPORTED_DTYPES

# Slots of the coefficient array handed to the kernels (one per call and dtype/step).
_GSIGN, _WD, _COUPLED, _PSCALE, _W1, _W1_SMALL, _W2, _BETA2, _NEG_SS, _BC2S, _INV_BC2S, _EPS = (
    range(12)
)
_NCOEF = 12


def _jit(*, vector_bits: int | None = None, **options):
    """``numba.njit`` with the kernel options, cached on disk when a cache location exists.

    ``vector_bits=512`` compiles the function (not its callers, not other numba code in the
    process) with the LLVM function attribute ``"prefer-vector-width"="512"``: on AVX-512 CPUs,
    whose LLVM tuning otherwise stops the loop vectoriser at 256 bits, its loops then use zmm
    registers; on CPUs without AVX-512 (and off x86) the attribute changes nothing.  Only for
    non-parallel functions (the parallel ones keep numba's parfor pipeline): put the loops in a
    ``vector_bits`` function and call it from the parallel one.  The attribute is a speed hint:
    should numba's compiler internals that carry it change, the function compiles without it.
    """
    if vector_bits is not None:
        if vector_bits not in (128, 256, 512):
            raise ValueError(f"vector_bits must be None, 128, 256 or 512, got {vector_bits!r}")
        if options.get("parallel"):
            raise ValueError("vector_bits applies to non-parallel functions only")
        # (ImportError, AttributeError: another numba's internals; compile without the hint)
        with contextlib.suppress(ImportError, AttributeError):
            options["pipeline_class"] = _vector_width_compiler(vector_bits)

    def decorate(fn):
        try:
            return njit(cache=True, error_model="numpy", **options)(fn)
        except RuntimeError:  # no writable cache directory: numba refuses cache=True
            return njit(cache=False, error_model="numpy", **options)(fn)

    return decorate


_VECTOR_WIDTH_COMPILERS: dict[int, type] = {}


def _vector_width_compiler(bits: int) -> type:
    """A numba compiler class (``pipeline_class``) whose lowering marks each compiled function
    with ``"prefer-vector-width"="<bits>"`` (clang's ``-mprefer-vector-width``)."""
    if bits in _VECTOR_WIDTH_COMPILERS:
        return _VECTOR_WIDTH_COMPILERS[bits]
    from llvmlite import ir
    from numba.core.compiler import CompilerBase, DefaultPassBuilder
    from numba.core.compiler_machinery import register_pass
    from numba.core.lowering import Lower
    from numba.core.typed_passes import NativeLowering

    attribute = f'"prefer-vector-width"="{bits}"'

    # llvmlite's attribute sets accept only its list of LLVM keywords; a string attribute
    # (printed as it is into the function's prototype) needs a set that knows it.
    attributes = type("_Attributes", (ir.FunctionAttributes,), {})
    attributes._known = ir.FunctionAttributes._known | {attribute}

    class _Lower(Lower):
        def post_lower(self) -> None:
            super().post_lower()
            if type(self.function.attributes) is ir.FunctionAttributes:
                self.function.attributes.__class__ = attributes
                self.function.attributes.add(attribute)

    @register_pass(mutates_CFG=True, analysis_only=False)
    class _Lowering(NativeLowering):
        _name = f"adamkit_native_lowering_vector_{bits}"

        @property
        def lowering_class(self) -> type:
            return _Lower

    class _Compiler(CompilerBase):
        def define_pipelines(self) -> list:
            pm = DefaultPassBuilder.define_nopython_pipeline(self.state)
            # (a pipeline without NativeLowering, were numba to change it, stays unmarked)
            pm.passes = [
                (_Lowering, text) if cls is NativeLowering else (cls, text)
                for cls, text in pm.passes
            ]
            pm.finalize()
            return [pm]

    _VECTOR_WIDTH_COMPILERS[bits] = _Compiler
    return _Compiler


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
def _unpack(c):
    # Scalars out of the array before the loop: as values they cannot alias the arrays being
    # written, so the compiler keeps them in registers and vectorises the loop.
    return (
        c[_GSIGN],
        c[_WD],
        c[_COUPLED] != 0,
        c[_PSCALE],
        c[_W1],
        c[_W1_SMALL] != 0,
        c[_W2],
        c[_BETA2],
        c[_NEG_SS],
        c[_BC2S],
        c[_INV_BC2S],
        c[_EPS],
    )


@_jit(inline="always")
def _moments(p, g, m, v, k):
    """Return ``(decayed p, new m, new v)`` for one element; ``k`` is ``_unpack``'s tuple."""
    gsign, wd, coupled, pscale, w1, w1_small, w2, beta2 = (
        k[0],
        k[1],
        k[2],
        k[3],
        k[4],
        k[5],
        k[6],
        k[7],
    )
    g = g * gsign
    if coupled:
        g = g + wd * p
    p = p * pscale
    base = m if w1_small else g
    m = _fma(g - m, w1, base)
    v = _fma(w2 * g, g, v * beta2)
    return p, m, v


@_jit(inline="always")
def _apply(p, m, second, k):
    neg_ss, bc2s, inv_bc2s, eps = k[8], k[9], k[10], k[11]
    return p + (neg_ss * m) / (_unbias(np.sqrt(second), bc2s, inv_bc2s) + eps)


@_jit(inline="always")
def _max_nan(a, b):
    # np.maximum: NaN in either argument wins.
    return a if (a >= b or a != a) else b


@_jit()
def _step_serial(p, g, m, v, c):
    k = _unpack(c)
    for i in range(p.size):
        pi, mi, vi = _moments(p[i], g[i], m[i], v[i], k)
        m[i] = mi
        v[i] = vi
        p[i] = _apply(pi, mi, vi, k)


@_jit(parallel=True)
def _step_parallel(p, g, m, v, c):
    k = _unpack(c)
    for i in prange(p.size):
        pi, mi, vi = _moments(p[i], g[i], m[i], v[i], k)
        m[i] = mi
        v[i] = vi
        p[i] = _apply(pi, mi, vi, k)


@_jit()
def _step_amsgrad_serial(p, g, m, v, vmax, c):
    k = _unpack(c)
    for i in range(p.size):
        pi, mi, vi = _moments(p[i], g[i], m[i], v[i], k)
        wi = _max_nan(vmax[i], vi)
        m[i] = mi
        v[i] = vi
        vmax[i] = wi
        p[i] = _apply(pi, mi, wi, k)


@_jit(parallel=True)
def _step_amsgrad_parallel(p, g, m, v, vmax, c):
    k = _unpack(c)
    for i in prange(p.size):
        pi, mi, vi = _moments(p[i], g[i], m[i], v[i], k)
        wi = _max_nan(vmax[i], vi)
        m[i] = mi
        v[i] = vi
        vmax[i] = wi
        p[i] = _apply(pi, mi, wi, k)


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
    values = [0.0] * _NCOEF
    values[_GSIGN] = -1.0 if hp.maximize else 1.0
    values[_WD] = hp.weight_decay if coupled else 0.0
    values[_COUPLED] = 1.0 if coupled else 0.0
    values[_PSCALE] = 1.0 - hp.lr * hp.weight_decay if decay and not coupled else 1.0
    values[_W1] = w1 if w1_small else -(1.0 - w1)
    values[_W1_SMALL] = 1.0 if w1_small else 0.0
    values[_W2] = 1.0 - hp.beta2
    values[_BETA2] = hp.beta2
    values[_NEG_SS] = -(hp.lr / bc1)
    values[_BC2S] = bc2_sqrt
    values[_INV_BC2S] = 1.0 / bc2_sqrt
    values[_EPS] = hp.eps
    return np.array(values, dtype=dtype)  # each double rounded once, like NumPy's scalar casts


def qualifies(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
) -> bool:
    """True when the kernel can update this parameter in place.

    Every array must be a C-contiguous ``numpy.ndarray`` with the parameter's shape and dtype,
    that dtype native float32 or float64, and every array but ``grad`` writeable.
    """
    return _flat_views(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq) is not None


def _flat_views(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
) -> tuple[np.ndarray, ...] | None:
    """1-d views of the arrays (``max_exp_avg_sq`` last, if given) or ``None`` (see qualifies)."""
    if type(param) is not np.ndarray:
        return None
    dtype = param.dtype
    # Identity first: NumPy hands out one dtype object per builtin type, and these checks run for
    # every parameter of every step, so they are kept to plain attribute reads.
    if dtype is not _F32 and dtype is not _F64 and dtype not in SUPPORTED_DTYPES:
        return None
    shape = param.shape
    written = (param, exp_avg, exp_avg_sq)
    if max_exp_avg_sq is not None:
        written += (max_exp_avg_sq,)
    for a in (*written, grad):
        if type(a) is not np.ndarray or a.shape != shape:
            return None
        d = a.dtype
        if d is not dtype and d != dtype:
            return None
        flags = a.flags
        if not flags.c_contiguous or not (flags.writeable or a is grad):
            return None
    if len(shape) == 1:
        return (param, grad, *written[1:])
    # ravel of a C-contiguous array is a view, so the kernel writes into the caller's arrays.
    return (param.ravel(), grad.ravel(), *(a.ravel() for a in written[1:]))


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
    parameter is raised before anything is modified.  ``ValueError`` (before anything is
    modified) when ``max_exp_avg_sqs[i]`` is not given exactly when ``hp.amsgrad``.
    """
    amsgrad = hp.amsgrad
    rows = check_rows(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad)
    views: list[tuple[np.ndarray, ...] | None] = [_flat_views(*row[:5]) for row in rows]
    if fallback is None:
        for index, (row, flat) in enumerate(zip(rows, views, strict=True)):
            if flat is None:
                raise not_qualifying(index, row)
    cache: dict[tuple[np.dtype, int], np.ndarray] = {}
    serial = _step_amsgrad_serial if amsgrad else _step_serial
    parallel = _step_amsgrad_parallel if amsgrad else _step_parallel
    for row, flat in zip(rows, views, strict=True):
        if flat is None:
            fallback(*row, hp)  # type: ignore[misc]
            continue
        p = flat[0]
        size = p.size
        if size == 0:
            continue
        key = (p.dtype, row[5])
        c = cache.get(key)
        if c is None:
            c = cache[key] = coefficients(hp, row[5], p.dtype)
        (parallel if size >= PARALLEL_MIN_SIZE else serial)(*flat, c)


def check_rows(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
    max_exp_avg_sqs: Sequence[np.ndarray | None],
    steps: Sequence[int],
    amsgrad: bool,
) -> list[tuple[Any, ...]]:
    """The arguments of :func:`adam_update_` as one row per parameter; ``ValueError`` when
    ``max_exp_avg_sqs[i]`` is not given exactly when ``amsgrad``."""
    rows = list(zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, strict=True))
    for index, row in enumerate(rows):
        if (row[4] is not None) != amsgrad:
            raise ValueError(
                f"max_exp_avg_sqs[{index}] must be an array exactly when amsgrad=True "
                f"(amsgrad={amsgrad})"
            )
    return rows


def not_qualifying(index: int, row: Sequence[Any]) -> TypeError:
    """The error for parameter ``index`` whose arrays (``row[:5]``) the kernel cannot take."""
    return TypeError(
        "impl='numba' needs C-contiguous float32/float64 arrays of the parameter's shape and "
        f"dtype; parameter {index} does not qualify "
        f"({', '.join(_describe(a) for a in row[:5] if a is not None)})"
    )


def _describe(a: object) -> str:
    if not isinstance(a, np.ndarray):
        return type(a).__name__
    layout = "C-contiguous" if a.flags.c_contiguous else "non-contiguous"
    return f"{a.dtype} {a.shape} {layout}"
