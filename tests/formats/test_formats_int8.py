"""8-bit block codecs against brute-force oracles: nearest code over all 256 entries, per-block
absmax computed block by block, and error bounds derived from the map's gaps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adamkit.formats import int8_blockwise as bw
from adamkit.formats import int8_companded as cp

FAST = settings(max_examples=30, deadline=None)
ROUNDING = 2.0**-23  # float32 rounding of x / s and of code * s, relative to the block scale
SUBNORMAL = 2.0**-149  # absolute rounding of code * s when the product is subnormal


def oracle_nearest(y: np.ndarray, qmap: np.ndarray) -> np.ndarray:
    """Index of the nearest map entry by exhaustive search in float64 (first one on ties)."""
    dist = np.abs(y.astype(np.float64)[:, None] - qmap.astype(np.float64)[None, :])
    return np.argmin(dist, axis=1)


def oracle_scales(x: np.ndarray, block: int) -> np.ndarray:
    flat = x.astype(np.float32).reshape(-1)
    return np.array(
        [np.max(np.abs(flat[i : i + block])) for i in range(0, flat.size, block)], dtype=np.float32
    )


def blocks_of(flat: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """Each element's block scale."""
    return np.repeat(scales, block)[: flat.size]


def mixed_magnitudes(draw_size: int, rng: np.random.Generator) -> np.ndarray:
    """Signed values spanning ten decades, the regime the dynamic map is built for."""
    sign = rng.choice([-1.0, 1.0], draw_size)
    return (sign * 10.0 ** rng.uniform(-10, 0, draw_size)).astype(np.float32)


