"""guarded_adam_step on arrays: skips change nothing, off == plain Adam, exact rollback/resume."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step, init_state
from adamkit.guard import Guard, GuardConfig, GuardWarning, Snapshot, global_grad_norm
from adamkit.guard import guarded_adam_step as step

SHAPES = [(4, 3), (), (5,), (0,)]


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _same_states(s1, s2):
    return (
        s1.step == s2.step
        and _same(s1.exp_avg, s2.exp_avg)
        and _same(s1.exp_avg_sq, s2.exp_avg_sq)
        and ((s1.max_exp_avg_sq is None) == (s2.max_exp_avg_sq is None))
        and (s1.max_exp_avg_sq is None or _same(s1.max_exp_avg_sq, s2.max_exp_avg_sq))
    )


def _problem(seed, dtype=np.float64, amsgrad=False):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.normal(size=s), dtype=dtype) for s in SHAPES]
    states = [init_state(p, amsgrad=amsgrad) for p in params]
    return rng, params, states


def _grads(rng, params, scale=1.0):
    return [np.asarray(scale * rng.normal(size=p.shape), dtype=p.dtype) for p in params]


def test_global_grad_norm_matches_the_norm_of_the_concatenation():
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=s).astype(np.float32) for s in [(3, 4), (7,)]]
    flat = np.concatenate([g.ravel().astype(np.float64) for g in grads])
    assert math.isclose(global_grad_norm([*grads, None]), np.linalg.norm(flat), rel_tol=1e-14)
    assert global_grad_norm([]) == 0.0 and global_grad_norm([np.zeros(0)]) == 0.0
    assert math.isnan(global_grad_norm([np.ones(2), np.array([1.0, np.nan])]))
    assert global_grad_norm([np.array([-np.inf, 1.0])]) == math.inf
    assert global_grad_norm([np.array([1e200, 1e200])]) == math.inf  # overflow counts as non-finite


# -- non-finite skip -------------------------------------------------------------------------

NONFINITE_CASES = [
    # (step at which the bad gradient comes, tensor index, flat element, value)
    (0, 0, 5, np.nan),
    (3, 0, 0, np.inf),
    (3, 2, 4, -np.inf),
    (2, 1, 0, np.nan),  # the 0-d tensor
]


@pytest.mark.parametrize(("at", "which", "elem", "value"), NONFINITE_CASES)
@pytest.mark.parametrize("config", ["default", "all"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_non_finite_gradient_anywhere_changes_nothing_and_is_counted(
    at, which, elem, value, config, dtype
):
    rng, params, states = _problem(1, dtype, amsgrad=config == "all")
    guard = Guard(config)
    hp = AdamHyperParams(lr=1e-2, amsgrad=config == "all")
    snapshot = None
    for _ in range(at):
        params, states, snapshot, _, _ = step(
            params, _grads(rng, params), states, hp, guard, loss=1.0, snapshot=snapshot
        )
    grads = _grads(rng, params)
    grads[which].reshape(-1)[elem] = value
    grads_before = [g.copy() for g in grads]
    kept_params, kept_states = Snapshot.take(params, states)
    with pytest.warns(GuardWarning, match="non-finite gradients"):
        result = step(params, grads, states, hp, guard, loss=1.0, snapshot=snapshot)
    assert result.plan.action == "skip_nonfinite"
    for p_new, p_old in zip(result.params, kept_params, strict=True):
        assert _same(p_new, p_old)
    for s_new, s_old in zip(result.states, kept_states, strict=True):
        assert _same_states(s_new, s_old)
    for g, g0 in zip(grads, grads_before, strict=True):
        assert _same(g, g0)  # the caller's gradients are never written
    d = result.diagnostics
    assert d["n_skipped_nonfinite"] == 1 and d["n_applied"] == at and d["skipped"]
    assert not math.isfinite(d["grad_norm"])


# -- guard off / defaults == plain Adam ------------------------------------------------------

HPS = [
    AdamHyperParams(),
    AdamHyperParams(lr=0.05, weight_decay=0.1),
    AdamHyperParams(lr=0.02, weight_decay=0.01, decoupled_weight_decay=True, amsgrad=True),
    AdamHyperParams(lr=0.01, maximize=True, bias_correction=False),
]


@pytest.mark.parametrize("config", [GuardConfig(skip_nonfinite=False), GuardConfig()])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("hp_index", range(len(HPS)))
def test_guard_with_nothing_to_do_is_bit_identical_to_plain_adam(config, dtype, hp_index):
    hp = HPS[hp_index]
    rng, params, states = _problem(2, dtype, amsgrad=hp.amsgrad)
    ref_params, ref_states = list(params), list(states)
    guard = Guard(config)
    for i in range(6):
        grads = _grads(rng, params, scale=10.0 ** (i - 3))
        if i == 2:
            grads[0] = None  # a parameter without a gradient this step
        params, states, _, plan, _ = step(params, grads, states, hp, guard)
        assert plan.action == "apply"
        for k, g in enumerate(grads):
            if g is not None:
                ref_params[k], ref_states[k] = adam_step(ref_params[k], g, ref_states[k], hp)
        for k in range(len(params)):
            assert _same(params[k], ref_params[k]) and _same_states(states[k], ref_states[k])


def test_one_hyper_parameter_set_per_parameter_acts_like_groups():
    rng, params, states = _problem(3)
    hps = [HPS[0], HPS[1], HPS[1], HPS[3]]
    grads = _grads(rng, params)
    new_params, new_states, *_ = step(params, grads, states, hps, Guard())
    for k in range(len(params)):
        ref_p, ref_s = adam_step(params[k], grads[k], states[k], hps[k])
        assert _same(new_params[k], ref_p) and _same_states(new_states[k], ref_s)
    with pytest.raises(ValueError, match="must match one to one"):
        step(params, grads, states, hps[:2], Guard())


# -- gradient-spike clipping and diagnostics through the step ---------------------------------


def test_a_gradient_spike_is_applied_as_a_scaled_gradient():
    # Norms 1,1,1,1 then 100: clipped to the mean 1, i.e. gradient * 0.01 (see test_guard_spikes).
    guard = Guard(GuardConfig(grad_spike=True, grad_warmup=4))
    p = [np.array([0.5, -0.25])]
    s = [init_state(p[0])]
    hp = AdamHyperParams(lr=0.1)
    for _ in range(4):
        p, s, *_ = step(p, [np.array([0.6, 0.8])], s, hp, guard)  # norm exactly 1
    spike = np.array([60.0, 80.0])  # norm 100
    new_p, new_s, _, plan, d = step(p, [spike], s, hp, guard)
    assert plan.grad_scale == 0.01 and d["grad_clipped"] and d["grad_norm"] == 100.0
    ref_p, ref_s = adam_step(p[0], spike * 0.01, s[0], hp)
    assert _same(new_p[0], ref_p) and _same_states(new_s[0], ref_s)
    assert _same(spike, np.array([60.0, 80.0]))


def test_update_norm_and_ratio_are_measured_on_the_real_update():
    rng, params, states = _problem(4)
    guard = Guard(GuardConfig(track_update_norm=True, update_clip="rms"))
    grads = _grads(rng, params)
    new_params, *_, d = step(params, grads, states, AdamHyperParams(lr=0.1), guard)
    delta = np.concatenate([(a - b).ravel() for a, b in zip(new_params, params, strict=True)])
    norm = np.linalg.norm(np.concatenate([p.ravel() for p in params]))
    assert math.isclose(d["update_norm"], np.linalg.norm(delta), rel_tol=1e-12)
    assert math.isclose(d["update_ratio"], np.linalg.norm(delta) / norm, rel_tol=1e-12)
    assert d["update_scale_min"] is not None and d["update_scale_min"] <= 1.0


# -- loss spikes, rollback, resume -----------------------------------------------------------

ROLLBACK_CFG = GuardConfig(
    loss_spike=True,
    loss_warmup=3,
    loss_patience=2,
    snapshot_interval=3,
    lr_factor=0.5,
    lr_cooldown=2,
)


def test_loss_spikes_skip_then_roll_back_exactly_then_lower_the_lr():
    rng, params, states = _problem(5, np.float32)
    hp = AdamHyperParams(lr=0.01)
    guard = Guard(ROLLBACK_CFG)
    snapshot = None
    copies = []  # independent copies of the state at each step that asked for a snapshot
    for i in range(5):
        grads = _grads(rng, params)
        before = Snapshot.take(params, states)
        params, states, snapshot, plan, _ = step(
            params, grads, states, hp, guard, loss=1.0 + 0.01 * i, snapshot=snapshot
        )
        assert plan.action == "apply"
        if plan.take_snapshot:
            copies.append(before)
    assert len(copies) == 2  # steps 0 and 3
    assert snapshot.nbytes == 3 * sum(p.nbytes for p in params)

    spiked = step(params, _grads(rng, params), states, hp, guard, loss=80.0, snapshot=snapshot)
    assert spiked.plan.action == "skip_loss_spike"
    assert all(_same(a, b) for a, b in zip(spiked.params, params, strict=True))
    rolled = step(params, _grads(rng, params), states, hp, guard, loss=80.0, snapshot=snapshot)
    assert rolled.plan.action == "rollback" and rolled.diagnostics["n_rollbacks"] == 1
    target_params, target_states = copies[-1]
    for p, q in zip(rolled.params, target_params, strict=True):
        assert _same(p, q)
    for s, t in zip(rolled.states, target_states, strict=True):
        assert _same_states(s, t)  # step counts roll back too
    assert rolled.params[0] is not snapshot.params[0]  # the snapshot stays reusable

    params, states = rolled.params, rolled.states
    for expected_lr in (0.005, 0.005, 0.01):
        grads = _grads(rng, params)
        refs = [
            adam_step(p, g, s, AdamHyperParams(lr=expected_lr))
            for p, g, s in zip(params, grads, states, strict=True)
        ]
        params, states, snapshot, plan, _ = step(
            params, grads, states, hp, guard, loss=1.0, snapshot=snapshot
        )
        for p, s, (rp, rs) in zip(params, states, refs, strict=True):
            assert _same(p, rp) and _same_states(s, rs)


def test_a_missing_snapshot_is_refused_before_anything_changes():
    rng, params, states = _problem(6)
    guard = Guard(ROLLBACK_CFG)
    step(params, _grads(rng, params), states, AdamHyperParams(), guard, loss=1.0)
    assert guard.has_snapshot
    before = guard.state_dict()
    with pytest.raises(ValueError, match="snapshot=None"):
        step(params, _grads(rng, params), states, AdamHyperParams(), guard, loss=1.0)
    assert guard.state_dict() == before


def _save(params, states, snapshot, guard):
    """A checkpoint as plain data: arrays copied, guard state through JSON."""
    return {
        "params": [p.copy() for p in params],
        "states": list(Snapshot.take(params, states).states),
        "snapshot": None if snapshot is None else Snapshot.take(*snapshot.restore()),
        "guard": json.loads(json.dumps(guard.state_dict())),
    }


@pytest.mark.parametrize("cut", [6, 9, 12])
def test_resume_mid_run_after_a_rollback_is_exact(cut):
    cfg = GuardConfig.all(
        loss_warmup=3, grad_warmup=3, loss_patience=2, snapshot_interval=3, lr_cooldown=3
    )
    hp = AdamHyperParams(lr=0.05, amsgrad=True)
    rng = np.random.default_rng(9)
    n = 18
    losses = list(1.0 + 0.05 * rng.normal(size=n))
    losses[7] = losses[8] = 40.0  # spike then rollback at step 8
    grad_seq = [
        [np.asarray(rng.normal(size=s), dtype=np.float32) for s in SHAPES] for _ in range(n)
    ]
    grad_seq[4][0] *= 1e3  # a gradient spike
    grad_seq[10][2][0] = np.nan  # a non-finite step

    def run(start, stop, params, states, snapshot, guard, record):
        for i in range(start, stop):
            params, states, snapshot, plan, d = step(
                params, grad_seq[i], states, hp, guard, loss=losses[i], snapshot=snapshot
            )
            record.append((plan, repr(d)))
        return params, states, snapshot

    _, params0, _ = _problem(10, np.float32)
    states0 = [init_state(p, amsgrad=True) for p in params0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GuardWarning)
        straight: list = []
        final = run(0, n, params0, states0, None, Guard(cfg), straight)
        first: list = []
        guard = Guard(cfg)
        mid = run(0, cut, params0, states0, None, guard, first)
        ckpt = _save(*mid, guard)
        resumed_guard = Guard(cfg)
        resumed_guard.load_state_dict(ckpt["guard"])
        second: list = []
        resumed = run(
            cut, n, ckpt["params"], ckpt["states"], ckpt["snapshot"], resumed_guard, second
        )
    assert first + second == straight
    actions = {p.action for p, _ in straight}
    assert actions == {"apply", "skip_loss_spike", "rollback", "skip_nonfinite"}
    for p, q in zip(final[0], resumed[0], strict=True):
        assert _same(p, q)
    for s, t in zip(final[1], resumed[1], strict=True):
        assert _same_states(s, t)


def test_snapshot_copies_are_independent_of_the_live_arrays():
    p = np.ones(3)
    s = AdamState(2, np.ones(3), np.ones(3), None)
    snap = Snapshot.take([p], [s])
    p += 1.0
    s.exp_avg[:] = 7.0
    assert _same(snap.params[0], np.ones(3)) and _same(snap.states[0].exp_avg, np.ones(3))
