"""The numba kernel against the reference step (``adamkit.core.reference.adam_step``).

Tolerances (``rel_diff`` = max|a - b| / max|b| per array): float64 is bit-identical (the kernel
performs the reference's operations in the reference's order); float32 within 1e-6 per step and
1e-5 after 100 steps (the kernel uses a hardware FMA and a reciprocal multiply, see
``adamkit.kernels.numba_cpu``).
"""

from __future__ import annotations

import numpy as np
import pytest

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step
from adamkit.testing import cases_for, rel_diff, seeded_rng

numba = pytest.importorskip("numba", reason="the numba kernel needs numba (adamkit[fast])")

from adamkit.kernels import adam_update_, numba_cpu  # noqa: E402

CASES = cases_for("numba")
DTYPES = [np.float32, np.float64]
STEP_TOL = {np.float32: 1e-6, np.float64: 0.0}
# Sizes on both sides of the threading threshold, and shapes that exercise the flattening.
SHAPES = {
    "odd": (37,),
    "matrix": (5, 7, 3),
    "parallel": (numba_cpu.PARALLEL_MIN_SIZE + 5,),
}


def _inputs(rng, shape, dtype, amsgrad):
    """Parameter, gradient and a mid-run state (moments of plausible size, v >= 0)."""

    def arr(x):  # np.asarray: arithmetic on 0-d arrays returns NumPy scalars
        return np.asarray(x, dtype=dtype)

    p = arr(rng.standard_normal(shape))
    g = arr(rng.standard_normal(shape))
    m = arr(0.1 * rng.standard_normal(shape))
    v = arr(0.1 * rng.random(shape))
    vmax = arr(v + 0.05 * rng.random(shape)) if amsgrad else None
    return p, g, m, v, vmax


def _run_kernel(p, g, m, v, vmax, step, hp, impl="numba"):
    out = [p.copy(), m.copy(), v.copy(), None if vmax is None else vmax.copy()]
    adam_update_([out[0]], [g], [out[1]], [out[2]], [out[3]], [step], hp, impl=impl)
    return out


