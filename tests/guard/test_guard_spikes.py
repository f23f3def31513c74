"""Gradient-spike clipping and loss-spike detection on constructed streams worked out by hand.

Expected values come from the definition of the weighted statistics (weights alpha**(n-i),
normalised), evaluated with exact fractions in the comments, never from the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from adamkit.guard import GradSpikeClipper, LossSpikeDetector

SQRT2 = math.sqrt(2.0)


# -- gradient-spike clipping -----------------------------------------------------------------


def test_warmup_never_clips_even_huge_norms():
    clipper = GradSpikeClipper(warmup=5)
    for norm in (1.0, 1e6, 1.0, 1e9, 1.0):
        decision = clipper.observe(norm)
        assert decision.scale == 1.0 and not decision.clipped and math.isnan(decision.z)


def test_constant_norms_then_a_spike_is_clipped_to_the_mean():
    # 1, 1, 1, 1: mean 1, std 0 exactly; 100 has z = 99 / 1e-6 > 2.5 -> clipped to 1 + 2.5 * 0.
    clipper = GradSpikeClipper(warmup=4, z_thresh=2.5, eps=1e-6)
    for _ in range(4):
        assert clipper.observe(1.0).scale == 1.0
    decision = clipper.observe(100.0)
    assert decision.clipped and decision.threshold == 1.0 and decision.scale == 0.01
    assert math.isclose(decision.z, 99.0 / 1e-6, rel_tol=1e-12)


def test_alternating_norms_then_a_spike_threshold_mode():
    # alpha = 1/2, norms 1, 3, 1, 3 -> weights 1/8, 1/4, 1/2, 1 (sum 15/8):
    #   mean = (1/8 + 3/4 + 1/2 + 3) / (15/8) = 7/3,  E[x^2] = (1/8 + 9/4 + 1/2 + 9) / (15/8) = 19/3
    #   var = 19/3 - 49/9 = 8/9,  std = 2 sqrt(2) / 3
    # 100: z = (100 - 7/3) / std = 293 / (2 sqrt 2) > 2
    #   -> clipped to 7/3 + 2 std = (7 + 4 sqrt 2) / 3
    clipper = GradSpikeClipper(alpha=0.5, z_thresh=2.0, warmup=4, eps=0.0)
    for norm in (1.0, 3.0, 1.0, 3.0):
        clipper.observe(norm)
    decision = clipper.observe(100.0)
    threshold = (7 + 4 * SQRT2) / 3
    assert decision.clipped
    assert math.isclose(decision.z, 293 / (2 * SQRT2), rel_tol=1e-12)
    assert math.isclose(decision.threshold, threshold, rel_tol=1e-12)
    assert math.isclose(decision.scale, threshold / 100.0, rel_tol=1e-12)

    # The statistics now hold the clipped norm T, not 100.  Weights 1/16 ... 1 (sum 31/16):
    #   mean = (35 + 16 T) / 31,  E[x^2] = (95 + 16 T^2) / 31.
    mean = (35 + 16 * threshold) / 31
    var = (95 + 16 * threshold**2) / 31 - mean**2
    decision = clipper.observe(5.0)
    assert math.isclose(decision.z, (5.0 - mean) / math.sqrt(var), rel_tol=1e-10)
    assert decision.clipped == ((5.0 - mean) / math.sqrt(var) > 2.0)


def test_alternating_norms_then_a_spike_adaptive_mode():
    # ZClip's adaptive scaling: threshold = mean + z_thresh**2 / z * std with the numbers above:
    #   7/3 + 4 / (293 / (2 sqrt 2)) * (2 sqrt 2 / 3) = 7/3 + 32 / 879.
    clipper = GradSpikeClipper(alpha=0.5, z_thresh=2.0, warmup=4, eps=0.0, mode="adaptive")
    for norm in (1.0, 3.0, 1.0, 3.0):
        clipper.observe(norm)
    decision = clipper.observe(100.0)
    assert math.isclose(decision.threshold, 7 / 3 + 32 / 879, rel_tol=1e-12)
    assert math.isclose(decision.scale, (7 / 3 + 32 / 879) / 100, rel_tol=1e-12)


def test_eps_sets_the_smallest_deviation_that_counts_on_a_constant_stream():
    for delta, clipped in ((1e-7, False), (1e-5, True)):  # z = delta / 1e-6 = 0.1 or 10
        clipper = GradSpikeClipper(warmup=3, z_thresh=2.5, eps=1e-6)
        for _ in range(3):
            clipper.observe(1.0)
        assert clipper.observe(1.0 + delta).clipped is clipped


def test_norms_below_the_threshold_are_left_alone():
    clipper = GradSpikeClipper(alpha=0.5, z_thresh=2.0, warmup=4, eps=0.0)
    for norm in (1.0, 3.0, 1.0, 3.0):
        clipper.observe(norm)
    # 7/3 + 2 * 2 sqrt 2 / 3 = 4.218...; 4.2 is just under it.
    decision = clipper.observe(4.2)
    assert not decision.clipped and decision.scale == 1.0 and decision.z < 2.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_clipper_rejects_non_finite_or_negative_norms_unchanged(bad):
    clipper = GradSpikeClipper(warmup=2)
    clipper.observe(1.0)
    before = clipper.state_dict()
    with pytest.raises(ValueError, match="grad norm must be a finite number >= 0"):
        clipper.observe(bad)
    assert clipper.state_dict() == before


def test_clipper_constructor_validates_through_guardconfig():
    with pytest.raises(ValueError, match=r"Invalid grad_z: -1\.0"):
        GradSpikeClipper(z_thresh=-1.0)
    with pytest.raises(ValueError, match="Invalid grad_mode"):
        GradSpikeClipper(mode="percentile")


def test_clipper_resume_gives_identical_decisions():
    rng = np.random.default_rng(11)
    norms = rng.lognormal(size=80)
    norms[[30, 31, 55, 70]] *= 50.0
    a = GradSpikeClipper(alpha=0.9, warmup=10)
    for x in norms[:40]:
        a.observe(x)
    b = GradSpikeClipper(alpha=0.9, warmup=10)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    clipped = 0
    for x in norms[40:]:
        da, db = a.observe(x), b.observe(x)
        assert repr(da) == repr(db)
        clipped += da.clipped
    assert clipped >= 2  # the injected spikes after the resume point were seen


# -- loss-spike detection --------------------------------------------------------------------


def _drive(detector, loss, *, apply_ok=True):
    """Follow the detector's protocol like Guard does: snapshot first, then the update."""
    decision = detector.observe(loss)
    if decision.action in ("ok", "reset") and apply_ok:
        if decision.take_snapshot:
            detector.snapshot_taken()
        detector.update_applied()
    return decision


