"""``"int8-companded-64"``: the companded code in blocks of 64, the 8-bit format inside the memory
budget of issue #7 (at most 2.15 bytes of state per parameter), against the codec and its bounds.

Bytes are measured from the storages the format allocates; round trips through ``store``/``load``
are held to the codec's error bounds relative to each block's absmax (brute-force block maxima).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adamkit.formats import MIN_QUANTIZED_SIZE, QuantizedFormat, get_format
from adamkit.formats import int8_companded as cp

NAME = "int8-companded-64"
BUDGET = 2.15  # bytes of state (both moments) per parameter allowed for an 8-bit state
FAST = settings(max_examples=25, deadline=None)
ROUNDING = 2.0**-23


def _block_max(x: np.ndarray, block: int) -> np.ndarray:
    """Each element's block absmax, block by block (the oracle of the scales)."""
    flat = np.abs(x.astype(np.float64).reshape(-1))
    out = np.empty_like(flat)
    for lo in range(0, flat.size, block):
        out[lo : lo + block] = flat[lo : lo + block].max()
    return out


def test_registered_as_the_companded_codec_in_blocks_of_64():
    fmt = get_format(NAME)
    assert fmt == QuantizedFormat(NAME, cp, 64, sqrt_second_moment=True)
    assert cp.BUDGET_BLOCK == 64 and fmt.rounding == "nearest" and not fmt.needs_rng
    assert fmt != get_format("int8-companded")  # another block: another format


@pytest.mark.parametrize("size", [MIN_QUANTIZED_SIZE, 1 << 20, 10_000_003])
def test_bytes_per_parameter_measured_from_storage_are_inside_the_budget(size):
    fmt = get_format(NAME)
    m = fmt.zeros((size,), np.float32, role="exp_avg")
    v = fmt.zeros((size,), np.float32, role="exp_avg_sq")
    per_param = (fmt.nbytes(m) + fmt.nbytes(v)) / size
    assert per_param <= BUDGET
    blocks = -(-size // 64)
    assert fmt.nbytes(m) == size + 4 * blocks  # one int8 code each, one float32 scale per 64
    assert m.arrays["codes"].dtype == np.int8 and v.arrays["codes"].dtype == np.uint8
    if size % 64 == 0:
        assert per_param == 2.125


@FAST
@given(
    size=st.integers(MIN_QUANTIZED_SIZE, MIN_QUANTIZED_SIZE + 300),
    seed=st.integers(0, 2**32 - 1),
    decades=st.sampled_from([0.0, 3.0, 8.0]),
)
def test_store_load_round_trip_within_the_codec_bounds(size, seed, decades):
    """m within s * 2/254 (the compander's largest step, halved, times dy/dz <= 2) and sqrt(v)
    within s / 510 of its block maximum s (s / 255 below the first level, which ``keep_nonzero``
    rounds up to it), plus float32 rounding; block maxima exact."""
    fmt = get_format(NAME)
    rng = np.random.default_rng(seed)
    magnitude = 10.0 ** rng.uniform(-decades, 0, size)
    m = (rng.standard_normal(size) * magnitude).astype(np.float32)
    v = ((rng.random(size) * magnitude) ** 2).astype(np.float32)
    for role, x, bound in (("exp_avg", m, 2.0 / 254), ("exp_avg_sq", v, 1.0 / 510)):
        storage = fmt.zeros((size,), role=role)
        fmt.store(storage, x)
        got = fmt.load(storage).astype(np.float64)
        stored = np.sqrt(x.astype(np.float64)) if role == "exp_avg_sq" else x.astype(np.float64)
        scale = _block_max(stored.astype(np.float32), 64)
        np.testing.assert_array_equal(storage.arrays["scales"], scale[::64].astype(np.float32))
        back = np.sqrt(got) if role == "exp_avg_sq" else got
        if role == "exp_avg_sq":
            bound = np.where(stored < scale / 510, 1.0 / 255, bound)
        assert np.all(np.abs(back - stored) <= scale * (bound + 4 * ROUNDING))
        if role == "exp_avg_sq":
            assert np.all(got[x > 0] > 0)  # a positive second moment never becomes 0


def test_state_dict_round_trips_exactly_and_is_not_read_as_blocks_of_32():
    fmt = get_format(NAME)
    rng = np.random.default_rng(7)
    storage = fmt.zeros((5000,), role="exp_avg")
    fmt.store(storage, rng.standard_normal(5000))
    d = fmt.to_state_dict(storage)
    assert d["format"] == NAME and d["block"] == 64
    back = fmt.from_state_dict(d, (5000,))
    for key, arr in storage.arrays.items():
        np.testing.assert_array_equal(back.arrays[key], arr)
    with pytest.raises(ValueError, match="int8-companded"):
        get_format("int8-companded").from_state_dict(d, (5000,))
