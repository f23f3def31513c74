"""In-place Adam steps over NumPy arrays, and the one place that chooses how they are computed.

``adam_update_`` is what the stateful front ends call: ``adamkit.numpy`` directly, ``adamkit.torch``
on zero-copy ``tensor.numpy()`` views of CPU tensors.  Each implementation lives in its own module
and is tested against :func:`adamkit.core.reference.adam_step`, the specification.

Implementations (``impl=``):

- ``"reference"``: the pure reference step, results written back into the given arrays.
- ``"numba"``: :mod:`adamkit.kernels.numba_cpu`, one fused pass over memory per parameter
  (needs numba: ``pip install adamkit[fast]``), all parameters of a dtype in one call
  (:mod:`adamkit.kernels.numba_tables`).  Every parameter must qualify (C-contiguous
  float32/float64 arrays of one shape and dtype), otherwise ``TypeError`` before any update.
- ``"auto"`` (default): ``"numba"`` for each parameter that qualifies when numba is installed,
  ``"reference"`` for the rest.

Why numba.  Adam is memory-bound: one step must read ``p, g, m, v`` and write ``p, m, v``
(28 bytes per float32 parameter), so the best possible step is one pass at memory bandwidth
(:mod:`adamkit.kernels.streaming` measures that floor).  Measured on the 2-core development VM
while it was idle (float32, one tensor of 10M parameters, 2 threads, median of 15 interleaved
steps, ``python benchmarks/kernel_variants.py``):

::

    implementation                                       ms/step   % of floor
    streaming floor (same bytes, trivial arithmetic)       5.16       100
    numba kernel, as shipped                               5.39        96
    numba kernel with every rounding of the reference      5.77        89
    torch.optim.Adam(fused=True)                           7.17        72
    torch.optim.Adam(foreach=True)                        26.3         20
    NumPy in-place ufunc chain (out=, no temporaries)     42.7         12
    textbook NumPy (temporaries; 10M layout of the bench) 63           10

A chain of NumPy ufuncs makes one memory pass per operation (about twelve) however carefully
temporaries are avoided; torch's fused CPU kernel is one pass too but reached 72 % of the floor
here.  The numba kernel is one pass with one division and one square root per element, compiled
for the host's vector width without a C toolchain at install time, and its thread pool follows
``numba.set_num_threads``.  Run ``adamkit bench`` to measure your machine.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import numpy as np

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step

__all__ = ["IMPLS", "adam_update_", "numba_available", "resolve_impl"]

IMPLS: tuple[str, ...] = ("auto", "reference", "numba")

_NOT_LOADED = object()
_numba_module: ModuleType | object | None = _NOT_LOADED


def _load_numba() -> ModuleType | None:
    """Import :mod:`adamkit.kernels.numba_cpu` once; ``None`` when numba cannot be imported."""
    global _numba_module
    if _numba_module is _NOT_LOADED:
        try:
            _numba_module = importlib.import_module("adamkit.kernels.numba_tables")
        except ImportError:
            _numba_module = None
    return _numba_module  # type: ignore[return-value]


def numba_available() -> bool:
    """True when the numba kernel can be used (numba imports); imports it on first call."""
    return _load_numba() is not None


def resolve_impl(impl: str) -> str:
    """Map ``impl`` to the implementation it prefers: ``"reference"`` or ``"numba"``.

    ``"auto"`` gives ``"numba"`` when numba is installed, else ``"reference"`` (parameters that
    the kernel cannot take still go to the reference).  Raises ``ValueError`` for an unknown name
    and ``ImportError`` for ``"numba"`` without numba.
    """
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "reference":
        return impl
    if numba_available():
        return "numba"
    if impl == "numba":
        raise ImportError("impl='numba' needs numba: pip install adamkit[fast]")
    return "reference"


def _reference_one_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    step: int,
    hp: AdamHyperParams,
) -> None:
    new_param, new = adam_step(
        param, grad, AdamState(step - 1, exp_avg, exp_avg_sq, max_exp_avg_sq), hp
    )
    np.copyto(param, new_param)
    np.copyto(exp_avg, new.exp_avg)
    np.copyto(exp_avg_sq, new.exp_avg_sq)
    if max_exp_avg_sq is not None:
        np.copyto(max_exp_avg_sq, new.max_exp_avg_sq)


def _reference_update_(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
    max_exp_avg_sqs: Sequence[np.ndarray | None],
    steps: Sequence[int],
    hp: AdamHyperParams,
) -> None:
    for args in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, strict=True):
        _reference_one_(*args, hp)


def adam_update_(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
    max_exp_avg_sqs: Sequence[np.ndarray | None],
    steps: Sequence[int],
    hp: AdamHyperParams,
    *,
    impl: str = "auto",
) -> None:
    """Apply one Adam step to each parameter in place (parameters and moments are overwritten).

    All sequences have one entry per parameter.  ``steps[i]`` is the 1-based index of the update
    being applied to ``params[i]`` (the caller increments its counter first).  Each array of a
    parameter has the parameter's shape and dtype (float32 or float64); ``max_exp_avg_sqs[i]`` is an
    array when ``hp.amsgrad`` and ``None`` otherwise.  ``grads`` are only read.  The caller
    validates; this function assumes consistent inputs.  ``impl`` is described in the module
    docstring; ``ValueError`` for an unknown name, ``ImportError`` for ``"numba"`` without numba,
    ``TypeError`` for ``"numba"`` with a parameter it cannot take (nothing is modified then).
    """
    chosen = resolve_impl(impl)
    if chosen == "reference":
        _reference_update_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp)
        return
    kernel = _load_numba()
    kernel.adam_update_arrays_(  # type: ignore[union-attr]
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        hp,
        fallback=_reference_one_ if impl == "auto" else None,
    )
