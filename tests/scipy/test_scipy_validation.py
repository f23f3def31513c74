"""Every argument rule of adamkit.minimize / scipy_adam, with the message it produces.

Bad arguments are rejected before ``fun`` is first called; hyper-parameter messages are the core
validator's (the same words as every other front end).
"""

from __future__ import annotations

import numpy as np
import pytest

optimize = pytest.importorskip("scipy.optimize", reason="adamkit.scipy needs SciPy")

from adamkit.scipy import minimize, scipy_adam  # noqa: E402


class Counted:
    """``f = |x|^2`` that records how often it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return float(x @ x)


def grad(x):
    return 2 * x


# (keyword arguments, exception, regex matched against the message)
ARGUMENT_CASES = [
    ({"lr": -1.0}, ValueError, r"Invalid learning rate: -1\.0 \(lr must be a finite number >= 0\)"),
    ({"lr": float("nan")}, ValueError, r"Invalid learning rate: nan"),
    ({"lr": "0.1"}, TypeError, r"lr must be a real number, got str '0\.1'"),
    ({"betas": (1.0, 0.999)}, ValueError, r"index 0: 1\.0 \(beta1 must be in \[0, 1\)\)"),
    ({"betas": (0.9, -0.1)}, ValueError, r"index 1: -0\.1 \(beta2 must be in \[0, 1\)\)"),
    ({"betas": (0.9,)}, ValueError, r"betas must be a pair \(beta1, beta2\), got 1 values"),
    ({"betas": 0.9}, TypeError, r"betas must be a pair \(beta1, beta2\), got float"),
    ({"eps": -1e-8}, ValueError, r"Invalid epsilon value: -1e-08 \(eps must be"),
    ({"weight_decay": -0.1}, ValueError, r"Invalid weight_decay value: -0\.1 \(weight_decay"),
    ({"amsgrad": 1}, TypeError, r"amsgrad must be True or False, got int 1"),
    ({"maxiter": 0}, ValueError, r"Invalid maxiter value: 0 \(maxiter must be an int >= 1\)"),
    ({"maxiter": -5}, ValueError, r"Invalid maxiter value: -5"),
    ({"maxiter": 10.0}, TypeError, r"maxiter must be an int >= 1, got float 10\.0"),
    ({"maxiter": True}, TypeError, r"maxiter must be an int >= 1, got bool True"),
    ({"gtol": -1e-5}, ValueError, r"Invalid gtol value: -1e-05 \(gtol must be a finite number"),
    ({"gtol": float("nan")}, ValueError, r"Invalid gtol value: nan"),
    ({"gtol": None}, TypeError, r"gtol must be a real number, got NoneType None"),
    ({"xtol": -1.0}, ValueError, r"Invalid xtol value: -1\.0 \(xtol must be a finite number"),
    ({"xtol": float("inf")}, ValueError, r"Invalid xtol value: inf"),
    ({"callback": 3}, TypeError, r"callback must be callable or None, got int"),
    ({"jac": "2-point"}, TypeError, r"jac must be True, False, None or a callable, got str"),
    ({"jac": 3}, TypeError, r"jac must be True, False, None or a callable, got int 3"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), ARGUMENT_CASES)
def test_bad_arguments_are_rejected_before_fun_is_called(kwargs, exc, match):
    fun = Counted()
    kwargs = {"jac": grad, **kwargs}
    with pytest.raises(exc, match=match):
        minimize(fun, np.ones(2), **kwargs)
    assert fun.calls == 0


@pytest.mark.parametrize(
    ("x0", "exc", "match"),
    [
        ([], ValueError, r"x0 must not be empty"),
        (np.ones((2, 2)), ValueError, r"x0 must be a scalar or a 1-d array, got shape \(2, 2\)"),
        ([1.0, np.nan], ValueError, r"x0 must be finite"),
        ([1.0, np.inf], ValueError, r"x0 must be finite"),
        ([1 + 1j, 2], TypeError, r"x0 must be an array of real numbers, got dtype complex128"),
        (["a", "b"], TypeError, r"x0 must be an array of real numbers, got dtype <U1"),
        ([True, False], TypeError, r"x0 must be an array of real numbers, got dtype bool"),
        (None, TypeError, r"x0 must be an array of real numbers, got dtype object"),
    ],
)
def test_bad_x0(x0, exc, match):
    fun = Counted()
    with pytest.raises(exc, match=match):
        minimize(fun, x0, jac=grad)
    assert fun.calls == 0


def test_fun_must_be_callable():
    with pytest.raises(TypeError, match=r"fun must be callable, got int"):
        minimize(5, np.ones(2), jac=grad)


@pytest.mark.parametrize(
    ("fun", "jac", "exc", "match"),
    [
        (lambda x: x, grad, ValueError, r"fun\(x\) must be a real scalar, got an array of shape"),
        (lambda x: "1", grad, TypeError, r"fun\(x\) must be a real scalar, got str '1'"),
        (lambda x: None, grad, TypeError, r"fun\(x\) must be a real scalar, got NoneType None"),
        (lambda x: 1j, grad, TypeError, r"fun\(x\) must be a real scalar, got complex 1j"),
        (lambda x: True, grad, TypeError, r"fun\(x\) must be a real scalar, got bool True"),
        (lambda x: 1.0, lambda x: np.ones(3), ValueError, r"jac\(x\) has shape \(3,\), expected"),
        (lambda x: 1.0, lambda x: np.ones((2, 1)), ValueError, r"jac\(x\) has shape \(2, 1\)"),
        (lambda x: 1.0, lambda x: 1j * x, TypeError, r"jac\(x\) must be real, got complex"),
        (lambda x: 1.0, lambda x: ["a", "b"], TypeError, r"jac\(x\) must be an array of real"),
        (lambda x: 1.0, True, TypeError, r"fun must return a pair \(f, g\), got 1\.0"),
        (lambda x: (1.0,), True, TypeError, r"fun must return a pair \(f, g\), got 1 values"),
        (lambda x: (x, 2 * x), True, ValueError, r"fun\(x\)\[0\] must be a real scalar"),
        (lambda x: (1.0, x[:1]), True, ValueError, r"fun\(x\)\[1\] has shape \(1,\)"),
        (lambda x: [1, 2], None, ValueError, r"shape \(2,\)"),
    ],
)
def test_bad_values_returned_by_fun_or_jac(fun, jac, exc, match):
    with pytest.raises(exc, match=match):
        minimize(fun, np.ones(2), jac=jac)


@pytest.mark.parametrize("wrap", [np.array, lambda v: np.array([v]), lambda v: [[v]], np.float32])
def test_one_number_in_any_real_container_is_a_scalar(wrap):
    plain = minimize(lambda x: float(x @ x), np.ones(2), jac=grad, maxiter=3)
    res = minimize(lambda x: wrap(float(x @ x)), np.ones(2), jac=grad, maxiter=3)
    assert isinstance(res.fun, float)
    np.testing.assert_array_equal(res.x, plain.x)


def test_args_are_passed_and_a_single_argument_is_wrapped():
    seen = []

    def fun(x, a, *rest):
        seen.append((a, rest))
        return float((x - a) @ (x - a))

    minimize(fun, np.zeros(2), args=5.0, jac=lambda x, a: 2 * (x - a), maxiter=2)
    minimize(fun, np.zeros(2), args=(5.0, "z"), jac=lambda x, a, b: 2 * (x - a), maxiter=2)
    assert seen[0] == (5.0, ()) and seen[-1] == (5.0, ("z",))


# --- scipy_adam, called the way scipy.optimize.minimize calls it ------------------------------


def _scipy(**kwargs):
    return optimize.minimize(Counted(), np.ones(2), jac=grad, method=scipy_adam, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"bounds": [(0, 1), (0, 1)]}, ValueError, r"does not support bounds \(Adam is uncon"),
        ({"bounds": optimize.Bounds(-1, 1)}, ValueError, r"does not support bounds"),
        ({"constraints": {"type": "eq", "fun": sum}}, ValueError, r"does not support constr"),
        ({"constraints": [optimize.LinearConstraint(np.ones(2), 0, 1)]}, ValueError, r"constr"),
        ({"hess": lambda x: np.eye(2)}, ValueError, r"second derivatives; hess must be None"),
        ({"hessp": lambda x, p: p}, ValueError, r"second derivatives; hessp must be None"),
        ({"options": {"disp": True}}, TypeError, r"unknown option\(s\) 'disp'; valid options"),
        ({"options": {"foo": 1, "bar": 2}}, TypeError, r"unknown option\(s\) 'bar', 'foo'"),
        ({"options": {"lr": -1}}, ValueError, r"Invalid learning rate: -1\.0"),
        ({"options": {"maxiter": 0}}, ValueError, r"Invalid maxiter value: 0"),
        ({"tol": -1.0}, ValueError, r"Invalid gtol value: -1\.0"),
        ({"callback": "no"}, TypeError, r"callback must be callable or None, got str"),
    ],
)
def test_scipy_adam_rejects_what_adam_cannot_do(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _scipy(**kwargs)


def test_scipy_adam_accepts_empty_constraints_and_no_bounds():
    res = _scipy(constraints=[], options={"maxiter": 3})
    assert res.nit == 3 and res.status == 1


def test_x0_with_two_dimensions_is_rejected_by_scipy_first():
    # SciPy itself refuses x0.ndim > 1 before calling a custom method; adamkit.minimize does too.
    with pytest.raises(ValueError, match="one dimension"):
        optimize.minimize(Counted(), np.ones((2, 2)), method=scipy_adam)
