"""GuardConfig validation and resolve_guard: every knob checked, errors name value and range."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from adamkit.guard import GuardConfig, resolve_guard


def test_defaults_turn_on_only_the_nonfinite_skip():
    c = GuardConfig()
    assert c.skip_nonfinite is True
    assert c.update_clip is None
    assert not (c.grad_spike or c.loss_spike or c.track_update_norm)
    assert c.snapshot_interval == 0 and c.lr_factor == 1.0 and c.lr_cooldown == 0
    assert c.needs_grad_norm


def test_all_turns_every_behaviour_on_and_accepts_overrides():
    c = GuardConfig.all()
    assert c.skip_nonfinite and c.grad_spike and c.loss_spike and c.track_update_norm
    assert c.update_clip == "rms"
    # Clips only a 4-fold underestimate of the mean square (RMS > 2), not ordinary growth.
    assert c.rms_threshold == 2.0 and GuardConfig(update_clip="rms").rms_threshold == 1.0
    assert c.grad_z == 4.0 and GuardConfig(grad_spike=True).grad_z == 2.5
    assert c.snapshot_interval == 100 and c.lr_factor == 0.25 and c.lr_cooldown == 1000
    assert c.loss_warmup == 1  # judges the second loss against the first: catches step-2 blow-ups
    assert GuardConfig.all(update_clip="atan2", snapshot_interval=0).update_clip == "atan2"
    with pytest.raises(TypeError, match=r"unknown guard option.*'snapshot_every'"):
        GuardConfig.all(snapshot_every=3)


def test_everything_off_needs_no_grad_norm():
    assert not GuardConfig(skip_nonfinite=False).needs_grad_norm


@pytest.mark.parametrize(
    ("guard", "expected"),
    [
        (False, None),
        (None, None),
        ("off", None),
        (True, GuardConfig()),
        ("default", GuardConfig()),
        ("all", GuardConfig.all()),
        ({"grad_spike": True, "grad_z": 3.0}, GuardConfig(grad_spike=True, grad_z=3.0)),
        ({"preset": "all", "loss_spike": False}, GuardConfig.all(loss_spike=False)),
        ({}, GuardConfig()),
    ],
)
def test_resolve_guard_accepts(guard, expected):
    assert resolve_guard(guard) == expected


def test_resolve_guard_returns_a_config_object_unchanged():
    c = GuardConfig(update_clip="atan2")
    assert resolve_guard(c) is c


@pytest.mark.parametrize(
    ("guard", "exc", "match"),
    [
        (1, TypeError, "guard must be True, False, None, a GuardConfig.*got int 1"),
        (0, TypeError, "got int 0"),
        (["all"], TypeError, "got list"),
        ("everything", ValueError, r"Invalid guard: 'everything' \(guard must be"),
        ("ALL", ValueError, "Invalid guard: 'ALL'"),
        ({"grad_spikes": True}, TypeError, "unknown guard option.*'grad_spikes'"),
        ({"preset": "max"}, ValueError, r"Invalid guard preset: 'max' \(preset must be"),
        ({"grad_z": -1.0}, ValueError, "Invalid grad_z: -1.0"),
    ],
)
def test_resolve_guard_rejects(guard, exc, match):
    with pytest.raises(exc, match=match):
        resolve_guard(guard)


# (field, value, exception, exact message)
FIELD_ERRORS = [
    ("grad_alpha", 1.0, ValueError, "Invalid grad_alpha: 1.0 (grad_alpha must be in (0, 1))"),
    ("grad_alpha", 0.0, ValueError, "Invalid grad_alpha: 0.0 (grad_alpha must be in (0, 1))"),
    ("loss_alpha", -0.1, ValueError, "Invalid loss_alpha: -0.1 (loss_alpha must be in (0, 1))"),
    ("grad_z", 0.0, ValueError, "Invalid grad_z: 0.0 (grad_z must be a finite number > 0)"),
    ("loss_z", math.nan, ValueError, "Invalid loss_z: nan (loss_z must be a finite number > 0)"),
    (
        "rms_threshold",
        math.inf,
        ValueError,
        "Invalid rms_threshold: inf (rms_threshold must be a finite number > 0)",
    ),
    ("atan2_a", -1.27, ValueError, "Invalid atan2_a: -1.27 (atan2_a must be a finite number > 0)"),
    ("atan2_b", 0, ValueError, "Invalid atan2_b: 0.0 (atan2_b must be a finite number > 0)"),
    ("atan2_a", "1", TypeError, "atan2_a must be a real number, got str '1'"),
    (
        "grad_eps",
        -1e-6,
        ValueError,
        "Invalid grad_eps: -1e-06 (grad_eps must be a finite number >= 0)",
    ),
    (
        "loss_margin",
        -0.5,
        ValueError,
        "Invalid loss_margin: -0.5 (loss_margin must be a finite number >= 0)",
    ),
    ("grad_warmup", 1, ValueError, "Invalid grad_warmup: 1 (grad_warmup must be an integer >= 2)"),
    ("loss_warmup", 2.5, TypeError, "loss_warmup must be an integer, got float 2.5"),
    ("loss_warmup", True, TypeError, "loss_warmup must be an integer, got bool True"),
    (
        "loss_patience",
        0,
        ValueError,
        "Invalid loss_patience: 0 (loss_patience must be an integer >= 1)",
    ),
    (
        "snapshot_interval",
        -1,
        ValueError,
        "Invalid snapshot_interval: -1 (snapshot_interval must be an integer >= 0)",
    ),
    (
        "lr_cooldown",
        -5,
        ValueError,
        "Invalid lr_cooldown: -5 (lr_cooldown must be an integer >= 0)",
    ),
    ("lr_factor", 0.0, ValueError, "Invalid lr_factor: 0.0 (lr_factor must be in (0, 1])"),
    ("lr_factor", 1.5, ValueError, "Invalid lr_factor: 1.5 (lr_factor must be in (0, 1])"),
    (
        "update_clip",
        "clip",
        ValueError,
        "Invalid update_clip: 'clip' (update_clip must be one of 'rms', 'atan2' or None)",
    ),
    (
        "update_clip",
        1,
        TypeError,
        "update_clip must be one of 'rms', 'atan2' or None, got int 1",
    ),
    (
        "grad_mode",
        None,
        TypeError,
        "grad_mode must be one of 'threshold', 'adaptive', got NoneType None",
    ),
    (
        "grad_mode",
        "zscore",
        ValueError,
        "Invalid grad_mode: 'zscore' (grad_mode must be one of 'threshold', 'adaptive')",
    ),
    ("skip_nonfinite", 1, TypeError, "skip_nonfinite must be True or False, got int 1"),
    (
        "track_update_norm",
        "yes",
        TypeError,
        "track_update_norm must be True or False, got str 'yes'",
    ),
]


@pytest.mark.parametrize(("field", "value", "exc", "message"), FIELD_ERRORS)
def test_each_field_is_validated_with_its_name_value_and_range(field, value, exc, message):
    with pytest.raises(exc) as info:
        GuardConfig(**{field: value})
    assert str(info.value) == message


def test_numpy_scalars_are_normalised_to_python_types():
    c = GuardConfig(grad_warmup=np.int64(5), grad_alpha=np.float32(0.5), skip_nonfinite=np.True_)
    assert type(c.grad_warmup) is int and c.grad_warmup == 5
    assert type(c.grad_alpha) is float and c.grad_alpha == 0.5
    assert c.skip_nonfinite is True


def test_config_is_frozen_and_round_trips_through_a_dict():
    c = GuardConfig.all(grad_mode="adaptive")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.grad_z = 1.0  # type: ignore[misc]
    assert GuardConfig(**c.to_dict()) == c