# ---------------------------------------------------------------- the dynamic map itself


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_structure(signed):
    qmap = bw.dynamic_map(signed)
    assert qmap.shape == (256,) and qmap.dtype == np.float32
    assert np.all(np.diff(qmap) > 0)
    assert qmap[-1] == 1.0 and 0.0 in qmap
    assert not qmap.flags.writeable
    positive = qmap[qmap > 0]
    if signed:
        assert np.sum(qmap < 0) == 127 and positive.size == 128
        # mirror image apart from +1
        assert np.array_equal(-qmap[qmap < 0][::-1], positive[:-1])
    else:
        assert qmap[0] == 0.0 and positive.size == 255
    # decade j in (1e-7, 1e-6], ..., (0.1, 1) holds 2**j (signed) or 2**(j+1) entries
    for j in range(7):
        inside = np.sum((positive > 10.0 ** (j - 7)) & (positive < 10.0 ** (j - 6)))
        assert inside == (2**j if signed else 2 ** (j + 1))
    # smallest entry: midpoint of [0.1, 1] (signed) or of [0.1, 0.55] (unsigned), times 1e-6
    assert math.isclose(positive[0], 0.55e-6 if signed else 0.325e-6, rel_tol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_max_half_gap_matches_a_dense_scan(signed):
    qmap = bw.dynamic_map(signed).astype(np.float64)
    grid = np.linspace(-1.0 if signed else 0.0, 1.0, 1_000_001)
    right = np.clip(np.searchsorted(qmap, grid), 1, 255)
    nearest = np.minimum(np.abs(grid - qmap[right - 1]), np.abs(grid - qmap[right]))
    worst = nearest.max()
    assert worst <= bw.max_half_gap(signed) <= worst + (grid[1] - grid[0])


# ---------------------------------------------------------------- quantizer vs brute force


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_brute_force_on_thresholds(signed):
    qmap = bw.dynamic_map(signed)
    mids = ((qmap[1:].astype(np.float64) + qmap[:-1]) / 2).astype(np.float32)
    y = np.concatenate(
        [
            qmap,
            mids,
            np.nextafter(mids, np.float32(2)),
            np.nextafter(mids, np.float32(-2)),
            np.float32([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45]),
        ]
    ).astype(np.float32)
    if not signed:
        y = np.abs(y)
    assert np.array_equal(bw.quantize(y, signed), oracle_nearest(y, qmap))


@FAST
@given(
    hnp.arrays(np.float32, st.integers(0, 200), elements=st.floats(-1, 1, width=32)),
    st.booleans(),
)
def test_quantize_matches_brute_force(y, signed):
    if not signed:
        y = np.abs(y)
    got = bw.quantize(y, signed)
    assert got.dtype == np.uint8
    assert np.array_equal(got, oracle_nearest(y, bw.dynamic_map(signed)))


def test_quantize_matches_brute_force_across_decades():
    y = mixed_magnitudes(20_000, np.random.default_rng(0))
    assert np.array_equal(bw.quantize(y, True), oracle_nearest(y, bw.dynamic_map(True)))
    y = np.abs(y)
    assert np.array_equal(bw.quantize(y, False), oracle_nearest(y, bw.dynamic_map(False)))


# ---------------------------------------------------------------- block-wise encode / decode


@FAST
@given(
    size=st.integers(0, 1100),
    block=st.sampled_from([1, 7, 64, 256, 300]),
    signed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1.0, 1e-30, 1e30]),
)
def test_encode_matches_oracle_and_bound(size, block, signed, seed, scale):
    rng = np.random.default_rng(seed)
    x = (mixed_magnitudes(size, rng) * np.float32(scale)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    codes, scales = bw.encode(x, block, signed)
    assert codes.dtype == np.uint8 and codes.shape == (size,)
    want_scales = oracle_scales(x, block)
    assert scales.dtype == np.float32 and np.array_equal(scales, want_scales)

    s = blocks_of(x, want_scales, block)
    y = np.divide(x, s, out=np.zeros_like(x), where=s > 0)  # a zero block normalises to 0
    assert np.array_equal(codes, oracle_nearest(y, bw.dynamic_map(signed)))

    out = bw.decode(codes, scales, x.shape, block, signed)
    assert out.dtype == np.float32 and out.shape == x.shape
    err = np.abs(out.astype(np.float64) - x)
    assert np.all(err <= s.astype(np.float64) * (bw.max_half_gap(signed) + ROUNDING) + SUBNORMAL)


@pytest.mark.parametrize("signed", [True, False])
def test_zero_and_constant_blocks(signed):
    x = np.zeros(600, dtype=np.float32)
    x[256:512] = 3.25  # a constant block is its own maximum: decodes exactly
    codes, scales = bw.encode(x, 256, signed)
    assert list(scales) == [0.0, 3.25, 0.0]
    assert np.all(codes[:256] == bw.zero_code(signed)) and np.all(
        codes[512:] == bw.zero_code(signed)
    )
    assert np.array_equal(bw.decode(codes, scales, x.shape, 256, signed), x)


def test_negative_constant_block_stays_within_bound():
    # The signed map has no -1 entry (its lowest is -0.99297): still inside max_half_gap.
    x = np.full(300, -2.0, dtype=np.float32)
    out = bw.decode(*bw.encode(x), x.shape)
    assert np.all(np.abs(out - x) <= 2.0 * (bw.max_half_gap(True) + ROUNDING))
    assert np.all(out < 0)


def test_subnormal_block():
    x = np.float32([1e-40, -3e-41, 0.0, 7e-45])
    out = bw.decode(*bw.encode(x), x.shape)
    assert np.all(np.abs(out - x) <= 1e-40 * (bw.max_half_gap(True) + ROUNDING) + SUBNORMAL)


@pytest.mark.parametrize("codec", [bw, cp])
def test_0d_and_empty(codec):
    codes, scales = codec.encode(np.float32(-3.0))
    assert codes.shape == (1,) and scales.shape == (1,)
    out = codec.decode(codes, scales, ())
    assert out.shape == () and abs(float(out) + 3.0) <= 3.0 * 0.008
    codes, scales = codec.encode(np.zeros((0, 5)))
    assert codes.shape == (0,) and scales.shape == (0,)
    assert codec.decode(codes, scales, (0, 5)).shape == (0, 5)


@pytest.mark.parametrize("codec", [bw, cp])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_input_raises(codec, bad):
    x = np.ones(10)
    x[3] = bad  # 1e39 overflows float32
    with pytest.raises(ValueError, match="finite"):
        codec.encode(x)


@pytest.mark.parametrize("codec", [bw, cp])
def test_argument_errors(codec):
    with pytest.raises(ValueError, match="signed=False"):
        codec.encode(np.array([1.0, -1.0]), signed=False)
    with pytest.raises(ValueError, match="block"):
        codec.encode(np.ones(3), 0)
    with pytest.raises(TypeError, match="block"):
        codec.encode(np.ones(3), True)
    with pytest.raises(TypeError, match="real"):
        codec.encode(np.array(["a"]))
    codes, scales = codec.encode(np.ones(10), 4)
    with pytest.raises(ValueError, match="shape"):
        codec.decode(codes, scales, (11,), 4)
    with pytest.raises(ValueError, match="scales"):
        codec.decode(codes, scales[:-1], (10,), 4)
    with pytest.raises(TypeError, match="scales"):
        codec.decode(codes, scales.astype(np.float64), (10,), 4)
    with pytest.raises(TypeError, match="codes"):
        codec.decode(codes.astype(np.int32), scales, (10,), 4)


@pytest.mark.parametrize("codec", [bw, cp])
@pytest.mark.parametrize("signed", [True, False])
def test_keep_nonzero_never_flushes(codec, signed):
    rng = np.random.default_rng(5)
    x = mixed_magnitudes(5000, rng)
    x[::7] = 0.0
    if not signed:
        x = np.abs(x)
    plain, scales = codec.encode(x, 256, signed)
    kept, scales2 = codec.encode(x, 256, signed, keep_nonzero=True)
    assert np.array_equal(scales, scales2)
    out = codec.decode(kept, scales, x.shape, 256, signed)
    assert np.array_equal(out == 0, x == 0)
    assert np.array_equal(np.sign(out), np.sign(x))
    zero = codec.zero_code(signed)
    changed = plain != kept
    assert changed.any()  # ten decades in a block: some values do round to zero
    assert np.all(plain[changed] == zero)
    step = np.where(x[changed] > 0, 1, -1)
    assert np.array_equal(kept[changed].astype(int), zero + step)


# ---------------------------------------------------------------- companded codec


def test_companded_levels_and_dtypes():
    assert cp.code_dtype(True) == np.int8 and cp.code_dtype(False) == np.uint8
    signed_levels = cp.levels(True)
    assert signed_levels.size == 255 and np.all(np.diff(signed_levels) > 0)
    assert signed_levels[0] == -1 and signed_levels[-1] == 1 and 0.0 in signed_levels
    unsigned = cp.levels(False)
    assert unsigned.size == 256 and unsigned[0] == 0 and unsigned[-1] == 1


@FAST
@given(
    size=st.integers(0, 700),
    block=st.sampled_from([1, cp.DEFAULT_BLOCK, cp.BUDGET_BLOCK, 100, 256]),
    signed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1.0, 1e-30, 1e30]),
)
def test_companded_matches_oracle_and_bound(size, block, signed, seed, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(size) * scale).astype(np.float32)
    if not signed:
        x = np.abs(x)
    codes, scales = cp.encode(x, block, signed)
    assert codes.dtype == cp.code_dtype(signed) and codes.shape == (size,)
    want_scales = oracle_scales(x, block)
    assert np.array_equal(scales, want_scales)
    s = blocks_of(x, want_scales, block).astype(np.float64)
    y = np.divide(x, s, out=np.zeros(size), where=s > 0)
    # oracle: nearest code in the companded domain, by exhaustive search
    if signed:
        z = 2 * y / (1 + np.abs(y))
        grid = np.arange(-127, 128) / 127.0
        want = np.arange(-127, 128)[oracle_nearest(z, grid)]
    else:
        want = oracle_nearest(y, np.arange(256) / 255.0)
    # rint's ties and float32 rounding of z may pick the other code at an exact midpoint
    assert np.all(np.abs(codes.astype(int) - want) <= 1)
    assert size < 100 or np.mean(codes.astype(int) == want) > 0.99

    out = cp.decode(codes, scales, x.shape, block, signed).astype(np.float64)
    # |dz| <= 1/254 and |dy/dz| <= 2 (signed); unsigned is linear with step 1/255
    bound = 2.0 / 254 if signed else 1.0 / 510
    assert np.all(np.abs(out - x) <= s * (bound + 4 * ROUNDING) + 4 * SUBNORMAL)


