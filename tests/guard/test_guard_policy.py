"""Guard: the per-step plan from scalars, counters, diagnostics, warnings and state_dict."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from adamkit.guard import Guard, GuardConfig, GuardWarning


def test_default_guard_applies_finite_steps_unchanged():
    guard = Guard()
    plan = guard.plan_step(grad_norm=3.0)
    assert plan.action == "apply" and plan.apply
    assert (plan.grad_scale, plan.lr_scale) == (1.0, 1.0)
    assert not (plan.take_snapshot or plan.restore_snapshot) and plan.update_clip is None
    d = guard.diagnostics
    assert d["grad_norm"] == 3.0 and d["applied"] and d["n_applied"] == 1 and d["n_steps"] == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, np.float32("nan"), np.array(np.inf)])
def test_non_finite_norm_skips_counts_and_warns_once(bad):
    guard = Guard()
    with pytest.warns(GuardWarning, match="non-finite gradients"):
        plan = guard.plan_step(grad_norm=bad)
    assert plan.action == "skip_nonfinite" and not plan.apply
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.plan_step(grad_norm=bad)
        guard.plan_step(grad_norm=1.0)
    d = guard.diagnostics
    assert d["n_skipped_nonfinite"] == 2 and d["n_applied"] == 1 and d["n_steps"] == 3


def test_warning_points_at_the_caller_by_default():
    with pytest.warns(GuardWarning) as record:
        Guard().plan_step(grad_norm=math.nan)
    assert record[0].filename == __file__


def test_a_needed_norm_must_be_given_and_errors_leave_the_guard_unchanged():
    guard = Guard()
    before = guard.state_dict()
    with pytest.raises(ValueError, match="grad_norm is required"):
        guard.plan_step()
    with pytest.raises(TypeError, match="loss must be a real number"):
        guard.plan_step(loss="high", grad_norm=1.0)
    assert guard.state_dict() == before


def test_everything_off_always_applies_with_unit_scales():
    guard = Guard(GuardConfig(skip_nonfinite=False))
    for norm in (None, 1.0, math.nan, math.inf, 1e30):
        plan = guard.plan_step(grad_norm=norm, loss=math.nan)
        assert plan.apply and (plan.grad_scale, plan.lr_scale) == (1.0, 1.0)
    assert guard.diagnostics["n_applied"] == 5


def test_a_lazy_norm_is_not_computed_on_a_step_skipped_for_its_loss():
    calls = []

    def norm():
        calls.append(1)
        return 1.0

    guard = Guard(GuardConfig(loss_spike=True, loss_warmup=2, loss_patience=5))
    for loss in (1.0, 1.1):
        guard.plan_step(loss=loss, grad_norm=norm)
    assert len(calls) == 2
    plan = guard.plan_step(loss=math.inf, grad_norm=norm)
    assert plan.action == "skip_loss_spike" and len(calls) == 2
    assert guard.diagnostics["grad_norm"] is None and guard.diagnostics["loss_spike"]


def test_grad_spike_scale_reaches_the_plan():
    guard = Guard(GuardConfig(grad_spike=True, grad_warmup=4))
    for _ in range(4):
        assert guard.plan_step(grad_norm=2.0).grad_scale == 1.0
    plan = guard.plan_step(grad_norm=50.0)  # constant 2.0 -> std 0 -> clipped to 2.0
    assert plan.apply and plan.grad_scale == 2.0 / 50.0
    d = guard.diagnostics
    assert d["grad_clipped"] and d["grad_scale"] == 0.04 and d["n_grad_clipped"] == 1


def test_a_non_finite_norm_is_not_fed_to_the_spike_statistics():
    guard = Guard(GuardConfig(grad_spike=True, grad_warmup=2))
    with pytest.warns(GuardWarning):
        guard.plan_step(grad_norm=math.nan)
    assert guard.grad_clipper.stats.count == 0


def test_rollback_plan_then_lowered_lr_then_restored():
    cfg = GuardConfig(
        loss_spike=True,
        loss_warmup=2,
        loss_patience=2,
        snapshot_interval=3,
        lr_factor=0.1,
        lr_cooldown=2,
    )
    guard = Guard(cfg)
    first = guard.plan_step(loss=1.0, grad_norm=1.0)
    assert first.take_snapshot and guard.has_snapshot
    guard.plan_step(loss=1.0, grad_norm=1.0)
    assert guard.plan_step(loss=30.0, grad_norm=1.0).action == "skip_loss_spike"
    plan = guard.plan_step(loss=30.0, grad_norm=1.0)
    assert plan.action == "rollback" and plan.restore_snapshot and not plan.apply
    d = guard.diagnostics
    assert d["rolled_back"] and d["n_rollbacks"] == 1 and d["n_loss_spikes"] == 2
    scales = [guard.plan_step(loss=1.0, grad_norm=1.0).lr_scale for _ in range(3)]
    assert scales == [0.1, 0.1, 1.0]


def test_a_due_snapshot_waits_for_a_step_with_finite_gradients():
    guard = Guard(GuardConfig(loss_spike=True, snapshot_interval=1))
    with pytest.warns(GuardWarning):
        plan = guard.plan_step(loss=1.0, grad_norm=math.nan)
    assert not plan.take_snapshot and not guard.has_snapshot
    assert guard.plan_step(loss=1.0, grad_norm=1.0).take_snapshot


def test_record_update_fills_norms_ratio_and_update_clip_counter():
    guard = Guard(GuardConfig(update_clip="rms"))
    guard.plan_step(grad_norm=1.0)
    d = guard.record_update(update_norm=0.5, param_norm=4.0, update_scales=[1.0, 0.25, 1.0])
    assert d["update_ratio"] == 0.125 and d["update_scale_min"] == 0.25
    assert d["update_clipped"] and d["n_update_clipped"] == 1
    guard.plan_step(grad_norm=1.0)
    d = guard.record_update(update_norm=0.0, param_norm=0.0, update_scales=[1.0])
    assert d["update_ratio"] == 0.0 and not d["update_clipped"] and d["n_update_clipped"] == 1


def test_diagnostics_have_the_same_keys_whatever_happened():
    guard = Guard(GuardConfig.all(loss_warmup=2, loss_patience=1, snapshot_interval=1))
    keys = set()
    for loss, norm in ((1.0, 1.0), (1.0, math.nan), (1.0, 1.0), (99.0, 1.0), (1.0, 1.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GuardWarning)
            guard.plan_step(loss=loss, grad_norm=norm)
        d = guard.diagnostics
        keys.add(frozenset(d))
        assert all(v is None or isinstance(v, (bool, int, float, str)) for v in d.values())
    assert len(keys) == 1
    assert guard.diagnostics["n_rollbacks"] == 1 and guard.diagnostics["n_skipped_nonfinite"] == 1


def test_guard_refuses_to_be_built_disabled():
    with pytest.raises(ValueError, match="would be disabled"):
        Guard(False)
    assert Guard("all").config == GuardConfig.all()


def _run(guard, steps):
    plans = []
    for loss, norm in steps:
        plan = guard.plan_step(loss=loss, grad_norm=norm)
        if plan.apply:
            guard.record_update(update_norm=0.1 * norm, param_norm=10.0, update_scales=[0.9])
        plans.append((plan, guard.diagnostics))
    return plans


@pytest.mark.filterwarnings("ignore::adamkit.guard.GuardWarning")
def test_state_dict_round_trips_through_json_and_resume_is_exact():
    rng = np.random.default_rng(21)
    n = 120
    losses = list(2.0 + 0.1 * rng.normal(size=n))
    norms = list(rng.lognormal(size=n))
    for i in (40, 41, 42, 90):
        losses[i] = 50.0
    for i in (30, 70, 71):
        norms[i] *= 100.0
    norms[50] = math.nan
    steps = list(zip(losses, norms, strict=True))
    cfg = GuardConfig.all(loss_warmup=5, grad_warmup=5, snapshot_interval=7, lr_cooldown=9)

    straight = _run(Guard(cfg), steps)
    first = Guard(cfg)
    _run(first, steps[:41])
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = Guard(cfg)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == first.state_dict()
    rest = _run(resumed, steps[41:])
    for (p1, d1), (p2, d2) in zip(straight[41:], rest, strict=True):
        assert p1 == p2
        assert repr(d1) == repr(d2)
    actions = {p.action for p, _ in straight}
    assert actions == {"apply", "skip_nonfinite", "skip_loss_spike", "rollback"}


def test_loading_keeps_the_live_config_and_starts_new_components_fresh():
    old = Guard(GuardConfig(grad_spike=True, grad_warmup=2))
    for x in (1.0, 2.0, 3.0):
        old.plan_step(grad_norm=x)
    new = Guard(GuardConfig(loss_spike=True))
    new.load_state_dict(old.state_dict())
    assert new.grad_clipper is None and new.loss_detector.stats.count == 0
    assert new.diagnostics["n_applied"] == 3
    back = Guard(GuardConfig(grad_spike=True, grad_warmup=2))
    back.load_state_dict(new.state_dict())  # saved without a clipper -> fresh clipper
    assert back.grad_clipper.stats.count == 0


@pytest.mark.parametrize(
    ("patch", "exc", "match"),
    [
        ({"format": "torch"}, ValueError, "guard state format must be 'adamkit.guard'"),
        ({"version": 2}, ValueError, "guard state version 2 is not supported"),
        ({"counters": {"n_steps": 1}}, ValueError, "counters has missing keys"),
        ({"grad_clipper": {"stats": {"count": -1, "weight": 1.0, "mean": 0.0, "m2": 0.0}}},
         ValueError, r"grad_clipper\.stats\.count must be an integer >= 0"),
        ({"loss_detector": []}, TypeError, "loss_detector must be a dict"),
    ],
)  # fmt: skip
def test_load_state_dict_rejects_bad_state_and_changes_nothing(patch, exc, match):
    guard = Guard(GuardConfig.all(loss_warmup=2, grad_warmup=2))
    for x in (1.0, 1.5, 1.2):
        guard.plan_step(loss=x, grad_norm=x)
    before = guard.state_dict()
    with pytest.raises(exc, match=match):
        guard.load_state_dict({**before, **patch})
    assert guard.state_dict() == before
    bad_counters = {**before["counters"], "n_applied": -2}
    with pytest.raises(ValueError, match=r"counters\.n_applied must be an integer >= 0"):
        guard.load_state_dict({**before, "counters": bad_counters})
    assert guard.state_dict() == before


def test_a_bad_norm_value_is_rejected_before_the_loss_is_judged():
    guard = Guard(GuardConfig(loss_spike=True))
    before = guard.state_dict()
    with pytest.raises(TypeError, match="grad_norm must be a real number"):
        guard.plan_step(loss=1.0, grad_norm="1.0")
    assert guard.state_dict() == before
    with pytest.raises(ValueError, match=r"Invalid grad_norm: -1\.0"):
        guard.plan_step(loss=1.0, grad_norm=-1.0)
    assert guard.state_dict() == before