def test_a_loss_spike_is_detected_skipped_and_kept_out_of_the_statistics():
    # alpha = 1/2, losses 1.0, 1.2, 1.0, 1.2 -> weights 1/8, 1/4, 1/2, 1 (sum 15/8):
    #   mean = 2.125 / 1.875 = 17/15,  E[x^2] = 2.425 / 1.875 = 97/75,  var = 2/225, std = sqrt2/15
    # 10.0: z = (10 - 17/15) / (sqrt2/15) = 133 / sqrt 2 > 3 and 10 > 1.5 * 17/15  -> spike
    det = LossSpikeDetector(alpha=0.5, z_thresh=3.0, margin=0.5, warmup=4, eps=0.0)
    for loss in (1.0, 1.2, 1.0, 1.2):
        assert _drive(det, loss).action == "ok"
    spike = _drive(det, 10.0)
    assert spike.action == "spike"
    assert math.isclose(spike.mean, 17 / 15, rel_tol=1e-13)
    assert math.isclose(spike.std, SQRT2 / 15, rel_tol=1e-10)
    assert math.isclose(spike.z, 133 / SQRT2, rel_tol=1e-10)
    after = _drive(det, 1.1)
    assert after.action == "ok"
    assert math.isclose(after.mean, 17 / 15, rel_tol=1e-13)  # the spike did not enter the mean


def test_margin_ignores_statistically_large_but_relatively_small_rises():
    def detector(margin):
        det = LossSpikeDetector(z_thresh=3.0, margin=margin, warmup=4, eps=1e-8)
        for _ in range(4):
            _drive(det, 1.0)
        return det

    # 1.01 against a constant 1.0: z = 0.01 / 1e-8 = 1e6, but 1.01 < 1.0 + 0.5 * 1.0.
    assert _drive(detector(0.5), 1.01).action == "ok"
    assert _drive(detector(0.5), 1.6).action == "spike"
    assert _drive(detector(0.0), 1.01).action == "spike"


def test_non_finite_losses_are_spikes_even_during_warmup():
    det = LossSpikeDetector(warmup=10, patience=5)
    _drive(det, 1.0)
    for bad in (math.nan, math.inf):
        assert _drive(det, bad).action == "spike"
    assert det.stats.count == 1


