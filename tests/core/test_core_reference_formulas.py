"""The reference step against the paper's formulas: two scalar steps by hand, and the formula
written directly (without bias correction) over the case table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step, bias_corrections, init_state
from adamkit.testing import CASES, assert_rel_close, seeded_rng

# Every literal below was worked out by hand from Algorithm 1 of Kingma & Ba (2015) (square roots
# and quotients to 17+ significant digits with a 40-digit decimal calculator), not by this code.
# lr = 0.1, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, theta0 = 1.
#
# plain, g1 = 2, g2 = -1:
#   t=1: m1 = 0.1*2 = 0.2            v1 = 0.001*4 = 0.004
#        m_hat = 0.2/0.1 = 2          v_hat = 0.004/0.001 = 4, sqrt = 2
#        theta1 = 1 - 0.1*2/(2 + 1e-8) = 1 - 0.0999999995000000025 = 0.9000000004999999975
#   t=2: m2 = 0.9*0.2 + 0.1*(-1) = 0.08      v2 = 0.999*0.004 + 0.001*1 = 0.004996
#        bc1 = 1 - 0.81 = 0.19               bc2 = 1 - 0.998001 = 0.001999
#        m_hat = 0.08/0.19 = 0.42105263157894737
#        v_hat = 0.004996/0.001999 = 2.4992496248124062, sqrt = 1.5809015228066567
#        theta2 = theta1 - 0.1*0.42105263157894737/(1.5809015228066567 + 1e-8)
#               = 0.87336629670243136
# AMSGrad, g1 = 2, g2 = 0 (v falls, so v_max keeps v1):
#   t=2: m2 = 0.18   v2 = 0.999*0.004 = 0.003996   v_max = max(0.004, 0.003996) = 0.004
#        m_hat = 0.18/0.19 = 0.94736842105263158
#        v_hat = 0.004/0.001999 = 2.0010005002501251, sqrt = 1.4145672484014767
#        theta2 = 0.9000000005 - 0.1*0.94736842105263158/(1.4145672484014767 + 1e-8)
#               = 0.83302768685241850
# AdamW, weight_decay = 0.1, g1 = 2, g2 = -1 (decay first: theta <- theta*(1 - 0.1*0.1)):
#   t=1: theta = 0.99;  theta1 = 0.99 - 0.0999999995000000025 = 0.8900000004999999975
#   t=2: theta = 0.8900000005*0.99 = 0.88110000049500000; same m, v as the plain case
#        theta2 = 0.88110000049500000 - 0.1*0.42105263157894737/(1.5809015228066567 + 1e-8)
#               = 0.85446629669743136
# Adam with L2, weight_decay = 0.1, g1 = 2, g2 = -1 (g <- g + 0.1*theta):
#   t=1: g = 2.1, m1 = 0.21, v1 = 0.001*4.41 = 0.00441, m_hat = 2.1, sqrt(v_hat) = 2.1
#        theta1 = 1 - 0.1*2.1/(2.1 + 1e-8) = 0.90000000047619047
#   t=2: g = -1 + 0.090000000047619047 = -0.90999999995238095
#        m2 = 0.9*0.21 + 0.1*g = 0.098000000004761905
#        v2 = 0.999*0.00441 + 0.001*g^2 = 0.0052336899999133333
#        m_hat = m2/0.19 = 0.51578947370927318, v_hat = v2/0.001999 = 2.6181540769951642
#        sqrt(v_hat) = 1.6180710976329700
#        theta2 = 0.90000000047619047 - 0.1*0.51578947370927318/(1.6180710976329700 + 1e-8)
#               = 0.86812318917438020
HAND = {
    # id: (options, (g1, g2), (m1, v1, theta1), (m2, v2, v_max2 or None, theta2))
    "plain": (
        {},
        (2.0, -1.0),
        (0.2, 0.004, 0.9000000004999999975),
        (0.08, 0.004996, None, 0.87336629670243136),
    ),
    "maximize": (
        # maximize negates the gradient first, so ascending on -g is the plain case
        {"maximize": True},
        (-2.0, 1.0),
        (0.2, 0.004, 0.9000000004999999975),
        (0.08, 0.004996, None, 0.87336629670243136),
    ),
    "amsgrad": (
        {"amsgrad": True},
        (2.0, 0.0),
        (0.2, 0.004, 0.9000000004999999975),
        (0.18, 0.003996, 0.004, 0.83302768685241850),
    ),
    "adamw": (
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
        (2.0, -1.0),
        (0.2, 0.004, 0.8900000004999999975),
        (0.08, 0.004996, None, 0.85446629669743136),
    ),
    "l2": (
        {"weight_decay": 0.1},
        (2.0, -1.0),
        (0.21, 0.00441, 0.90000000047619047),
        (0.098000000004761905, 0.0052336899999133333, None, 0.86812318917438020),
    ),
}


@pytest.mark.parametrize("name", list(HAND))
def test_two_scalar_steps_worked_out_by_hand(name):
    options, (g1, g2), (m1, v1, theta1), (m2, v2, vmax2, theta2) = HAND[name]
    hp = AdamHyperParams(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, **options)
    theta = np.array(1.0)
    state = init_state(theta, amsgrad=hp.amsgrad)

    theta, state = adam_step(theta, np.array(g1), state, hp)
    assert state.step == 1 and theta.shape == ()
    assert float(state.exp_avg) == pytest.approx(m1, rel=1e-15)
    assert float(state.exp_avg_sq) == pytest.approx(v1, rel=1e-15)
    assert float(theta) == pytest.approx(theta1, rel=1e-15)

    theta, state = adam_step(theta, np.array(g2), state, hp)
    assert state.step == 2
    assert float(state.exp_avg) == pytest.approx(m2, rel=1e-14)
    assert float(state.exp_avg_sq) == pytest.approx(v2, rel=1e-14)
    if vmax2 is None:
        assert state.max_exp_avg_sq is None
    else:
        assert float(state.max_exp_avg_sq) == pytest.approx(vmax2, rel=1e-15)
    assert float(theta) == pytest.approx(theta2, rel=1e-14)


def test_bias_corrections_start_at_step_one():
    # t = 1: 1 - 0.9 = 0.1 and sqrt(1 - 0.999) = sqrt(0.001) = 0.031622776601683793
    bc1, bc2_sqrt = bias_corrections(1, 0.9, 0.999)
    assert bc1 == pytest.approx(0.1, rel=1e-15)
    assert bc2_sqrt == pytest.approx(0.031622776601683793, rel=1e-15)
    assert bias_corrections(5, 0.9, 0.999, enabled=False) == (1.0, 1.0)


def _formula_without_bias_correction(p, g, m, v, vmax, hp):
    """The update with bias correction off, written straight from the definitions in float64."""
    if hp.maximize:
        g = -g
    if hp.decoupled_weight_decay:
        p = p * (1.0 - hp.lr * hp.weight_decay)
    else:
        g = g + hp.weight_decay * p
    m = hp.beta1 * m + (1.0 - hp.beta1) * g
    v = hp.beta2 * v + (1.0 - hp.beta2) * g * g
    vmax = np.maximum(vmax, v)
    second = vmax if hp.amsgrad else v
    return p - hp.lr * m / (np.sqrt(second) + hp.eps), m, v, vmax


@pytest.mark.parametrize(
    ("dtype", "tol"), [(np.float64, 1e-12), (np.float32, 1e-5)], ids=["float64", "float32"]
)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_no_bias_correction_matches_the_direct_formula(case, dtype, tol):
    rng = seeded_rng("no-bias-correction", case.id, np.dtype(dtype).name)
    hp = case.hyperparams(bias_correction=False)
    param = rng.standard_normal((4, 3)).astype(dtype)
    state = init_state(param, amsgrad=hp.amsgrad)
    p64 = param.astype(np.float64)
    m = v = vmax = np.zeros_like(p64)
    for _ in range(50):
        grad = rng.standard_normal(param.shape).astype(dtype)
        param, state = adam_step(param, grad, state, hp)
        p64, m, v, vmax = _formula_without_bias_correction(
            p64, grad.astype(np.float64), m, v, vmax, hp
        )
    assert param.dtype == dtype
    assert_rel_close(param, p64, tol, "param")
    assert_rel_close(state.exp_avg, m, tol, "exp_avg")
    assert_rel_close(state.exp_avg_sq, v, tol, "exp_avg_sq")
    if hp.amsgrad:
        assert_rel_close(state.max_exp_avg_sq, vmax, tol, "max_exp_avg_sq")


def test_bias_correction_changes_the_first_step():
    # With correction the first step has size ~lr (m_hat/sqrt(v_hat) = g/|g|); without it
    # the step is lr * 0.1*g / (sqrt(0.001)*|g|) = lr * 3.1622776601683795 for g > 0.
    theta = np.array(0.0)
    g = np.array(5.0)
    on = adam_step(theta, g, init_state(theta), AdamHyperParams(lr=0.01, eps=0.0))[0]
    off = adam_step(
        theta, g, init_state(theta), AdamHyperParams(lr=0.01, eps=0.0, bias_correction=False)
    )[0]
    assert float(on) == pytest.approx(-0.01, rel=1e-14)
    assert float(off) == pytest.approx(-0.031622776601683795, rel=1e-14)


def test_step_is_pure():
    rng = seeded_rng("pure")
    param = rng.standard_normal(6)
    grad = rng.standard_normal(6)
    state = AdamState(3, rng.standard_normal(6), rng.random(6), rng.random(6) + 1.0)
    copies = [
        a.copy() for a in (param, grad, state.exp_avg, state.exp_avg_sq, state.max_exp_avg_sq)
    ]
    new_param, new_state = adam_step(param, grad, state, AdamHyperParams(amsgrad=True))
    for before, after in zip(
        copies, (param, grad, state.exp_avg, state.exp_avg_sq, state.max_exp_avg_sq), strict=True
    ):
        assert np.array_equal(before, after)
    assert new_state.step == 4 and not np.array_equal(new_param, param)
    assert math.isfinite(float(new_param.sum()))
