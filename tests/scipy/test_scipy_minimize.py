"""adamkit.minimize and scipy_adam: convergence, parity with SciPy and the reference, stopping.

Tolerances come from the stopping rule, not from observed runs: at a point where the gradient
inf-norm is <= gtol, a problem whose Hessian is >= mu (strongly convex) has
``|x - x*|_2 <= sqrt(n) * gtol / mu`` (exact for a quadratic, first order for Rosenbrock) and
``f(x) - f* <= n * gtol**2 / (2 * mu)``.  Problems use the default ``lr=1e-2`` unless stated.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

optimize = pytest.importorskip("scipy.optimize", reason="adamkit.scipy needs SciPy")

import adamkit  # noqa: E402
from adamkit.core.config import AdamHyperParams  # noqa: E402
from adamkit.core.reference import adam_step, init_state  # noqa: E402
from adamkit.scipy import minimize, scipy_adam  # noqa: E402

MAXITER_MSG = "Maximum number of iterations has been exceeded."  # SciPy's wording
STOP_MSG = "`callback` raised `StopIteration`."  # SciPy's wording and status 99


def rosen_start(n: int) -> np.ndarray:
    x0 = np.ones(n)
    x0[::2] = -1.2
    return x0


class Quadratic:
    """``f = x'Ax/2 - b'x`` with a random rotation and eigenvalues log-spaced in [1, cond]."""

    def __init__(self, n: int, cond: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        self.A = (q * np.logspace(0, math.log10(cond), n)) @ q.T
        self.b = rng.standard_normal(n)
        self.mu = 1.0
        self.x_star = np.linalg.solve(self.A, self.b)

    def f(self, x):
        return 0.5 * x @ self.A @ x - self.b @ x

    def g(self, x):
        return self.A @ x - self.b

    def fg(self, x):
        return self.f(x), self.g(x)


class Logistic:
    """Mean logistic loss on standardised breast-cancer data (bundled with scikit-learn)."""

    def __init__(self, l2: float) -> None:
        datasets = pytest.importorskip("sklearn.datasets", reason="needs scikit-learn")
        X, y = datasets.load_breast_cancer(return_X_y=True)
        X = (X - X.mean(axis=0)) / X.std(axis=0)
        self.X = np.hstack([X, np.ones((len(X), 1))])
        self.y = y.astype(np.float64)
        self.l2 = l2

    def f(self, w):
        z = self.X @ w
        return np.mean(np.logaddexp(0.0, z) - self.y * z) + 0.5 * self.l2 * (w @ w)

    def g(self, w):
        p = 0.5 * (1.0 + np.tanh(0.5 * (self.X @ w)))  # the logistic function, overflow-free
        return self.X.T @ (p - self.y) / len(self.y) + self.l2 * w

    def fg(self, w):
        return self.f(w), self.g(w)


@pytest.fixture(scope="module")
def logistic() -> Logistic:
    return Logistic(l2=1e-2)


@pytest.fixture(scope="module")
def lbfgsb(logistic):
    res = optimize.minimize(
        logistic.f,
        np.zeros(logistic.X.shape[1]),
        jac=logistic.g,
        method="L-BFGS-B",
        options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 10_000},
    )
    assert res.success, res.message
    return res


# --- convergence -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "mu"), [(2, 0.399), (10, 0.498)])
def test_rosenbrock_reaches_the_optimum_with_defaults(n, mu):
    # mu: smallest Hessian eigenvalue at the optimum (numpy.linalg.eigvalsh of rosen_hess(ones)).
    res = adamkit.minimize(optimize.rosen, rosen_start(n), jac=optimize.rosen_der)
    assert res.success and res.status == 0, res.message
    assert "gtol" in res.message
    assert np.max(np.abs(optimize.rosen_der(res.x))) <= 1e-5
    assert np.linalg.norm(res.x - 1.0) <= 1.5 * math.sqrt(n) * 1e-5 / mu  # 1.5: second order
    assert res.fun == optimize.rosen(res.x) and res.fun <= 1e-9
    np.testing.assert_array_equal(res.jac, optimize.rosen_der(res.x))
    assert res.nfev == res.njev == res.nit + 1


def test_ill_conditioned_quadratic():
    prob = Quadratic(n=10, cond=1e3, seed=1)
    gtol = 1e-8
    res = minimize(prob.fg, np.zeros(10), jac=True, gtol=gtol)
    assert res.success, res.message
    assert np.linalg.norm(res.x - prob.x_star) <= math.sqrt(10) * gtol / prob.mu
    assert res.fun - prob.f(prob.x_star) <= 10 * gtol**2 / (2 * prob.mu) + 1e-15


def test_logistic_regression_matches_lbfgsb(logistic, lbfgsb):
    gtol = 1e-8
    res = minimize(logistic.f, np.zeros(lbfgsb.x.size), jac=logistic.g, gtol=gtol)
    assert res.success, res.message
    # Both points are near-stationary for a l2-strongly convex objective.
    g_adam = np.linalg.norm(logistic.g(res.x))
    g_lbfgs = np.linalg.norm(logistic.g(lbfgsb.x))
    assert np.linalg.norm(res.x - lbfgsb.x) <= (g_adam + g_lbfgs) / logistic.l2
    assert np.linalg.norm(res.x - lbfgsb.x) <= 1e-5
    assert abs(res.fun - lbfgsb.fun) <= 1e-10 * abs(lbfgsb.fun)


def test_weight_decay_minimises_the_l2_penalised_objective(logistic, lbfgsb):
    # Coupled decay (torch.optim.Adam's) adds l2 * x to the gradient, so Adam on the plain loss
    # with weight_decay=l2 lands on the penalised optimum; fun/jac report the plain loss.
    plain = Logistic(l2=0.0)
    res = minimize(plain.f, np.zeros(lbfgsb.x.size), jac=plain.g, weight_decay=1e-2, gtol=1e-8)
    assert res.success, res.message
    np.testing.assert_allclose(res.x, lbfgsb.x, rtol=0, atol=1e-5)
    assert res.fun == plain.f(res.x)
    np.testing.assert_array_equal(res.jac, plain.g(res.x))
    assert np.max(np.abs(res.jac + 1e-2 * res.x)) <= 1e-8


# --- SciPy's custom-method protocol ----------------------------------------------------------


def _problem(name, logistic):
    if name == "rosen2":
        return optimize.rosen, optimize.rosen_der, rosen_start(2), {}
    if name == "quadratic":
        quad = Quadratic(n=6, cond=1e3, seed=2)
        return quad.f, quad.g, np.zeros(6), {"lr": 0.05, "amsgrad": True}
    options = {"betas": (0.8, 0.99), "weight_decay": 1e-3}
    return logistic.f, logistic.g, np.zeros(31), options


@pytest.mark.parametrize("name", ["rosen2", "quadratic", "logistic"])
@pytest.mark.parametrize("jac_mode", ["callable", "pair"])
def test_scipy_minimize_with_scipy_adam_equals_adamkit_minimize(name, jac_mode, logistic):
    f, g, x0, options = _problem(name, logistic)
    if jac_mode == "pair":
        fun, jac = (lambda x: (f(x), g(x))), True
    else:
        fun, jac = f, g
    ours = adamkit.minimize(fun, x0, jac=jac, **options)
    theirs = optimize.minimize(fun, x0, jac=jac, method=adamkit.scipy_adam, options=options)
    assert ours.success, ours.message
    for key in ("nit", "nfev", "njev", "status", "success", "message", "fun"):
        assert theirs[key] == ours[key], key
    np.testing.assert_array_equal(theirs.x, ours.x)
    np.testing.assert_array_equal(theirs.jac, ours.jac)


def test_scipy_tol_is_gtol_unless_gtol_is_given():
    prob = Quadratic(n=4, cond=10.0, seed=3)
    ours = minimize(prob.f, np.zeros(4), jac=prob.g, gtol=1e-3)
    via_tol = optimize.minimize(prob.f, np.zeros(4), jac=prob.g, method=scipy_adam, tol=1e-3)
    assert via_tol.nit == ours.nit
    np.testing.assert_array_equal(via_tol.x, ours.x)
    both = optimize.minimize(
        prob.f, np.zeros(4), jac=prob.g, method=scipy_adam, tol=1e-1, options={"gtol": 1e-3}
    )
    assert both.nit == ours.nit


# --- gradients: jac=True, callable, finite differences --------------------------------------


def test_jac_true_and_callable_follow_the_same_path():
    prob = Quadratic(n=5, cond=1e2, seed=4)
    pair = minimize(prob.fg, np.zeros(5), jac=True)
    split = minimize(prob.f, np.zeros(5), jac=prob.g)
    np.testing.assert_array_equal(pair.x, split.x)
    assert (pair.nit, pair.nfev, pair.njev) == (split.nit, split.nfev, split.njev)


def test_finite_differences_converge_and_count_every_call():
    calls = []

    def counted(x):
        calls.append(x.copy())
        return optimize.rosen(x)

    exact = minimize(optimize.rosen, rosen_start(2), jac=optimize.rosen_der)
    fd = minimize(counted, rosen_start(2))  # jac=None
    assert fd.success, fd.message
    # Forward-difference error is about h * |f''| / 2 <= 1.5e-8 * 1e3; the optimum moves by
    # H^-1 times that, far below the stopping tolerance's effect.
    np.testing.assert_allclose(fd.x, exact.x, rtol=0, atol=1e-4)
    assert np.max(np.abs(fd.x - 1.0)) <= 1e-4
    assert fd.nfev == len(calls)
    assert fd.njev == fd.nit + 1
    assert fd.nfev == (fd.nit + 1) * 3  # f(x) once plus n = 2 perturbed points per gradient
    np.testing.assert_allclose(fd.jac, optimize.rosen_der(fd.x), rtol=0, atol=1e-5)


def test_scipy_passes_fd_strings_as_none():
    prob = Quadratic(n=3, cond=10.0, seed=5)
    ours = minimize(prob.f, np.zeros(3), maxiter=20)
    theirs = optimize.minimize(
        prob.f, np.zeros(3), jac="2-point", method=scipy_adam, options={"maxiter": 20}
    )
    np.testing.assert_array_equal(theirs.x, ours.x)


# --- the step is the reference step ----------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True},
    ],
)
def test_iterates_are_reference_adam_steps(options):
    prob = Quadratic(n=4, cond=1e3, seed=6)
    rng = np.random.default_rng(7)
    x0 = rng.standard_normal(4)
    seen = []
    res = minimize(prob.f, x0, jac=prob.g, maxiter=5, callback=seen.append, **options)

    betas = options.get("betas", (0.9, 0.999))
    hp = AdamHyperParams(
        lr=options.get("lr", 1e-2),
        beta1=betas[0],
        beta2=betas[1],
        eps=options.get("eps", 1e-8),
        weight_decay=options.get("weight_decay", 0.0),
        amsgrad=options.get("amsgrad", False),
    )
    x, state = x0.copy(), init_state(x0, amsgrad=hp.amsgrad)
    for k in range(5):
        x, state = adam_step(x, prob.g(x), state, hp)
        np.testing.assert_array_equal(seen[k], x)
    np.testing.assert_array_equal(res.x, x)
    assert res.nit == 5 and res.nfev == res.njev == 6
    assert not res.success and res.status == 1 and res.message == MAXITER_MSG


def test_fun_gets_a_1d_float64_copy_and_x0_is_untouched():
    x0 = np.array([3, -2])  # integers, like SciPy we iterate in float64
    before = x0.copy()
    seen = []

    def fun(x):
        seen.append((x.dtype, x.shape))
        value = float(x @ x)
        x[:] = 1e6  # mutating the argument must not change the iterate
        return value

    res = minimize(fun, x0, jac=lambda x: 2 * x, maxiter=3)
    np.testing.assert_array_equal(x0, before)
    assert set(seen) == {(np.dtype(np.float64), (2,))}
    assert np.max(np.abs(res.x)) < 4

    scalar = minimize(lambda x: float((x[0] - 1.0) ** 2), 0.0, jac=lambda x: 2 * (x - 1.0))
    assert scalar.x.shape == (1,) and scalar.success


# --- stopping ---------------------------------------------------------------------------------


def test_gradient_already_small_at_x0_takes_no_step():
    res = minimize(lambda x: float(x @ x), np.zeros(3), jac=lambda x: 2 * x)
    assert res.success and res.nit == 0 and res.nfev == 1
    np.testing.assert_array_equal(res.x, np.zeros(3))


@pytest.mark.parametrize(("betas", "first_check"), [((0.9, 0.999), 10), ((0.5, 0.999), 2)])
def test_xtol_counts_only_after_the_warm_up(betas, first_check):
    # Adam's early steps are about lr = 0.01 < xtol, so the test fires at its first chance,
    # iteration ceil(1 / (1 - beta1)).
    res = minimize(optimize.rosen, rosen_start(2), jac=optimize.rosen_der, betas=betas, xtol=0.1)
    assert res.success and res.status == 0 and "xtol" in res.message
    assert res.nit == first_check


def test_xtol_zero_stops_on_a_stalled_run():
    res = minimize(optimize.rosen, rosen_start(2), jac=optimize.rosen_der, lr=0.0)
    assert res.success and "xtol" in res.message and res.nit == 10
    np.testing.assert_array_equal(res.x, rosen_start(2))


def _nan_beyond(limit):
    def fun(x):
        return math.nan if x[0] > limit else float(np.sum((x - 3.0) ** 2))

    return fun


def test_non_finite_objective_returns_the_last_finite_iterate():
    # From 0 with lr=0.1 each coordinate moves by about 0.1 toward 3, so x[0] passes 0.45 after
    # about 5 steps and f becomes NaN.
    seen = []
    fun = _nan_beyond(0.45)
    res = minimize(fun, np.zeros(2), jac=lambda x: 2 * (x - 3.0), lr=0.1, callback=seen.append)
    assert not res.success and res.status == 2
    assert "Non-finite objective value" in res.message and f"iteration {res.nit + 1}" in res.message
    assert np.isfinite(res.x).all() and res.x[0] <= 0.45
    np.testing.assert_array_equal(res.x, seen[-1])
    assert res.nit == len(seen) >= 3
    assert res.fun == fun(res.x) and math.isfinite(res.fun)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_gradient_stops(bad):
    def jac(x):
        return np.full_like(x, bad) if x[0] > 0.25 else 2 * (x - 3.0)

    res = minimize(lambda x: float(np.sum((x - 3.0) ** 2)), np.zeros(2), jac=jac, lr=0.1)
    assert not res.success and res.status == 2 and "gradient" in res.message
    assert np.isfinite(res.x).all() and np.isfinite(res.jac).all() and res.x[0] <= 0.25


def test_overflowing_gradient_stops_without_a_warning():
    # g * g overflows in the second moment; reported as status 2, not as a RuntimeWarning
    # (which pytest's configuration turns into an error).
    res = minimize(lambda x: 1.0, np.ones(2), jac=lambda x: np.full_like(x, 1e200))
    assert res.status == 2 and "Adam step" in res.message and res.nit == 0
    np.testing.assert_array_equal(res.x, np.ones(2))


def test_non_finite_at_x0():
    res = minimize(lambda x: math.inf, np.ones(2))
    assert res.status == 2 and not res.success and res.nit == 0 and "x0" in res.message
    np.testing.assert_array_equal(res.x, np.ones(2))
    assert res.nfev == 1 and res.njev == 0


# --- callbacks --------------------------------------------------------------------------------


def test_callback_intermediate_result_and_copies():
    prob = Quadratic(n=3, cond=10.0, seed=8)
    seen = []

    def callback(intermediate_result):
        seen.append(intermediate_result)
        intermediate_result.x[:] = 1e9  # must not leak into the run
        intermediate_result.jac[:] = 1e9

    plain = minimize(prob.f, np.zeros(3), jac=prob.g, maxiter=50)
    res = minimize(prob.f, np.zeros(3), jac=prob.g, maxiter=50, callback=callback)
    np.testing.assert_array_equal(res.x, plain.x)
    assert [r.nit for r in seen] == list(range(1, 51))
    assert isinstance(seen[0], optimize.OptimizeResult)
    assert seen[-1].fun == res.fun and seen[-1].nfev == res.nfev


def test_callback_xk_receives_a_copy_of_x():
    prob = Quadratic(n=3, cond=10.0, seed=9)
    seen = []

    def callback(xk):
        seen.append(xk.copy())
        xk[:] = 1e9

    res = minimize(prob.f, np.zeros(3), jac=prob.g, maxiter=7, callback=callback)
    assert len(seen) == 7
    np.testing.assert_array_equal(seen[-1], res.x)


@pytest.mark.parametrize("via_scipy", [False, True])
def test_stop_iteration_in_callback(via_scipy):
    prob = Quadratic(n=3, cond=10.0, seed=10)

    def callback(intermediate_result):
        if intermediate_result.nit == 4:
            raise StopIteration

    if via_scipy:
        res = optimize.minimize(
            prob.f, np.zeros(3), jac=prob.g, method=scipy_adam, callback=callback
        )
    else:
        res = minimize(prob.f, np.zeros(3), jac=prob.g, callback=callback)
    ref = minimize(prob.f, np.zeros(3), jac=prob.g, maxiter=4)
    assert res.nit == 4 and not res.success and res.status == 99 and res.message == STOP_MSG
    np.testing.assert_array_equal(res.x, ref.x)