def test_companded_constant_blocks_are_exact():
    x = np.concatenate([np.full(32, -1.5), np.zeros(32), np.full(5, 2.5)]).astype(np.float32)
    codes, scales = cp.encode(x)
    assert list(codes[:3]) == [-127] * 3 and codes[40] == 0 and codes[-1] == 127
    assert np.array_equal(cp.decode(codes, scales, x.shape), x)
    assert np.array_equal(
        cp.decode(*cp.encode(np.abs(x), signed=False), x.shape, signed=False), np.abs(x)
    )


# ---------------------------------------------------------------- stochastic rounding


def brackets(y: np.ndarray, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest entry <= y and smallest entry >= y, by exhaustive comparison."""
    e = entries.astype(np.float64)[None, :]
    y64 = y.astype(np.float64)[:, None]
    below = np.where(e <= y64, e, -np.inf).max(axis=1)
    above = np.where(e >= y64, e, np.inf).min(axis=1)
    return below, above


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_stochastic_picks_a_bracket_and_is_unbiased(signed):
    rng = np.random.default_rng(11)
    qmap = bw.dynamic_map(signed)
    low = float(qmap[0])  # the signed map cannot go below its lowest entry
    y = rng.uniform(low, 1.0, 24).astype(np.float32)
    y[:8] = mixed_magnitudes(8, rng) if signed else np.abs(mixed_magnitudes(8, rng))
    y[-1] = 1.0  # the block maximum: always exact
    draws = 4000
    # one block whose maximum is 1, so the codes quantize y itself, each repeated `draws` times
    x = np.concatenate([[1.0], np.repeat(y, draws)]).astype(np.float32)
    codes, scales = bw.encode(x, x.size, signed, rng=rng)
    assert scales[0] == 1.0
    got = qmap[codes[1:]].astype(np.float64).reshape(-1, draws)
    below, above = brackets(y, qmap)
    assert np.all((got == below[:, None]) | (got == above[:, None]))
    p = np.where(above > below, (y - below) / np.where(above > below, above - below, 1), 0)
    sigma = (above - below) * np.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(got.mean(axis=1) - y) <= 5 * sigma + 1e-7 * np.abs(y))
    assert np.all(got[-1] == 1.0)


def test_companded_stochastic_is_unbiased_for_the_linear_code():
    rng = np.random.default_rng(12)
    y = rng.uniform(0, 1, 16).astype(np.float32)
    draws = 4000
    x = np.concatenate([[1.0], np.repeat(y, draws)]).astype(np.float32)
    codes, _ = cp.encode(x, x.size, signed=False, rng=rng)
    got = codes[1:].astype(np.float64).reshape(-1, draws)
    c = y.astype(np.float64) * 255
    assert np.all((got == np.floor(c)[:, None]) | (got == np.ceil(c)[:, None]))
    p = c - np.floor(c)
    assert np.all(np.abs(got.mean(axis=1) - c) <= 5 * np.sqrt(p * (1 - p) / draws) + 1e-4)
    signed_codes, _ = cp.encode(np.concatenate([[1.0], -y]), 1000, signed=True, rng=rng)
    z = 254 * y.astype(np.float64) / (1 + y)  # |code| of -y is floor or ceil of this
    mags = -signed_codes[1:].astype(np.float64)
    assert np.all((mags == np.floor(z)) | (mags == np.ceil(z)))


@pytest.mark.parametrize("codec", [bw, cp])
def test_stochastic_rng_type_is_checked(codec):
    with pytest.raises(TypeError, match="rng"):
        codec.encode(np.ones(4), rng=1)
