"""EmaStats against the closed-form exponentially weighted mean/variance, and its state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adamkit.guard import EmaStats
from adamkit.guard.stats import zscore


def _closed_form(xs, alpha):
    """Weighted mean/variance with weights alpha**(n - i), straight from the definition."""
    xs = np.asarray(xs, dtype=np.float64)
    w = alpha ** np.arange(len(xs) - 1, -1, -1, dtype=np.float64)
    mean = np.sum(w * xs) / np.sum(w)
    var = np.sum(w * (xs - mean) ** 2) / np.sum(w)
    return mean, var


@pytest.mark.parametrize(("seed", "alpha"), [(0, 0.5), (1, 0.9), (2, 0.97), (3, 0.999)])
def test_matches_the_closed_form_weighted_statistics(seed, alpha):
    rng = np.random.default_rng(seed)
    xs = rng.lognormal(mean=1.0, sigma=0.7, size=60)
    s = EmaStats(alpha)
    for n, x in enumerate(xs, start=1):
        s.update(x)
        mean, var = _closed_form(xs[:n], alpha)
        assert s.count == n
        assert math.isclose(s.mean, mean, rel_tol=1e-12)
        assert math.isclose(s.var, var, rel_tol=1e-9, abs_tol=1e-12 * mean * mean)


def test_mean_is_adams_bias_corrected_ema():
    alpha, m = 0.9, 0.0
    s = EmaStats(alpha)
    for n, x in enumerate([3.0, 1.0, 4.0, 1.0, 5.0], start=1):
        m = alpha * m + (1 - alpha) * x
        s.update(x)
        assert math.isclose(s.mean, m / (1 - alpha**n), rel_tol=1e-13)


def test_first_observation_is_the_mean_and_a_constant_stream_has_zero_variance():
    s = EmaStats(0.97)
    s.update(0.1)
    assert s.mean == 0.1 and s.var == 0.0
    for _ in range(200):
        s.update(0.1)
    assert s.mean == 0.1 and s.var == 0.0 and s.std == 0.0


def test_rejects_non_finite_observations_and_bad_alpha():
    s = EmaStats(0.5)
    s.update(1.0)
    before = s.state_dict()
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite"):
            s.update(bad)
    assert s.state_dict() == before
    for alpha in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
            EmaStats(alpha)


def test_state_round_trips_exactly_and_continues_identically():
    rng = np.random.default_rng(7)
    a = EmaStats(0.9)
    for x in rng.normal(size=13):
        a.update(x)
    b = EmaStats(0.9)
    b.load_state_dict(a.state_dict())
    for x in rng.normal(size=7):
        a.update(x)
        b.update(x)
        assert (a.mean, a.var, a.count) == (b.mean, b.var, b.count)


@pytest.mark.parametrize(
    ("patch", "exc", "match"),
    [
        ({"count": 1.0}, TypeError, r"stats\.count must be an integer"),
        ({"count": -1}, ValueError, r"stats\.count must be an integer >= 0"),
        ({"m2": -0.5}, ValueError, r"stats\.m2 must be a finite number >= 0"),
        ({"mean": math.nan}, ValueError, r"stats\.mean must be a finite number"),
        ({"mean": "1"}, TypeError, r"stats\.mean must be a real number"),
        ({"count": 0}, ValueError, "count 0 and weight .* disagree"),
        ({"extra": 1}, ValueError, "unexpected keys"),
    ],
)
def test_load_state_dict_rejects_malformed_state_and_changes_nothing(patch, exc, match):
    s = EmaStats(0.5)
    for x in (1.0, 2.0, 4.0):
        s.update(x)
    before = s.state_dict()
    with pytest.raises(exc, match=match):
        s.load_state_dict({**before, **patch})
    assert s.state_dict() == before


def test_zscore_handles_a_zero_denominator():
    assert zscore(5.0, 3.0, 1.0, 1.0) == 1.0
    assert zscore(5.0, 3.0, 0.0, 0.0) == math.inf
    assert zscore(1.0, 3.0, 0.0, 0.0) == -math.inf
    assert zscore(3.0, 3.0, 0.0, 0.0) == 0.0
