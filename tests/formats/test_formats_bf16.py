"""bf16 codec: exact decode, nearest-even and stochastic rounding, against first principles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adamkit.formats import bf16

FAST = settings(max_examples=40, deadline=None)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def bf16_value(bits: int) -> float:
    """Value of a bf16 bit pattern from its fields (sign, 8-bit exponent, 7-bit fraction)."""
    sign = -1.0 if bits & 0x8000 else 1.0
    exponent = (bits >> 7) & 0xFF
    fraction = bits & 0x7F
    if exponent == 0xFF:
        return sign * math.inf if fraction == 0 else math.nan
    if exponent == 0:
        return sign * math.ldexp(fraction / 128.0, -126)
    return sign * math.ldexp(1.0 + fraction / 128.0, exponent - 127)


def neighbours(x: float) -> tuple[float, float]:
    """The bf16 values just below/above |x| in magnitude, as (toward zero, away from zero)."""
    bits = int(np.array(x, dtype=np.float32).view(np.uint32))
    toward = bf16_value(bits >> 16)
    away = bf16_value((bits >> 16) + 1)
    return toward, away


def test_decode_all_patterns_match_field_formula():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(invalid="ignore"):  # widening signalling NaNs flags "invalid"
        got = bf16.decode(bits).astype(np.float64)
    want = np.array([bf16_value(int(b)) for b in bits])
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan], want[~nan])


@FAST
@given(finite32)
@example(1.0 + 2.0**-8)  # tie, rounds down to the even 1.0
@example(-(1.0 + 3 * 2.0**-8))  # tie, rounds away to the even pattern
@example(bf16.BF16_MAX + 2.0**119)  # tie at the top: rounds to inf
@example(bf16.BF16_MAX + 2.0**118)  # below the tie: stays finite
@example(3 * 2.0**-135)  # subnormal
def test_nearest_is_nearest_with_ties_to_even(x):
    x = float(np.float32(x))
    toward, away = neighbours(x)
    # Past the largest bf16 the next value "away" is 2**128 in magnitude, which rounds to inf.
    away_value = math.copysign(2.0**128, x) if math.isinf(away) else away
    expected_away = away
    got = float(bf16.decode(bf16.encode_nearest(np.float32(x))))
    d_toward, d_away = abs(x - toward), abs(away_value - x)
    if d_toward < d_away:
        assert got == toward
    elif d_away < d_toward:
        assert got == expected_away
    else:  # tie: the candidate whose last kept fraction bit is even
        toward_bits = int(np.array(toward, np.float32).view(np.uint32)) >> 16
        assert got == (toward if toward_bits % 2 == 0 else expected_away)


@FAST
@given(hnp.arrays(np.float32, st.integers(0, 64), elements=finite32))
def test_nearest_error_bound(x):
    got = bf16.decode(bf16.encode_nearest(x)).astype(np.float64)
    x64 = x.astype(np.float64)
    ok = np.abs(x64) <= bf16.BF16_MAX
    err = np.abs(got[ok] - x64[ok])
    normal = np.abs(x64[ok]) >= 2.0**-126
    assert np.all(err[normal] <= 2.0**-8 * np.abs(x64[ok][normal]))
    assert np.all(err[~normal] <= 2.0**-134)


def test_overflow_and_specials():
    x = np.array(
        [bf16.BF16_MAX, 3.4e38, -3.4e38, np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0],
        dtype=np.float32,
    )
    for bits in (bf16.encode_nearest(x), bf16.encode_stochastic(x, np.random.default_rng(1))):
        y = bf16.decode(bits)
        assert y[0] == bf16.BF16_MAX
        assert np.isinf(y[3]) and y[3] > 0 and np.isinf(y[4]) and y[4] < 0
        assert np.isnan(y[5]) and np.isnan(y[6])
        assert not np.signbit(y[5]) and np.signbit(y[6])
        assert y[7] == 0 and not np.signbit(y[7]) and y[8] == 0 and np.signbit(y[8])
    # 3.4e38 lies above the last bf16 + half an ulp: nearest gives inf of the right sign.
    y = bf16.decode(bf16.encode_nearest(x))
    assert y[1] == np.inf and y[2] == -np.inf


def test_nan_payload_in_low_bits_stays_nan():
    # A NaN whose payload is only in the dropped 16 bits would truncate to inf.
    x = np.array([0x7F800001, 0xFF800001, 0x7FFFFFFF], dtype=np.uint32).view(np.float32)
    for bits in (bf16.encode_nearest(x), bf16.encode_stochastic(x, np.random.default_rng(0))):
        y = bf16.decode(bits)
        assert np.isnan(y).all()
        assert list(np.signbit(y)) == [False, True, False]


@FAST
@given(hnp.arrays(np.float32, st.integers(1, 32), elements=finite32), st.integers(0, 2**32))
def test_stochastic_picks_a_neighbour(x, seed):
    got = bf16.decode(bf16.encode_stochastic(x, np.random.default_rng(seed))).astype(np.float64)
    for value, out in zip(x.astype(np.float64), got, strict=True):
        toward, away = neighbours(value)
        assert out in (toward, away)
        if toward == value:  # representable: never moves
            assert out == value


@pytest.mark.parametrize("seed", [0, 1])
def test_stochastic_rounding_is_unbiased(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(20) * 10.0 ** rng.integers(-30, 30, 20)).astype(np.float32)
    draws = 20_000
    samples = bf16.decode(bf16.encode_stochastic(np.repeat(x[:, None], draws, 1), rng))
    mean = samples.astype(np.float64).mean(axis=1)
    for value, m in zip(x.astype(np.float64), mean, strict=True):
        toward, away = neighbours(value)
        p = (value - toward) / (away - toward)  # probability of rounding away from zero
        sigma = abs(away - toward) * math.sqrt(p * (1 - p) / draws)
        assert abs(m - value) <= 5 * sigma + 1e-12 * abs(value)


def test_stochastic_is_reproducible_and_keeps_shape():
    x = np.random.default_rng(3).standard_normal((3, 4))
    a = bf16.encode_stochastic(x, np.random.default_rng(7))
    b = bf16.encode_stochastic(x, np.random.default_rng(7))
    assert a.dtype == np.uint16 and a.shape == (3, 4) and np.array_equal(a, b)


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (5,)])
def test_shapes_including_0d_and_empty(shape):
    x = np.full(shape, 1.5, dtype=np.float64)
    bits = bf16.encode_nearest(x)
    assert bits.shape == shape and bits.dtype == np.uint16
    y = bf16.decode(bits)
    assert y.shape == shape and y.dtype == np.float32 and np.all(y == 1.5)
    assert bf16.encode_stochastic(x, np.random.default_rng(0)).shape == shape


def test_bad_inputs():
    with pytest.raises(TypeError, match="rng"):
        bf16.encode_stochastic(np.ones(3), None)
    with pytest.raises(TypeError, match="real"):
        bf16.encode_nearest(np.ones(3, dtype=complex))
    with pytest.raises(TypeError, match="uint16"):
        bf16.decode(np.ones(3, dtype=np.int32))
