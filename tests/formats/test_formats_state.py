"""The format objects optimizers see: zeros/load/store/nbytes, state dicts, registry, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adamkit.formats import (
    FORMATS,
    MIN_QUANTIZED_SIZE,
    ROLES,
    Bf16Format,
    DenseFormat,
    QuantizedFormat,
    StateFormat,
    Storage,
    from_state_dict,
    get_format,
)
from adamkit.formats import int8_blockwise as bw
from adamkit.formats import int8_companded as cp

NAMES = list(FORMATS)
BIG = (64, 80)  # 5120 elements: above the small-tensor threshold, not a multiple of 256
SHAPES = [(), (0,), (3, 0), (7,), (5, 9), BIG]


def moment(role: str, shape, rng: np.random.Generator) -> np.ndarray:
    """Adam-like values: a signed first moment, a non-negative second moment."""
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 1, shape)
    return x if role == "exp_avg" else x * x


def block_bound(x: np.ndarray, block: int, gap: float) -> np.ndarray:
    """Per-element error allowance ``absmax(block) * (gap + float32 rounding)``."""
    flat = np.abs(x.reshape(-1)).astype(np.float64)
    absmax = np.array([flat[i : i + block].max() for i in range(0, flat.size, block)])
    return (np.repeat(absmax, block)[: flat.size] * (gap + 2.0**-22)).reshape(x.shape)


# ---------------------------------------------------------------- registry


def test_get_format_names():
    assert get_format(None) is FORMATS["native"]
    for name in ("native", "fp32", "bf16", "int8", "int8-companded", "int8-blockwise"):
        fmt = get_format(name)
        assert fmt.name == name and isinstance(fmt, StateFormat)
    custom = QuantizedFormat("int8", block=128)
    assert get_format(custom) is custom


def test_get_format_refuses_unknown():
    with pytest.raises(ValueError, match=r"Unknown state format 'int4'.*'bf16'"):
        get_format("int4")
    with pytest.raises(TypeError, match="state must be"):
        get_format(8)


# ---------------------------------------------------------------- zeros / load / store


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("role", ROLES)
def test_zeros_load_as_zeros(name, shape, role):
    fmt = get_format(name)
    storage = fmt.zeros(shape, np.float64, role=role)
    assert isinstance(storage, Storage) and storage.shape == shape and storage.role == role
    values = fmt.load(storage)
    assert values.shape == shape and not values.any()
    assert values.dtype == (np.float64 if name == "native" else np.float32)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("role", ["exp_avg", "exp_avg_sq"])
def test_store_load_accuracy(name, shape, role):
    rng = np.random.default_rng(abs(hash((name, shape, role))) % 2**32)
    fmt = get_format(name)
    x = moment(role, shape, rng)
    storage = fmt.zeros(shape, np.float64, role=role)
    fmt.store(storage, x, rng=np.random.default_rng(0))
    got = fmt.load(storage).astype(np.float64)
    assert got.shape == shape
    n = math.prod(shape)
    if name == "native":
        assert np.array_equal(got, x)
    elif name == "fp32" or (name.startswith("int8") and n < MIN_QUANTIZED_SIZE):
        assert np.array_equal(got, x.astype(np.float32))
    elif name == "bf16":  # stochastic: strictly less than one bf16 ulp (2**-7 relative)
        assert np.all(np.abs(got - x) < 2.0**-7 * np.abs(x) + 1e-45)
    elif role == "exp_avg":
        blockwise = name in ("int8", "int8-blockwise")
        gap = bw.max_half_gap(True) if blockwise else 2 / 254
        assert np.all(np.abs(got - x) <= block_bound(x, fmt.block, gap))
    else:  # second moments are quantized as sqrt(v): the bound holds for sqrt
        # a value that would flush to 0 gets the first level: one full step (1/255) for companded
        blockwise = name in ("int8", "int8-blockwise")
        gap = bw.max_half_gap(False) if blockwise else 1 / 255
        assert np.all(np.abs(np.sqrt(got) - np.sqrt(x)) <= block_bound(np.sqrt(x), fmt.block, gap))
        assert np.array_equal(got == 0, x == 0)  # never flushed to zero


def test_small_tensor_threshold_is_4096_elements():
    fmt = get_format("int8")
    assert MIN_QUANTIZED_SIZE == 4096
    assert fmt.zeros((4095,)).encoding == "dense"
    assert fmt.zeros((64, 64)).encoding == "int8"
    assert fmt.zeros((64, 64)).arrays["codes"].shape == (4096,)


@pytest.mark.parametrize(
    ("name", "per_param"),
    [
        ("native", 16.0),
        ("fp32", 8.0),
        ("bf16", 4.0),
        ("int8", 2.05),
        ("int8-companded", 2.25),
        ("int8-blockwise", 2.05),
    ],
)
def test_nbytes_per_parameter_for_both_moments(name, per_param):
    fmt = get_format(name)
    n = 1 << 20
    m = fmt.zeros((n,), np.float64, role="exp_avg")
    v = fmt.zeros((n,), np.float64, role="exp_avg_sq")
    total = (fmt.nbytes(m) + fmt.nbytes(v)) / n
    if name in ("int8", "int8-blockwise"):
        assert total <= per_param
        assert total == 2 + 2 * 4 / 256  # codes + one float32 scale per 256 for each moment
    else:
        assert total == per_param


def test_int8_small_tensors_cost_float32():
    fmt = get_format("int8")
    storage = fmt.zeros((100,), role="exp_avg_sq")
    assert fmt.nbytes(storage) == 400


def test_dense_load_is_the_buffer_and_store_keeps_it():
    fmt = get_format("fp32")
    storage = fmt.zeros((4, 3), np.float64)
    buffer = fmt.load(storage)
    buffer += 2.0  # in-place update of the loaded array is the update of the state
    fmt.store(storage, buffer)
    assert storage.arrays["values"] is buffer and np.all(fmt.load(storage) == 2.0)
    fmt.store(storage, np.ones((4, 3)))
    assert storage.arrays["values"] is buffer and np.all(buffer == 1.0)


@pytest.mark.parametrize("name", ["bf16", "int8", "int8-companded"])
def test_store_overwrites_in_place(name):
    fmt = get_format(name)
    storage = fmt.zeros(BIG, role="exp_avg")
    before = {k: id(a) for k, a in storage.arrays.items()}
    fmt.store(storage, np.ones(BIG), rng=np.random.default_rng(0))
    assert {k: id(a) for k, a in storage.arrays.items()} == before
    assert np.all(fmt.load(storage) == 1.0)


def test_bf16_stochastic_keeps_small_increments_nearest_loses_them():
    # v += 1e-4 per step on v = 1: far below half a bf16 ulp (2**-8), lost by nearest rounding.
    steps, n = 200, 2000
    stochastic, nearest = get_format("bf16"), Bf16Format(rounding="nearest")
    rng = np.random.default_rng(0)
    s_store = stochastic.zeros((n,), role="exp_avg_sq")
    n_store = nearest.zeros((n,), role="exp_avg_sq")
    stochastic.store(s_store, np.ones(n), rng=rng)
    nearest.store(n_store, np.ones(n))
    for _ in range(steps):
        stochastic.store(s_store, stochastic.load(s_store) + np.float32(1e-4), rng=rng)
        nearest.store(n_store, nearest.load(n_store) + np.float32(1e-4))
    assert np.all(nearest.load(n_store) == 1.0)
    # each element ends within a few ulps of 1.02; the mean of 2000 within ~1e-3
    assert abs(stochastic.load(s_store).mean() - (1 + steps * 1e-4)) < 2e-3


def test_stored_bf16_round_trips_exactly_after_first_store():
    fmt = get_format("bf16")
    storage = fmt.zeros((50,))
    fmt.store(storage, np.random.default_rng(1).standard_normal(50), rng=np.random.default_rng(2))
    snapshot = fmt.load(storage)
    fmt.store(storage, snapshot, rng=np.random.default_rng(3))  # representable: no change
    assert np.array_equal(fmt.load(storage), snapshot)


@pytest.mark.parametrize("name", ["native", "fp32", "bf16"])
def test_dense_and_bf16_keep_non_finite(name):
    fmt = get_format(name)
    storage = fmt.zeros((3,), role="exp_avg")
    fmt.store(storage, np.array([np.nan, np.inf, -np.inf]), rng=np.random.default_rng(0))
    got = fmt.load(storage)
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf


@pytest.mark.parametrize("name", ["int8", "int8-companded"])
@pytest.mark.parametrize("shape", [(10,), BIG])
def test_int8_refuses_non_finite_and_negative_v_leaving_state(name, shape):
    fmt = get_format(name)
    rng = np.random.default_rng(0)
    for role in ("exp_avg", "exp_avg_sq"):
        storage = fmt.zeros(shape, role=role)
        fmt.store(storage, moment(role, shape, rng))
        before = {k: a.copy() for k, a in storage.arrays.items()}
        bad = moment(role, shape, rng)
        bad.reshape(-1)[3] = np.nan
        with pytest.raises(ValueError, match="non-finite"):
            fmt.store(storage, bad)
        bad.reshape(-1)[3] = 1e39  # finite in float64, inf in float32
        with pytest.raises(ValueError, match=r"overflows|non-finite"):
            fmt.store(storage, bad)
        if role == "exp_avg_sq":
            bad.reshape(-1)[3] = -1.0
            with pytest.raises(ValueError, match=">= 0"):
                fmt.store(storage, bad)
        for key, array in before.items():
            assert np.array_equal(storage.arrays[key], array)


@pytest.mark.parametrize("name", NAMES)
def test_store_argument_errors(name):
    fmt = get_format(name)
    storage = fmt.zeros(BIG, role="exp_avg")
    before = {k: a.copy() for k, a in storage.arrays.items()}
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="shape"):
        fmt.store(storage, np.ones((80, 64)), rng=rng)
    with pytest.raises(TypeError, match="real"):
        fmt.store(storage, np.full(BIG, "x"), rng=rng)
    other = get_format("fp32" if name != "fp32" else "bf16")
    with pytest.raises(ValueError, match="made by format"):
        fmt.load(other.zeros(BIG))
    for key, array in before.items():
        assert np.array_equal(storage.arrays[key], array)


def test_bf16_needs_rng():
    fmt = get_format("bf16")
    assert fmt.needs_rng and not get_format("int8").needs_rng
    with pytest.raises(TypeError, match="rng"):
        fmt.store(fmt.zeros((3,)), np.ones(3))
    with pytest.raises(ValueError, match="rounding"):
        Bf16Format(rounding="up")


def test_zeros_argument_errors():
    fmt = get_format("int8")
    with pytest.raises(ValueError, match="role"):
        fmt.zeros((3,), role="momentum")
    with pytest.raises(TypeError, match="role"):
        fmt.zeros((3,), role=1)
    with pytest.raises(ValueError, match="shape"):
        fmt.zeros((3, -1))
    with pytest.raises(TypeError, match="shape"):
        fmt.zeros((3.0,))
    with pytest.raises(TypeError, match="dtype"):
        fmt.zeros((3,), np.int32)
    with pytest.raises(ValueError, match="block"):
        QuantizedFormat("int8", block=0)


# ---------------------------------------------------------------- state dicts


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    shape=st.sampled_from([*SHAPES, (4096,), (4097,)]),
    role=st.sampled_from(ROLES),
    seed=st.integers(0, 2**32 - 1),
)
def test_state_dict_round_trip(name, shape, role, seed):
    rng = np.random.default_rng(seed)
    fmt = get_format(name)
    storage = fmt.zeros(shape, np.float32, role=role)
    fmt.store(storage, moment(role, shape, rng), rng=rng)
    d = fmt.to_state_dict(storage)
    assert d["format"] == name and d["version"] == 1 and d["shape"] == list(shape)
    assert all(isinstance(v, (np.ndarray, str, int, bool, list)) for v in d.values())
    back = fmt.from_state_dict(d, shape)
    assert back.encoding == storage.encoding and back.role == role
    for key, array in storage.arrays.items():
        assert back.arrays[key].dtype == array.dtype
        assert np.array_equal(back.arrays[key], array)
        assert not np.shares_memory(back.arrays[key], array)
        assert not np.shares_memory(d[key], array)
    assert np.array_equal(fmt.load(back), fmt.load(storage))
    assert from_state_dict(d, shape).encoding == storage.encoding


def test_state_dict_accepts_float_arrays_cast_by_torch():
    # torch.optim.Optimizer.load_state_dict casts floating state to the parameter's dtype.
    fmt = get_format("int8")
    storage = fmt.zeros(BIG)
    fmt.store(storage, np.random.default_rng(0).standard_normal(BIG))
    d = fmt.to_state_dict(storage)
    d["scales"] = d["scales"].astype(np.float64)
    assert np.array_equal(fmt.load(fmt.from_state_dict(d, BIG)), fmt.load(storage))


def test_hand_written_version_1_dicts_load():
    # Written from the documented layout, not by to_state_dict: a checkpoint of release 0.1.
    bf16_dict = {
        "format": "bf16",
        "version": 1,
        "encoding": "bf16",
        "role": "exp_avg",
        "shape": [3],
        "bits": np.array([0x3F80, 0xC000, 0x3F00], dtype=np.uint16),
    }
    assert list(from_state_dict(bf16_dict, (3,)).arrays["bits"]) == [0x3F80, 0xC000, 0x3F00]
    assert list(get_format("bf16").load(from_state_dict(bf16_dict, 3))) == [1.0, -2.0, 0.5]
    int8_dict = {
        "format": "int8",
        "version": 1,
        "encoding": "int8",
        "role": "exp_avg_sq",
        "shape": [2, 2500],
        "block": 256,
        "sqrt_second_moment": True,
        "codes": np.full(5000, 255, dtype=np.uint8),  # map entry 1.0: the block maximum
        "scales": np.full(20, 3.0, dtype=np.float32),
    }
    v = get_format("int8").load(from_state_dict(int8_dict, (2, 2500)))
    assert v.shape == (2, 2500) and np.all(v == 9.0)  # sqrt stored: 3.0 ** 2
    small = {
        "format": "int8",
        "version": 1,
        "encoding": "dense",
        "role": "exp_avg",
        "shape": [2],
        "values": np.array([0.5, -1.0], dtype=np.float32),
    }
    assert list(get_format("int8").load(from_state_dict(small, (2,)))) == [0.5, -1.0]


def _int8_dict():
    fmt = get_format("int8-blockwise")
    storage = fmt.zeros(BIG, role="exp_avg")
    fmt.store(storage, np.random.default_rng(0).standard_normal(BIG))
    return fmt.to_state_dict(storage)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.update(format="bf16"), "for format 'bf16'"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(role="momentum"), "role"),
        (lambda d: d.update(shape=[80, 64]), "shape"),
        (lambda d: d.update(encoding="dense"), "encoding"),
        (lambda d: d.update(block=128), "block"),
        (lambda d: d.update(sqrt_second_moment=False), "sqrt_second_moment"),
        (lambda d: d.update(codes=d["codes"][:-1]), "'codes' has 5119"),
        (lambda d: d.update(codes=d["codes"].astype(np.float32)), "integers"),
        (lambda d: d.update(codes=d["codes"].astype(np.int16) + 300), r"\[0, 255\]"),
        (lambda d: d.update(scales=d["scales"][:-1]), "'scales' has 19"),
        (lambda d: d.update(scales=-d["scales"]), ">= 0"),
        (lambda d: d.update(scales=d["scales"] * np.nan), "finite"),
        (lambda d: d.update(extra=1), "unexpected"),
        (lambda d: d.pop("codes"), "missing 'codes'"),
        (lambda d: d.pop("version"), "missing 'version'"),
    ],
)
def test_state_dict_refusals(change, match):
    d = _int8_dict()
    change(d)
    with pytest.raises(ValueError, match=match):
        get_format("int8-blockwise").from_state_dict(d, BIG)


def test_state_dict_refusals_other_formats():
    with pytest.raises(ValueError, match="unknown state format 'int4'"):
        from_state_dict({"format": "int4"}, (3,))
    with pytest.raises(TypeError, match="mapping"):
        get_format("fp32").from_state_dict([1, 2], (2,))
    with pytest.raises(ValueError, match="shape"):
        get_format("int8-blockwise").from_state_dict(_int8_dict(), (5120,))
    fmt = get_format("bf16")
    d = fmt.to_state_dict(fmt.zeros((4,)))
    with pytest.raises(ValueError, match="uint16"):
        fmt.from_state_dict({**d, "bits": d["bits"].astype(np.int32)}, (4,))
    with pytest.raises(ValueError, match="unexpected"):
        fmt.from_state_dict({**d, "rounding": "nearest"}, (4,))
    comp = get_format("int8-companded")
    d = comp.to_state_dict(comp.zeros(BIG, role="exp_avg"))
    d["codes"][0] = -128  # not a code of the symmetric signed range
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        comp.from_state_dict(d, BIG)
    dense = DenseFormat("fp32", np.dtype(np.float32))
    d = dense.to_state_dict(dense.zeros((2,)))
    with pytest.raises(ValueError, match="floating"):
        dense.from_state_dict({**d, "values": np.array([1, 2])}, (2,))


def test_formats_compare_by_value():
    assert QuantizedFormat("int8") == get_format("int8")
    assert QuantizedFormat("int8-blockwise") == get_format("int8-blockwise")
    assert QuantizedFormat("int8-companded", cp, 32, sqrt_second_moment=True) == get_format(
        "int8-companded"
    )
    assert QuantizedFormat("int8", block=128) != get_format("int8")
    assert QuantizedFormat("int8", cp, 32) != get_format("int8")


def test_int8_is_the_blockwise_code_and_companded_has_its_own_name():
    fmt = get_format("int8")
    assert fmt.codec is bw and fmt.block == 256 and fmt.sqrt_second_moment
    assert fmt.zeros(BIG, role="exp_avg").arrays["codes"].dtype == np.uint8
    companded = get_format("int8-companded")
    assert companded.codec is cp and companded.block == 32 and companded.sqrt_second_moment
    assert companded.zeros(BIG, role="exp_avg").arrays["codes"].dtype == np.int8
    assert companded.zeros(BIG, role="exp_avg_sq").arrays["codes"].dtype == np.uint8


def test_int8_nearest_v_sticks_stochastic_v_decays():
    # One element per block keeps v = 10 (its gradient continues); the others see g = 0 and
    # should decay as 0.999**t.  Nearest rounding cannot move them (0.1% < half a code gap).
    steps, n = 300, 8192
    expected = 0.999**steps
    results = {}
    for rounding in ("nearest", "stochastic"):
        fmt = QuantizedFormat("int8", rounding=rounding)
        assert fmt.needs_rng == (rounding == "stochastic")
        rng = np.random.default_rng(4)
        v0 = rng.uniform(0.5, 2.0, n)
        v0[::256] = 10.0
        storage = fmt.zeros((n,), role="exp_avg_sq")
        fmt.store(storage, v0, rng=rng)
        start = fmt.load(storage).copy()
        for _ in range(steps):
            v = fmt.load(storage) * np.float32(0.999)
            v[::256] = 10.0
            fmt.store(storage, v, rng=rng)
        decaying = np.ones(n, dtype=bool)
        decaying[::256] = False
        results[rounding] = fmt.load(storage)[decaying] / start[decaying]
    assert np.all(results["nearest"] == 1.0)
    assert abs(np.mean(results["stochastic"]) - expected) < 0.01


def test_int8_stochastic_needs_rng():
    fmt = QuantizedFormat("int8", rounding="stochastic")
    with pytest.raises(TypeError, match="rng"):
        fmt.store(fmt.zeros(BIG), np.ones(BIG))
    with pytest.raises(ValueError, match="rounding"):
        QuantizedFormat("int8", rounding="down")