def test_repeated_spikes_roll_back_then_lr_is_lowered_for_n_updates_then_restored():
    det = LossSpikeDetector(
        alpha=0.5, warmup=2, patience=3, snapshot_interval=2, lr_factor=0.5, lr_cooldown=3
    )
    snapshots = [_drive(det, 1.0).take_snapshot for _ in range(3)]
    assert snapshots == [True, False, True]  # first validated step, then every 2 updates
    actions = [_drive(det, 100.0).action for _ in range(3)]
    assert actions == ["spike", "spike", "rollback"]
    assert det.lr_scale == 0.5 and det.cooldown_left == 3
    scales = []
    for _ in range(5):
        scales.append(det.lr_scale)  # what the caller reads for this update
        assert _drive(det, 1.0).action == "ok"
    assert scales == [0.5, 0.5, 0.5, 1.0, 1.0]


def test_a_rollback_during_the_cooldown_compounds_the_lr_factor():
    det = LossSpikeDetector(
        warmup=2, patience=2, snapshot_interval=1, lr_factor=0.5, lr_cooldown=10
    )
    for _ in range(3):
        _drive(det, 1.0)
    assert [_drive(det, 50.0).action for _ in range(2)] == ["spike", "rollback"]
    _drive(det, 1.0)  # one update applied at lr * 0.5
    assert [_drive(det, 50.0).action for _ in range(2)] == ["spike", "rollback"]
    assert det.lr_scale == 0.25 and det.cooldown_left == 10


def test_spikes_right_after_a_rollback_reset_the_statistics_instead_of_looping():
    det = LossSpikeDetector(alpha=0.5, warmup=2, patience=2, snapshot_interval=5)
    for _ in range(3):
        _drive(det, 1.0)
    assert [_drive(det, 9.0).action for _ in range(2)] == ["spike", "rollback"]
    again = [_drive(det, 9.0).action for _ in range(2)]
    assert again == ["spike", "reset"]
    # The new level starts a fresh warm-up from the accepted loss, and is snapshotted anew.
    assert det.stats.count == 1 and det.stats.mean == 9.0
    assert det.has_snapshot and det.updates_since_snapshot == 1


def test_without_snapshots_patience_resets_the_statistics_and_accepts():
    det = LossSpikeDetector(alpha=0.5, warmup=2, patience=3)
    for _ in range(3):
        _drive(det, 1.0)
    decisions = [_drive(det, 7.0) for _ in range(3)]
    assert [d.action for d in decisions] == ["spike", "spike", "reset"]
    assert not decisions[-1].take_snapshot
    assert det.stats.count == 1 and det.stats.mean == 7.0


def test_a_non_finite_loss_is_never_accepted_by_a_reset():
    det = LossSpikeDetector(warmup=2, patience=2)
    assert [_drive(det, math.nan).action for _ in range(4)] == ["spike"] * 4


def test_detector_resume_gives_identical_decisions():
    rng = np.random.default_rng(5)
    losses = 2.0 + 0.05 * rng.normal(size=90)
    losses[[25, 26, 27, 28, 60, 75]] = [40.0, 41.0, 39.0, 42.0, math.nan, 30.0]
    kwargs = dict(warmup=5, patience=3, snapshot_interval=4, lr_factor=0.5, lr_cooldown=6)
    a = LossSpikeDetector(**kwargs)
    for x in losses[:27]:
        _drive(a, x)
    b = LossSpikeDetector(**kwargs)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    seen = set()
    for x in losses[27:]:
        da, db = _drive(a, x), _drive(b, x)
        assert repr(da) == repr(db) and a.lr_scale == b.lr_scale
        seen.add(da.action)
    assert {"rollback", "spike", "ok"} <= seen


@pytest.mark.parametrize(
    ("patch", "exc", "match"),
    [
        ({"lr_scale": 2.0}, ValueError, r"loss_detector\.lr_scale must be in \[0, 1\]"),
        ({"has_snapshot": 1}, TypeError, r"loss_detector\.has_snapshot must be True or False"),
        ({"consecutive": -1}, ValueError, r"loss_detector\.consecutive must be an integer >= 0"),
        ({"stats": {"count": 1}}, ValueError, r"loss_detector\.stats has missing keys"),
    ],
)
def test_detector_load_rejects_malformed_state_and_changes_nothing(patch, exc, match):
    det = LossSpikeDetector(warmup=2)
    for x in (1.0, 1.1, 1.2):
        _drive(det, x)
    before = det.state_dict()
    with pytest.raises(exc, match=match):
        det.load_state_dict({**before, **patch})
    assert det.state_dict() == before
