"""Adam as a SciPy minimiser: :func:`minimize` and :func:`scipy_adam` for ``scipy.optimize``.

Both run full-batch (deterministic) Adam on ``fun: R^n -> R``, one
:func:`adamkit.core.reference.adam_step` per iteration, and return a
:class:`scipy.optimize.OptimizeResult`.  ``scipy_adam`` follows SciPy's custom-method protocol::

    scipy.optimize.minimize(fun, x0, jac=grad, method=adamkit.scipy_adam, options={"lr": 0.05})

Iteration ``k = 1, 2, ...`` takes ``x_k = adam_step(x_{k-1}, g(x_{k-1}))`` and then evaluates
``f(x_k)`` and ``g(x_k)``; ``nit`` counts the steps taken and kept.  It stops at the first of:

====== ======= =================================================================================
status success cause
====== ======= =================================================================================
0      True    ``max|g_k + weight_decay * x_k| <= gtol`` (gradient inf-norm, as BFGS), checked at
               ``x0`` too; or ``max|x_k - x_{k-1}| <= xtol`` (step inf-norm), checked only from
               iteration ``ceil(1 / (1 - beta1))`` on (see :func:`minimize`).
1      False   ``maxiter`` steps taken (SciPy's "Maximum number of iterations has been exceeded.").
2      False   ``f`` or ``g`` at the new iterate (or the step itself) is not finite; ``x``, ``fun``
               and ``jac`` are those of the last finite iterate, never NaN.  If ``f(x0)`` or
               ``g(x0)`` is already non-finite, ``x`` is ``x0`` and ``fun``/``jac`` are what was
               evaluated there (``jac`` is NaN where it was not evaluated).
99     False   ``callback`` raised ``StopIteration`` (SciPy's status and message); ``x`` is the
               iterate the callback saw.
====== ======= =================================================================================

Requires SciPy (``pip install adamkit[scipy]``); nothing here is imported by ``import adamkit``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.optimize import OptimizeResult, approx_fprime

from adamkit.core.config import AdamHyperParams, to_real, validate_hyperparams
from adamkit.core.reference import adam_step, init_state

__all__ = ["minimize", "scipy_adam"]

DEFAULT_LR = 1e-2
DEFAULT_MAXITER = 20_000
DEFAULT_GTOL = 1e-5

_MSG_GTOL = "Optimization terminated successfully (gradient inf-norm <= gtol)."
_MSG_XTOL = "Optimization terminated successfully (step inf-norm <= xtol)."
_MSG_MAXITER = "Maximum number of iterations has been exceeded."
_MSG_STOP = "`callback` raised `StopIteration`."

# Options scipy_adam accepts besides SciPy's fixed arguments; `tol` is what minimize(tol=) sends.
_OPTIONS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maxiter",
    "gtol",
    "xtol",
    "tol",
)


def minimize(
    fun: Callable[..., Any],
    x0: Any,
    args: Any = (),
    jac: Any = None,
    *,
    lr: float = DEFAULT_LR,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maxiter: int = DEFAULT_MAXITER,
    gtol: float = DEFAULT_GTOL,
    xtol: float = 0.0,
    callback: Callable[..., Any] | None = None,
) -> OptimizeResult:
    """Minimise ``fun(x, *args)`` with plain Adam (constant ``lr``, no schedule).

    Arguments follow :func:`scipy.optimize.minimize`:

    - ``x0``: real scalar or 1-d array, finite and non-empty; iterates are float64 1-d copies (as
      SciPy, which rejects ``x0.ndim > 1``), and ``fun``/``jac`` receive a fresh copy each call.
    - ``args``: extra arguments for ``fun`` and ``jac`` (a non-tuple is wrapped, as SciPy does).
    - ``jac``: ``True`` if ``fun`` returns ``(f, g)``; a callable ``jac(x, *args) -> g`` of shape
      ``(n,)``; ``None`` or ``False`` for forward differences with
      :func:`scipy.optimize.approx_fprime` (absolute step ``sqrt(machine eps)``, ``n`` extra calls
      of ``fun`` per gradient, all counted in ``nfev``).  ``fun`` must return a real scalar.
    - ``lr, betas, eps, weight_decay, amsgrad``: Adam's hyper-parameters, validated by
      :mod:`adamkit.core.config`.  ``weight_decay`` is coupled L2 as in ``torch.optim.Adam``, so
      the method minimises ``f(x) + weight_decay / 2 * |x|^2``; ``gtol`` is tested on that
      objective's gradient, while the result's ``fun``/``jac`` are those of ``fun`` alone.
    - ``maxiter``: int >= 1.  ``gtol``: finite >= 0, bound on ``max|g|``.  ``xtol``: finite >= 0,
      bound on ``max|x_k - x_{k-1}|``; off by default (0 stops only on an exactly zero step).
      Adam's step is ``lr * m_hat / (sqrt(v_hat) + eps)``, about ``lr`` per coordinate at first
      wherever the optimum is, and small later whenever the gradient is small *relative to its
      recent RMS* (which need not mean near a minimum), so the step test only starts at
      iteration ``ceil(1 / (1 - beta1))`` (10 by default) and is best used as a stall detector.
    - ``callback``: called after every iteration, as in SciPy: ``callback(intermediate_result=r)``
      if its only parameter is named ``intermediate_result`` (``r`` has ``x, fun, jac, nit, nfev,
      njev``), otherwise ``callback(xk)`` with a copy of ``x``.  ``StopIteration`` ends the run
      (status 99).

    Defaults (chosen by experiment, for problems whose variables are of order one): ``lr=1e-2``,
    ``maxiter=20000``, ``gtol=1e-5`` (BFGS's).  Adam's early steps are about ``lr`` per
    coordinate, so reaching an optimum at distance ``D`` takes at least ``D / lr`` iterations.
    With these defaults plain Adam reaches ``gtol`` on 2-D and 10-D Rosenbrock from
    ``(-1.2, 1, ...)`` (about 5,000 and 7,700 iterations), a rotated quadratic of condition 1e3
    and L2-regularised logistic regression, so no learning-rate schedule is added.

    Returns an :class:`~scipy.optimize.OptimizeResult` with ``x, fun, jac, nit, nfev, njev,
    success, status, message``; statuses are listed in the module docstring.  Raises
    ``TypeError``/``ValueError`` naming the argument for bad arguments (before calling ``fun``) and
    for a ``fun``/``jac`` that returns something of the wrong type or shape; ``x0`` is not
    modified.
    """
    hp = _hyperparams(lr, betas, eps, weight_decay, amsgrad)
    maxiter = _check_maxiter(maxiter)
    gtol = _check_tol(gtol, "gtol")
    xtol = _check_tol(xtol, "xtol")
    x = _check_x0(x0)
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {type(fun).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    objective = _Objective(fun, args if isinstance(args, tuple) else (args,), jac, x.size)
    notify = _callback_caller(callback)
    return _run(objective, x, hp, maxiter, gtol, xtol, notify)


def scipy_adam(
    fun: Callable[..., Any],
    x0: Any,
    args: Any = (),
    jac: Any = None,
    hess: Any = None,
    hessp: Any = None,
    bounds: Any = None,
    constraints: Any = (),
    callback: Callable[..., Any] | None = None,
    **options: Any,
) -> OptimizeResult:
    """Adam as a custom method: ``scipy.optimize.minimize(..., method=scipy_adam, options=...)``.

    SciPy calls it as ``scipy_adam(fun, x0, args=, jac=, hess=, hessp=, bounds=, constraints=,
    callback=, **options)`` (``jac=True`` already split by SciPy into ``fun`` and a callable).
    ``options`` are :func:`minimize`'s keyword arguments ``lr, betas, eps, weight_decay, amsgrad,
    maxiter, gtol, xtol``, plus ``tol`` (from ``minimize(tol=...)``), used as ``gtol`` when
    ``gtol`` is not given.  Results equal :func:`minimize`'s with the same arguments.

    Raises ``TypeError`` for an unknown option, and ``ValueError`` for ``bounds`` or
    ``constraints`` (Adam is unconstrained) and for ``hess``/``hessp`` other than ``None`` (it does
    not use them); otherwise as :func:`minimize`.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(
            f"scipy_adam got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options are {', '.join(map(repr, _OPTIONS))}"
        )
    if bounds is not None:
        raise ValueError(
            f"scipy_adam does not support bounds (Adam is unconstrained), got bounds={bounds!r}"
        )
    if not (constraints is None or (isinstance(constraints, (list, tuple)) and not constraints)):
        raise ValueError(
            "scipy_adam does not support constraints (Adam is unconstrained), "
            f"got constraints={constraints!r}"
        )
    for name, value in (("hess", hess), ("hessp", hessp)):
        if value is not None:
            raise ValueError(f"scipy_adam does not use second derivatives; {name} must be None")
    tol = options.pop("tol", None)
    if tol is not None:
        options.setdefault("gtol", tol)
    return minimize(fun, x0, args, jac, callback=callback, **options)


def _hyperparams(lr: Any, betas: Any, eps: Any, weight_decay: Any, amsgrad: Any) -> AdamHyperParams:
    checked = validate_hyperparams(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad
    )
    beta1, beta2 = checked["betas"]
    return AdamHyperParams(
        lr=checked["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=checked["eps"],
        weight_decay=checked["weight_decay"],
        amsgrad=checked["amsgrad"],
    )


def _check_maxiter(maxiter: Any) -> int:
    if isinstance(maxiter, bool) or not isinstance(maxiter, numbers.Integral):
        raise TypeError(f"maxiter must be an int >= 1, got {type(maxiter).__name__} {maxiter!r}")
    if maxiter < 1:
        raise ValueError(f"Invalid maxiter value: {int(maxiter)} (maxiter must be an int >= 1)")
    return int(maxiter)


def _check_tol(value: Any, name: str) -> float:
    tol = to_real(value, name)
    if not (math.isfinite(tol) and tol >= 0.0):
        raise ValueError(f"Invalid {name} value: {tol!r} ({name} must be a finite number >= 0)")
    return tol


def _check_x0(x0: Any) -> np.ndarray:
    try:
        arr = np.atleast_1d(np.asarray(x0))
    except (TypeError, ValueError) as err:
        raise TypeError(f"x0 must be an array of real numbers, got {x0!r} ({err})") from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"x0 must be an array of real numbers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"x0 must be a scalar or a 1-d array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("x0 must not be empty")
    x = np.array(arr, dtype=np.float64)  # always a copy: the caller's x0 is never touched
    if not np.isfinite(x).all():
        raise ValueError(f"x0 must be finite, got {x0!r}")
    return x


def _as_real_scalar(value: Any, what: str) -> float:
    # Like SciPy, any real array holding one number is a scalar.
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        arr = np.asarray(None)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{what} must be a real scalar, got {type(value).__name__} {value!r}")
    if arr.size != 1:
        raise ValueError(f"{what} must be a real scalar, got an array of shape {arr.shape}")
    return float(arr.reshape(()))


class _Objective:
    """``fun`` (and ``jac``) with call counts and checks on what they return."""

    def __init__(self, fun: Callable[..., Any], args: tuple, jac: Any, n: int) -> None:
        if jac is True:
            self.mode = "pair"
        elif jac is None or jac is False:
            self.mode = "fd"
        elif callable(jac):
            self.mode = "callable"
        else:
            raise TypeError(
                f"jac must be True, False, None or a callable, got {type(jac).__name__} {jac!r}"
            )
        self.fun, self.args, self.jac, self.n = fun, args, jac, n
        self.nfev = 0
        self.njev = 0
        self._last: tuple[np.ndarray, float] | None = None

    def value(self, x: np.ndarray) -> float:
        # approx_fprime re-evaluates f at the base point; the cache spares that call.
        if self._last is not None and np.array_equal(x, self._last[0]):
            return self._last[1]
        self.nfev += 1
        f = _as_real_scalar(self.fun(np.array(x, dtype=np.float64), *self.args), "fun(x)")
        self._last = (np.array(x, dtype=np.float64), f)
        return f

    def evaluate(self, x: np.ndarray) -> tuple[float, np.ndarray | None]:
        """``(f, g)`` at ``x``; ``g`` is ``None`` when ``f`` is non-finite and ``g`` is separate."""
        if self.mode == "pair":
            self.nfev += 1
            self.njev += 1
            out = self.fun(x.copy(), *self.args)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                got = f"{len(out)} values" if isinstance(out, (tuple, list)) else repr(out)
                raise TypeError(f"with jac=True, fun must return a pair (f, g), got {got}")
            return _as_real_scalar(out[0], "fun(x)[0]"), self._grad(out[1], "fun(x)[1]")
        f = self.value(x)
        if not math.isfinite(f):
            return f, None
        self.njev += 1
        if self.mode == "callable":
            return f, self._grad(self.jac(x.copy(), *self.args), "jac(x)")
        return f, self._grad(approx_fprime(x, self.value), "the finite-difference gradient")

    def _grad(self, g: Any, what: str) -> np.ndarray:
        if np.iscomplexobj(g):
            raise TypeError(f"{what} must be real, got complex values")
        try:
            arr = np.atleast_1d(np.asarray(g, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{what} must be an array of real numbers ({err})") from None
        if arr.shape != (self.n,):
            raise ValueError(f"{what} has shape {arr.shape}, expected x's shape ({self.n},)")
        return arr


def _callback_caller(
    callback: Callable[..., Any] | None,
) -> Callable[[OptimizeResult], Any] | None:
    """Pick SciPy's calling convention for ``callback`` from its signature."""
    if callback is None:
        return None
    try:
        params = set(inspect.signature(callback).parameters)
    except (TypeError, ValueError):  # builtins without a signature take the old form
        params = set()
    if params == {"intermediate_result"}:
        return lambda result: callback(intermediate_result=result)
    return lambda result: callback(result.x)


def _finite(a: np.ndarray | None) -> bool:
    return a is not None and bool(np.isfinite(a).all())


def _run(
    objective: _Objective,
    x: np.ndarray,
    hp: AdamHyperParams,
    maxiter: int,
    gtol: float,
    xtol: float,
    notify: Callable[[OptimizeResult], Any] | None,
) -> OptimizeResult:
    def result(status: int, message: str) -> OptimizeResult:
        return OptimizeResult(
            x=x,
            fun=f,
            jac=g if g is not None else np.full(x.shape, np.nan),
            nit=nit,
            nfev=objective.nfev,
            njev=objective.njev,
            success=status == 0,
            status=status,
            message=message,
        )

    def converged(x: np.ndarray, g: np.ndarray) -> bool:
        total = g + hp.weight_decay * x if hp.weight_decay else g
        return float(np.max(np.abs(total))) <= gtol

    nit = 0
    f, g = objective.evaluate(x)
    if not (math.isfinite(f) and _finite(g)):
        return result(2, f"Non-finite {_what(f)} at x0 (fun={f!r}); x is x0.")
    if converged(x, g):
        return result(0, _MSG_GTOL)
    # 1e-9: in floating point 1 / (1 - 0.9) is 10.000000000000002, which must count as 10.
    xtol_from = max(1, math.ceil(1.0 / (1.0 - hp.beta1) - 1e-9))
    state = init_state(x, amsgrad=hp.amsgrad)
    while nit < maxiter:
        # A huge gradient can overflow g*g; that is reported as status 2, not as a warning.
        with np.errstate(over="ignore", invalid="ignore"):
            x_new, state_new = adam_step(x, g, state, hp)
        if not (_finite(x_new) and _finite(state_new.exp_avg_sq)):
            return result(
                2,
                f"Non-finite Adam step at iteration {nit + 1} (gradient too large); "
                "returning the last finite iterate.",
            )
        f_new, g_new = objective.evaluate(x_new)
        if not (math.isfinite(f_new) and _finite(g_new)):
            return result(
                2,
                f"Non-finite {_what(f_new)} at iteration {nit + 1} (fun={f_new!r}); "
                "returning the last finite iterate.",
            )
        step = float(np.max(np.abs(x_new - x)))
        x, f, g, state, nit = x_new, f_new, g_new, state_new, nit + 1
        if notify is not None:
            intermediate = OptimizeResult(
                x=x.copy(), fun=f, jac=g.copy(), nit=nit, nfev=objective.nfev, njev=objective.njev
            )
            try:
                notify(intermediate)
            except StopIteration:
                return result(99, _MSG_STOP)
        if converged(x, g):
            return result(0, _MSG_GTOL)
        if nit >= xtol_from and step <= xtol:
            return result(0, _MSG_XTOL)
    return result(1, _MSG_MAXITER)


def _what(f: float) -> str:
    return "gradient" if math.isfinite(f) else "objective value"