def _assert_matches(actual, new_param, state, tol):
    expected = [new_param, state.exp_avg, state.exp_avg_sq, state.max_exp_avg_sq]
    for name, a, b in zip(
        ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), actual, expected, strict=True
    ):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if tol == 0.0:
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert rel_diff(a, b) <= tol, f"{name}: {rel_diff(a, b):.3g} > {tol}"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_one_step_matches_reference(case, dtype, shape):
    hp = case.hyperparams()
    rng = seeded_rng("one-step", case.id, dtype.__name__, shape)
    p, g, m, v, vmax = _inputs(rng, shape, dtype, hp.amsgrad)
    for step in (1, 2, 10_000):  # first step, early, and beta2**t far below float32 precision
        new_param, state = adam_step(p, g, AdamState(step - 1, m, v, vmax), hp)
        actual = _run_kernel(p, g, m, v, vmax, step, hp)
        _assert_matches(actual, new_param, state, STEP_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_trajectory_matches_reference(case, dtype):
    """100 steps from zero state with fresh gradients; errors must not accumulate."""
    hp = case.hyperparams()
    rng = seeded_rng("trajectory", case.id, dtype.__name__)
    shape = (64,)
    p_ref = rng.standard_normal(shape).astype(dtype)
    state = AdamState(0, np.zeros_like(p_ref), np.zeros_like(p_ref), None)
    if hp.amsgrad:
        state = state._replace(max_exp_avg_sq=np.zeros_like(p_ref))
    p, m, v = p_ref.copy(), state.exp_avg.copy(), state.exp_avg_sq.copy()
    vmax = None if state.max_exp_avg_sq is None else state.max_exp_avg_sq.copy()
    for step in range(1, 101):
        g = (rng.standard_normal(shape) * (1 + rng.random())).astype(dtype)
        p_ref, state = adam_step(p_ref, g, state, hp)
        adam_update_([p], [g], [m], [v], [vmax], [step], hp, impl="numba")
    tol = 1e-5 if dtype == np.float32 else 0.0
    _assert_matches([p, m, v, vmax], p_ref, state, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_zero_dim_empty_and_many_tiny_tensors_in_one_call(dtype):
    hp = CASES[0].hyperparams(lr=1e-2, amsgrad=True, weight_decay=0.1)
    rng = seeded_rng("tiny", dtype.__name__)
    shapes = [(), (0,), (3, 0), (1,), (2, 3)] + [(int(n),) for n in rng.integers(0, 20, 300)]
    inputs = [_inputs(rng, s, dtype, True) for s in shapes]
    steps = [int(s) for s in rng.integers(1, 50, len(shapes))]  # each parameter its own count
    work = [[p.copy(), g, m.copy(), v.copy(), vmax.copy()] for p, g, m, v, vmax in inputs]
    adam_update_(*zip(*work, strict=True), steps, hp, impl="numba")
    for (p, g, m, v, vmax), out, step in zip(inputs, work, steps, strict=True):
        new_param, state = adam_step(p, g, AdamState(step - 1, m, v, vmax), hp)
        actual = [out[0], out[2], out[3], out[4]]
        _assert_matches(actual, new_param, state, STEP_TOL[dtype])
        assert actual[0].shape == p.shape  # 0-d stays 0-d, written through its flat view


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_grads_are_not_modified(case):
    hp = case.hyperparams()
    rng = seeded_rng("grads", case.id)
    for shape in SHAPES.values():
        p, g, m, v, vmax = _inputs(rng, shape, np.float32, hp.amsgrad)
        before = g.copy()
        _run_kernel(p, g, m, v, vmax, 3, hp)
        assert g.tobytes() == before.tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_non_finite_values_propagate_like_the_reference(dtype):
    """NaN/inf in gradients, parameters and state (and 0/0 with eps = 0) as in the reference."""
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 1e-30], dtype=dtype)
    hp_cases = [
        CASES[0].hyperparams(),
        CASES[0].hyperparams(eps=0.0, weight_decay=0.1),
        CASES[0].hyperparams(amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True),
    ]
    grid = np.array(np.meshgrid(special, special, indexing="ij")).reshape(2, -1)
    p, g = grid[0].copy(), grid[1].copy()
    m = np.resize(special, p.shape)
    v = np.abs(np.resize(special[::-1], p.shape))
    for hp in hp_cases:
        vmax = v[::-1].copy() if hp.amsgrad else None
        with np.errstate(all="ignore"):
            new_param, state = adam_step(p, g, AdamState(4, m, v, vmax), hp)
            actual = _run_kernel(p, g, m, v, vmax, 5, hp)
        expected = [new_param, state.exp_avg, state.exp_avg_sq, state.max_exp_avg_sq]
        for a, b in zip(actual, expected, strict=True):
            if b is None:
                continue
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
            np.testing.assert_array_equal(np.isinf(a), np.isinf(b))
            assert rel_diff(a, b) <= STEP_TOL[dtype]


def test_thread_count_does_not_change_results():
    hp = CASES[0].hyperparams(lr=1e-2)
    rng = seeded_rng("threads")
    p, g, m, v, _ = _inputs(rng, SHAPES["parallel"], np.float32, False)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _run_kernel(p, g, m, v, None, 2, hp)
    finally:
        numba.set_num_threads(before)
    many = _run_kernel(p, g, m, v, None, 2, hp)
    for a, b in zip(one[:3], many[:3], strict=True):
        np.testing.assert_array_equal(a, b)


def test_coefficients_keep_bias_correction_in_double_precision():
    """At large t, 1 - beta1**t formed in float32 is visibly off; the kernel's scalar is not."""
    hp = AdamHyperParams(lr=1e-3, beta1=0.99999, beta2=0.9999999)
    f32 = np.float32
    for step in (1, 100_000):
        c = numba_cpu.coefficients(hp, step, np.dtype(f32))
        assert c.dtype == f32
        expected = f32(-hp.lr / (1.0 - hp.beta1**step))  # rounded once from double
        assert c[numba_cpu._NEG_SS] == expected
    float32_arithmetic = -f32(hp.lr) / (f32(1) - f32(hp.beta1) ** f32(100_000))
    assert float32_arithmetic != expected  # so the check above can tell the two apart
