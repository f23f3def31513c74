"""Update clipping (StableAdamW RMS rule, Adam-atan2) on constructed cases solved by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step, init_state
from adamkit.guard import atan2_update, clipped_adam_step, clipped_adam_update_, stable_adamw_scale


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- the rules on arrays ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grad", "v_hat", "eps", "threshold", "expected"),
    [
        ([2.0, -4.0], [1.0, 4.0], 0.0, 1.0, 0.5),  # g^2/v = 4, 4 -> RMS 2
        ([2.0, -4.0], [1.0, 4.0], 0.0, 2.0, 1.0),  # RMS / d = 1 -> no clipping
        ([1.0, 1.0], [1.0, 1 / 7], 0.0, 1.0, 0.5),  # ratios 1, 7 -> mean 4 -> RMS 2
        ([3.0, -1.0], [9.0, 1.0], 0.0, 1.0, 1.0),  # v_hat = g^2 -> RMS 1
        ([0.1, 0.1], [1.0, 1.0], 0.0, 1.0, 1.0),  # RMS < 1 never raises the lr
        ([1.0], [0.0], 0.5, 1.0, 0.5),  # eps^2 = 1/4 floors v_hat: ratio 4
        ([0.0, 2.0], [0.0, 1.0], 0.0, 1.0, 1 / math.sqrt(2)),  # 0/0 counts 0: mean(0, 4) = 2
        ([1.0], [0.0], 0.0, 1.0, 0.0),  # infinite RMS: the tensor does not move
        ([], [], 1e-8, 1.0, 1.0),  # empty tensor
    ],
)
def test_stable_adamw_scale_hand_cases(grad, v_hat, eps, threshold, expected):
    got = stable_adamw_scale(np.array(grad), np.array(v_hat), eps=eps, threshold=threshold)
    assert math.isclose(got, expected, rel_tol=1e-15, abs_tol=0.0)


def test_stable_adamw_scale_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="grad has shape"):
        stable_adamw_scale(np.ones(3), np.ones(2), eps=1e-8)


def test_atan2_update_hand_values_and_no_nan_at_zero():
    m = np.array([1.0, -1.0, 0.0, 3.0, -2.0])
    v = np.array([1.0, 1.0, 0.0, 0.0, 0.0])
    got = atan2_update(m, v, a=1.0, b=1.0)
    expected = np.array([math.pi / 4, -math.pi / 4, 0.0, math.pi / 2, -math.pi / 2])
    np.testing.assert_allclose(got, expected, rtol=1e-15)


def test_atan2_update_is_bounded_and_close_to_adam_for_small_ratios():
    rng = np.random.default_rng(3)
    m = rng.normal(size=1000) * 10.0 ** rng.integers(-6, 6, size=1000)
    v = rng.random(1000) * 10.0 ** rng.integers(-12, 3, size=1000)
    a, b = 1.27, 1.0
    upd = atan2_update(m, v, a, b)
    assert np.all(np.abs(upd) <= a * math.pi / 2)
    small = np.abs(m) < 1e-4 * b * np.sqrt(v)
    assert small.sum() > 10
    # atan(x) = x (1 + O(x^2)); with |x| < 1e-4 the relative error is below 1e-8.
    np.testing.assert_allclose(upd[small], (a / b) * m[small] / np.sqrt(v[small]), rtol=1e-8)


def test_atan2_update_keeps_float32():
    m = np.ones(3, dtype=np.float32)
    assert atan2_update(m, m, 1.27, 1.0).dtype == np.float32


# -- inside an Adam step ---------------------------------------------------------------------


def _state(shape, step=0, m=0.0, v=0.0, vmax=None):
    z = np.zeros(shape)
    return AdamState(step, z + m, z + v, None if vmax is None else z + vmax)


def test_rms_clipping_halves_the_step_of_an_underestimated_tensor():
    # beta1 = 0, beta2 = 3/4, no bias correction, v_old = 0: v = g^2 / 4, so g^2 / v = 4 and
    # RMS = 2 -> lr / 2.  Update: (lr / 2) * g / (|g| / 2) = lr * sign(g)  (eps = 0).
    rng = np.random.default_rng(0)
    g = rng.normal(size=(4, 3))
    p = rng.normal(size=(4, 3))
    hp = AdamHyperParams(lr=0.1, beta1=0.0, beta2=0.75, eps=0.0, bias_correction=False)
    new_p, new_s, factor = clipped_adam_step(p, g, _state(g.shape, step=5), hp, update_clip="rms")
    assert factor == 0.5
    np.testing.assert_allclose(new_p, p - 0.1 * np.sign(g), rtol=1e-15, atol=1e-15)
    assert new_s.step == 6
    np.testing.assert_allclose(new_s.exp_avg_sq, 0.25 * g * g, rtol=1e-15)
    unclipped, _ = adam_step(p, g, _state(g.shape, step=5), hp)
    np.testing.assert_allclose(unclipped, p - 0.2 * np.sign(g), rtol=1e-15, atol=1e-15)


def test_rms_clipping_leaves_a_well_estimated_tensor_bit_identical():
    # v_old = g^2: v = 3/4 g^2 + 1/4 g^2 = g^2 -> RMS 1, factor 1, exactly plain Adam.
    rng = np.random.default_rng(1)
    g = rng.normal(size=7)
    p = rng.normal(size=7)
    state = AdamState(3, rng.normal(size=7), g * g, None)
    hp = AdamHyperParams(lr=0.1, beta1=0.5, beta2=0.75, bias_correction=False)
    new_p, new_s, factor = clipped_adam_step(p, g, state, hp, update_clip="rms")
    ref_p, ref_s = adam_step(p, g, state, hp)
    assert math.isclose(factor, 1.0, rel_tol=1e-15)
    if factor == 1.0:
        assert _same(new_p, ref_p)
    assert _same(new_s.exp_avg, ref_s.exp_avg) and _same(new_s.exp_avg_sq, ref_s.exp_avg_sq)


def test_rms_at_the_first_bias_corrected_step_is_one():
    # t = 1: v_hat = (1 - beta2) g^2 / (1 - beta2) = g^2, so nothing is clipped.
    rng = np.random.default_rng(2)
    g, p = rng.normal(size=5), rng.normal(size=5)
    _, _, factor = clipped_adam_step(p, g, init_state(p), AdamHyperParams(), update_clip="rms")
    assert math.isclose(factor, 1.0, rel_tol=1e-12)


def test_rms_uses_the_gradient_that_entered_v_with_coupled_l2():
    # g = 0 but coupled decay lambda = 1 makes the effective gradient p: v = p^2 / 4 -> RMS 2.
    p = np.array([1.0, -2.0, 3.0])
    hp = AdamHyperParams(
        lr=0.1, beta1=0.0, beta2=0.75, eps=0.0, weight_decay=1.0, bias_correction=False
    )
    new_p, _, factor = clipped_adam_step(p, np.zeros(3), _state(3, 2), hp, update_clip="rms")
    assert factor == 0.5
    np.testing.assert_allclose(new_p, p - 0.1 * np.sign(p), rtol=1e-15)


def test_rms_clipped_lr_also_scales_decoupled_decay():
    # As above with g != 0 and decoupled lambda = 0.5: p (1 - (lr/2) lambda) - lr sign(g).
    g = np.array([0.5, -1.5])
    p = np.array([2.0, 4.0])
    hp = AdamHyperParams(
        lr=0.1,
        beta1=0.0,
        beta2=0.75,
        eps=0.0,
        weight_decay=0.5,
        decoupled_weight_decay=True,
        bias_correction=False,
    )
    new_p, _, factor = clipped_adam_step(p, g, _state(2, 4), hp, update_clip="rms")
    assert factor == 0.5
    np.testing.assert_allclose(new_p, p * (1 - 0.05 * 0.5) - 0.1 * np.sign(g), rtol=1e-15)


def test_rms_with_amsgrad_reads_the_running_max():
    # v = g^2 / 4 but max_exp_avg_sq = 100 g^2: RMS = sqrt(1/100) < 1 -> not clipped.
    g = np.array([1.0, -2.0])
    p = np.zeros(2)
    hp = AdamHyperParams(beta1=0.0, beta2=0.75, amsgrad=True, bias_correction=False)
    state = AdamState(1, np.zeros(2), np.zeros(2), 100 * g * g)
    assert clipped_adam_step(p, g, state, hp, update_clip="rms")[2] == 1.0
    plain = AdamHyperParams(beta1=0.0, beta2=0.75, bias_correction=False)
    assert clipped_adam_step(p, g, _state(2, 1), plain, update_clip="rms")[2] == 0.5


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_atan2_step_at_t1_moves_each_element_by_lr_a_atan_1_over_b(dtype):
    # t = 1 with bias correction: m_hat = g, v_hat = g^2 for any betas, so the update is
    # a * atan2(g, b |g|) = a * atan(1 / b) * sign(g), whatever the magnitude of g.
    rng = np.random.default_rng(4)
    g = (rng.normal(size=6) * 10.0 ** rng.integers(-5, 5, size=6)).astype(dtype)
    p = rng.normal(size=6).astype(dtype)
    hp = AdamHyperParams(lr=0.01)
    new_p, new_s, factor = clipped_adam_step(
        p, g, init_state(p), hp, update_clip="atan2", atan2_a=1.27, atan2_b=2.0
    )
    assert factor is None and new_p.dtype == dtype and new_s.step == 1
    expected = p.astype(np.float64) - 0.01 * 1.27 * math.atan(0.5) * np.sign(g)
    tol = 1e-15 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(new_p, expected, rtol=tol, atol=tol)


def test_atan2_needs_no_eps_zero_gradient_and_state_do_not_move():
    p = np.array([1.0, -3.0, 0.5])
    hp = AdamHyperParams(eps=0.0)
    new_p, _, _ = clipped_adam_step(p, np.zeros(3), init_state(p), hp, update_clip="atan2")
    assert _same(new_p, p)


def test_atan2_bounds_the_update_when_v_is_zero_and_applies_decoupled_decay():
    # Momentum m_old = 5 with v_old = 0 and g = 0 (no bias correction): m = 0.9 * 5, v = 0,
    # atan2(4.5, 0) = pi/2 -> update a * pi/2; decoupled decay first: p (1 - lr lambda).
    p = np.array([2.0])
    hp = AdamHyperParams(
        lr=0.1, weight_decay=0.1, decoupled_weight_decay=True, bias_correction=False, eps=0.0
    )
    state = AdamState(7, np.array([5.0]), np.zeros(1), None)
    new_p, _, _ = clipped_adam_step(p, np.zeros(1), state, hp, update_clip="atan2", atan2_a=1.0)
    np.testing.assert_allclose(new_p, 2.0 * (1 - 0.01) - 0.1 * math.pi / 2, rtol=1e-15)


def test_unknown_update_clip_is_rejected():
    p = np.zeros(2)
    with pytest.raises(ValueError, match="Invalid update_clip: 'max'"):
        clipped_adam_step(p, p, init_state(p), AdamHyperParams(), update_clip="max")


@pytest.mark.parametrize("clip", [None, "rms", "atan2"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_in_place_twin_matches_the_pure_step_and_leaves_grads_alone(clip, amsgrad):
    rng = np.random.default_rng(8)
    shapes = [(3, 2), (), (5,)]
    params = [np.asarray(rng.normal(size=s), dtype=np.float32) for s in shapes]
    grads = [np.asarray(rng.normal(size=s), dtype=np.float32) for s in shapes]
    grads_before = [g.copy() for g in grads]
    hp = AdamHyperParams(lr=0.05, weight_decay=0.01, amsgrad=amsgrad)
    states = [
        AdamState(
            4,
            np.asarray(rng.normal(size=s), dtype=np.float32),
            np.asarray(rng.random(size=s) * 1e-3, dtype=np.float32),
            np.asarray(rng.random(size=s) * 1e-3, dtype=np.float32) if amsgrad else None,
        )
        for s in shapes
    ]
    halved = AdamHyperParams(lr=0.025, weight_decay=0.01, amsgrad=amsgrad)
    expected = [
        clipped_adam_step(p, g * np.float32(0.5), s, halved, update_clip=clip)
        for p, g, s in zip(params, grads, states, strict=True)
    ]
    ms = [s.exp_avg.copy() for s in states]
    vs = [s.exp_avg_sq.copy() for s in states]
    vmaxs = [None if s.max_exp_avg_sq is None else s.max_exp_avg_sq.copy() for s in states]
    factors = clipped_adam_update_(
        params, grads, ms, vs, vmaxs, [5, 5, 5], hp, grad_scale=0.5, lr_scale=0.5, update_clip=clip
    )
    for i, (new_p, new_s, _) in enumerate(expected):
        assert _same(params[i], new_p) and _same(ms[i], new_s.exp_avg)
        assert _same(vs[i], new_s.exp_avg_sq)
        if amsgrad:
            assert _same(vmaxs[i], new_s.max_exp_avg_sq)
        assert _same(grads[i], grads_before[i])
    assert factors == ([e[2] for e in expected] if clip == "rms" else [])
    if clip == "rms":
        assert min(factors) < 1.0  # v is far below g^2 here, so the rule did act


# -- which v_hat the RMS rule reads, and the "all" preset's threshold --------------------------


def test_rms_reads_v_hat_after_this_steps_update_as_in_the_paper():
    # Wortsman et al. 2023 (StableAdamW): u_t is updated with g_t^2 *before* RMS_t is taken.
    # beta2 = 1/2, bias correction, g_1 = 1 then g_2 = 3 on every element:
    #   v_1 = 1/2, v_2 = 1/2 * 1/2 + 1/2 * 9 = 19/4, 1 - beta2^2 = 3/4, v_hat_2 = 19/3,
    #   RMS = sqrt(9 / (19/3)) = sqrt(27/19) ~ 1.19   (with v_hat_1 = 1 it would be 3).
    hp = AdamHyperParams(lr=0.1, beta1=0.0, beta2=0.5, eps=0.0)
    p = np.zeros(4)
    _, state = adam_step(p, np.ones(4), init_state(p), hp)
    g = np.full(4, 3.0)
    rms = math.sqrt(27 / 19)
    for threshold, expected in [(1.0, 1 / rms), (1.1, 1.1 / rms), (1.2, 1.0), (2.0, 1.0)]:
        _, _, factor = clipped_adam_step(
            p, g, state, hp, update_clip="rms", rms_threshold=threshold
        )
        assert math.isclose(factor, expected, rel_tol=1e-14), threshold


def test_rms_after_the_update_is_bounded_by_one_over_the_weight_of_the_new_gradient():
    # v = beta2 v_old + (1 - beta2) g^2 >= (1 - beta2) g^2, so g^2 / v_hat <= bc2 / (1 - beta2)
    # on every element: a 1e6-fold spike after tiny gradients gives RMS = sqrt(1 / (1 - beta2))
    # up to the negligible beta2 v_old (no bias correction: bc2 = 1).
    hp = AdamHyperParams(beta1=0.0, beta2=0.96, eps=0.0, bias_correction=False)
    p = np.zeros(3)
    state = AdamState(10, np.zeros(3), np.full(3, 1e-12), None)
    _, _, factor = clipped_adam_step(p, np.full(3, 1e6), state, hp, update_clip="rms")
    assert math.isclose(factor, math.sqrt(1 - 0.96), rel_tol=1e-12)  # 1 / RMS = sqrt(0.04)


def _rms_of_growing_gradients(c: float, t: int, beta2: float) -> float:
    # g_k = c^k (same on every element): v_t = (1 - beta2) sum_k beta2^(t-k) c^(2k), a
    # geometric sum with ratio c^2 / beta2; v_hat_t = v_t / (1 - beta2^t).
    q = c * c / beta2
    v = (1 - beta2) * beta2**t * q * (q**t - 1) / (q - 1)
    return math.sqrt(c ** (2 * t) / (v / (1 - beta2**t)))


@pytest.mark.parametrize("growth", [1.0, 1.02])
def test_all_preset_threshold_lets_ordinary_gradient_growth_through(growth):
    # Early training: the gradient scale grows (here 2% per step, 1.02^80 ~ 4.9x in 80 steps).
    # With beta2 = 0.999 the bias-corrected v_hat is nearly the plain mean of the past g^2, so
    # RMS > 1 most of the time and the paper's threshold 1 slows every step; the "all" preset's
    # threshold (2: a 4-fold underestimate of the mean square) leaves all 80 steps alone.
    from adamkit.guard import GuardConfig

    threshold = GuardConfig.all().rms_threshold
    hp = AdamHyperParams(lr=1e-3)  # torch's defaults: beta2 = 0.999, eps = 1e-8
    p = np.zeros(5)
    state = init_state(p)
    clipped_at_one = 0
    for t in range(1, 81):
        g = np.full(5, growth**t)
        _, _, f1 = clipped_adam_step(p, g, state, hp, update_clip="rms", rms_threshold=1.0)
        p, state, factor = clipped_adam_step(
            p, g, state, hp, update_clip="rms", rms_threshold=threshold
        )
        rms = _rms_of_growing_gradients(growth, t, 0.999)
        assert math.isclose(f1, min(1.0, 1.0 / rms), rel_tol=1e-9), t
        assert factor == 1.0, (t, rms)
        clipped_at_one += f1 < 1.0 - 1e-9
    if growth == 1.0:
        assert clipped_at_one == 0  # constant gradients: RMS = 1 exactly, up to rounding
    else:
        assert clipped_at_one == 79  # RMS > 1 from the second step on
        assert 1.5 < _rms_of_growing_gradients(growth, 80, 0.999) < threshold


def test_all_preset_threshold_still_clips_a_tenfold_spike():
    # 50 steps of g = 1 (beta2 = 0.999, bias correction: v_hat_50 = 1), then g = 10:
    #   v_51 = 0.999 (1 - 0.999^50) + 0.001 * 100,  v_hat = v_51 / (1 - 0.999^51),
    #   RMS = 10 / sqrt(v_hat) ~ 5.78  ->  factor = threshold / RMS ~ 0.35 at threshold 2.
    from adamkit.guard import GuardConfig

    threshold = GuardConfig.all().rms_threshold
    b = 0.999
    v_hat = (b * (1 - b**50) + (1 - b) * 100.0) / (1 - b**51)
    rms = 10.0 / math.sqrt(v_hat)
    assert 5.7 < rms < 5.9
    hp = AdamHyperParams(lr=1e-3)
    p = np.zeros(3)
    state = init_state(p)
    for _ in range(50):
        p, state, factor = clipped_adam_step(
            p, np.ones(3), state, hp, update_clip="rms", rms_threshold=threshold
        )
        assert factor == 1.0 or math.isclose(factor, 1.0, rel_tol=1e-12)
    _, _, factor = clipped_adam_step(
        p, np.full(3, 10.0), state, hp, update_clip="rms", rms_threshold=threshold
    )
    assert math.isclose(factor, threshold / rms, rel_tol=1e-12)


def test_rms_with_maximize_and_coupled_l2_squares_the_gradient_that_entered_v():
    # maximize: v sees (-g + lambda p); with g = 1, p = 1, lambda = 1 that is 0 on every element,
    # so v stays 0 and RMS = 0 (nothing clipped).  Squaring (g + lambda p) = 2 instead would
    # give 4 / eps^2 and clip the step to nothing.
    hp = AdamHyperParams(
        lr=0.1,
        beta1=0.0,
        beta2=0.75,
        eps=1e-8,
        weight_decay=1.0,
        maximize=True,
        bias_correction=False,
    )
    p = np.ones(3)
    new_p, new_s, factor = clipped_adam_step(p, np.ones(3), _state(3, 1), hp, update_clip="rms")
    assert factor == 1.0
    np.testing.assert_array_equal(new_s.exp_avg_sq, np.zeros(3))
    np.testing.assert_array_equal(new_p, p)  # m = 0 too: the step does not move
