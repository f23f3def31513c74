"""``state=`` (fp32, bf16 moments) and ``guard=`` (non-finite skip) on the Keras front end.

Runs on every backend (the JAX child run of ``test_keras_backends.py`` picks it up): ``model.fit``
traces the step there (``jit``), so the guard and the formats are checked under tracing too.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from _keras_helpers import mlp, regression_data, to_numpy  # noqa: E402

from adamkit.core.config import AdamHyperParams  # noqa: E402
from adamkit.core.reference import adam_step, init_state  # noqa: E402
from adamkit.guard import GuardConfig  # noqa: E402
from adamkit.keras import Adam, AdamW  # noqa: E402
from adamkit.testing import assert_rel_close, rel_diff, seeded_rng  # noqa: E402

ops = keras.ops
SHAPES = ((6, 5), (7,), ())


def _variables(params, dtype="float32"):
    return [keras.Variable(p, dtype=dtype, name=f"p{i}") for i, p in enumerate(params)]


def _apply(optimizer, grads, variables):
    optimizer.apply([ops.convert_to_tensor(g) for g in grads], variables)


def _f32(x):
    """As float32 NumPy (exact for bfloat16, which NumPy cannot hold)."""
    return to_numpy(ops.cast(x.value if isinstance(x, keras.Variable) else x, "float32"))


def _value(variable):
    """A variable's value as NumPy, bfloat16 widened to float32 (exactly)."""
    if keras.backend.standardize_dtype(variable.dtype) == "bfloat16":
        return _f32(variable)
    return to_numpy(variable)


def _moments(optimizer, name):
    """``{torch key: (dtype, float32/64 values)}`` for the model variable called ``name``."""
    found = {}
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        for v in optimizer.variables:
            if v.path.endswith(f"/{name}_{key}"):
                found[key] = (keras.backend.standardize_dtype(v.dtype), _value(v))
    return found


# -- state= ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [(Adam, {"amsgrad": True}), (AdamW, {"weight_decay": 0.1})],
    ids=["amsgrad", "adamw"],
)
def test_bf16_state_tracks_fp32_state_over_100_steps(cls, kwargs):
    rng = seeded_rng("keras-bf16-vs-fp32", cls.__name__, *kwargs)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    runs = {
        state: (cls(learning_rate=1e-2, state=state, **kwargs), _variables(params))
        for state in ("fp32", "bf16")
    }
    for step in range(100):
        grads = [(rng.standard_normal(s) * (1 + step % 3) + 0.3).astype(np.float32) for s in SHAPES]
        for optimizer, variables in runs.values():
            _apply(optimizer, grads, variables)
    (fp32, fp32_vars), (bf16, bf16_vars) = runs.values()
    for i, (a, b, p) in enumerate(zip(bf16_vars, fp32_vars, params, strict=True)):
        assert to_numpy(a).dtype == np.float32
        # Stochastic rounding of m, v (up to 2**-8 relative per store, averaged by the EMAs)
        # moves the displacement by 2e-4 to 9e-3 (measured on torch and JAX); a wrong dtype
        # policy (e.g. the step computed in bf16) or a wrong step is off by more than 3e-2.
        assert_rel_close(to_numpy(a) - p, to_numpy(b) - p, 3e-2, f"p{i} displacement")
        assert rel_diff(to_numpy(a), to_numpy(b)) > 0, "bf16 rounding should show"
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if kwargs.get("amsgrad") else [])
    ours = [_moments(bf16, f"p{i}") for i in range(len(SHAPES))]
    ref = [_moments(fp32, f"p{i}") for i in range(len(SHAPES))]
    for key in keys:
        assert {m[key][0] for m in ours} == {"bfloat16"}
        assert {m[key][0] for m in ref} == {"float32"}
        # all variables' entries together: a 0-d moment near zero has no relative accuracy
        a = np.concatenate([m[key][1].ravel() for m in ours])
        b = np.concatenate([m[key][1].ravel() for m in ref])
        # measured 3e-3 to 2.5e-2: the rounding noise of the last ~10 (m) stores
        assert_rel_close(a, b, 6e-2, key)
        # every stored value is a bfloat16 number (the low 16 bits of its float32 are zero)
        assert not np.any(a.astype(np.float32).view(np.uint32) & 0xFFFF)
    moments = [v for v in bf16.variables if "exp_avg" in v.path]
    assert len(moments) == len(SHAPES) * len(keys)


def test_bf16_state_rounds_stochastically_without_bias():
    # beta_1 = 0 and zero moments: after one step exp_avg holds the rounded gradient itself.
    x = np.float32(1.0 + 2.0**-10)  # a quarter of the way from bf16's 1.0 to 1.0 + 2**-7
    grads = [np.full(20000, x, np.float32), np.array([-x, np.inf, -np.inf, np.nan], np.float32)]
    variables = _variables([np.zeros_like(g) for g in grads])
    optimizer = Adam(beta_1=0.0, state="bf16")
    _apply(optimizer, grads, variables)
    (_, stored), (_, special) = (_moments(optimizer, f"p{i}")["exp_avg"] for i in range(2))
    assert set(np.unique(stored)) == {np.float32(1.0), np.float32(1.0 + 2.0**-7)}
    # unbiased: the mean is x (nearest rounding would give 1.0, 2**-10 = 9.8e-4 too low); the
    # standard error of the mean is 2**-7 * sqrt(0.25 * 0.75 / 20000) = 7.6e-5: allow 5 of them
    assert abs(stored.mean(dtype=np.float64) - x) < 3.8e-4
    assert special[0] in (-1.0, -(1.0 + 2.0**-7))
    np.testing.assert_array_equal(special[1:], grads[1][1:])  # non-finite values pass unchanged


def test_fp32_state_on_bfloat16_variables_follows_the_reference():
    hp = AdamHyperParams(lr=float(np.float32(0.05)), weight_decay=0.01)
    rng = seeded_rng("keras-fp32-state-on-bf16")
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    variables = _variables(params, "bfloat16")
    start = [_f32(v).astype(np.float64) for v in variables]
    states = [init_state(p, amsgrad=False) for p in start]
    optimizer = Adam(learning_rate=hp.lr, weight_decay=hp.weight_decay, state="fp32")
    native = Adam(learning_rate=hp.lr, weight_decay=hp.weight_decay)
    native_vars = _variables(params, "bfloat16")
    for step in range(1, 11):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        tensors = [ops.cast(ops.convert_to_tensor(g), "bfloat16") for g in grads]
        before = [_f32(v).astype(np.float64) for v in variables]
        optimizer.apply(tensors, variables)
        native.apply(tensors, native_vars)
        for i, tensor in enumerate(tensors):
            # the reference, in float64, from the same bf16 gradient and the current bf16 param
            state = states[i]._replace(step=step - 1)
            expected, states[i] = adam_step(before[i], _f32(tensor).astype(np.float64), state, hp)
            assert keras.backend.standardize_dtype(variables[i].dtype) == "bfloat16"
            # the new bf16 variable is the reference step rounded to nearest: within half an ulp
            assert_rel_close(_f32(variables[i]), expected, 2.0**-8, f"step {step} p{i}")
            ours = _moments(optimizer, f"p{i}")
            assert set(ours) == {"exp_avg", "exp_avg_sq"}
            for key, (dtype, value) in ours.items():
                assert dtype == "float32"
                # float32 moments fed by the actual bf16 parameter: float32 roundings only
                assert_rel_close(value, getattr(states[i], key), 1e-6, f"step {step} {key}")
    native_moments = [v for v in native.variables if "exp_avg" in v.path]
    assert {keras.backend.standardize_dtype(v.dtype) for v in native_moments} == {"bfloat16"}
    fp32_moments = [v for v in optimizer.variables if "exp_avg" in v.path]
    assert {keras.backend.standardize_dtype(v.dtype) for v in fp32_moments} == {"float32"}


def test_state_none_and_fp32_agree_exactly_on_float32_variables():
    rng = seeded_rng("keras-fp32-vs-native")
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    runs = [
        (Adam(learning_rate=1e-2, amsgrad=True, state=s), _variables(params))
        for s in (None, "fp32")
    ]
    for _ in range(20):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        for optimizer, variables in runs:
            _apply(optimizer, grads, variables)
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-7)


# -- guard= ---------------------------------------------------------------------------------------


def _snapshot(optimizer, variables):
    return [_value(v) for v in (*variables, *optimizer.variables)]


@pytest.mark.parametrize("state", [None, "bf16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_changes_nothing_but_the_counter(state, bad):
    rng = seeded_rng("keras-guard-apply", state, bad)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    guarded, variables = (
        AdamW(learning_rate=1e-2, amsgrad=True, guard=True, state=state),
        _variables(params),
    )
    plain = AdamW(learning_rate=1e-2, amsgrad=True, state=state)
    plain_vars = _variables(params)
    for optimizer, v in ((guarded, variables), (plain, plain_vars)):
        keras.utils.set_random_seed(7)  # the same bf16 rounding noise in both
        optimizer.build(v)
    for step in range(8):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        if step == 4:  # one bad entry in one tensor poisons the whole step
            before = _snapshot(guarded, variables)
            grads[0][2, 3] = bad
            _apply(guarded, grads, variables)
            after = _snapshot(guarded, variables)
            names = [v.path for v in (*variables, *guarded.variables)]
            for name, a, b in zip(names, after, before, strict=True):
                if name.endswith("skipped_steps"):
                    assert int(a) == int(b) + 1
                else:
                    np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        _apply(guarded, grads, variables)
        _apply(plain, grads, plain_vars)
    assert int(to_numpy(guarded.skipped_steps)) == 1
    assert int(to_numpy(guarded.iterations)) == int(to_numpy(plain.iterations)) == 7
    # with finite gradients the guard only selects the new values: the same numbers (for bf16
    # also the same random bits: the skipped step restored the rounding generator's state)
    for a, b in zip(variables, plain_vars, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.parametrize(
    "options",
    [{}, {"gradient_accumulation_steps": 2, "use_ema": True, "clipnorm": 1.0}],
    ids=["plain", "accumulation-ema-clipnorm"],
)
def test_fit_with_a_nan_batch_ends_where_training_without_it_ends(options):
    # The skipped batch leaves no trace anywhere: not in the accumulators, the EMA, nor the step.
    batch, steps, bad_step = 16, 8, 3
    x, y = regression_data(steps, batch, "keras-guard-fit", *options)
    poisoned = x.copy()
    poisoned[bad_step * batch + 5, 2] = np.nan
    keep = np.r_[0 : bad_step * batch, (bad_step + 1) * batch : steps * batch]

    def fit(x, y, **kwargs):
        model = mlp(0)
        optimizer = Adam(learning_rate=1e-2, **options, **kwargs)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        return model, optimizer

    model, optimizer = fit(poisoned, y, guard=True)
    clean_model, clean_optimizer = fit(x[keep], y[keep], guard=True)
    assert int(to_numpy(optimizer.skipped_steps)) == 1
    assert int(to_numpy(clean_optimizer.skipped_steps)) == 0
    expected = 7 // options.get("gradient_accumulation_steps", 1)
    assert int(to_numpy(optimizer.iterations)) == int(to_numpy(clean_optimizer.iterations))
    assert int(to_numpy(optimizer.iterations)) == expected
    for a, b in zip(model.get_weights(), clean_model.get_weights(), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_array_equal(a, b)
    for a, b in zip(optimizer.variables, clean_optimizer.variables, strict=True):
        if not a.path.endswith("skipped_steps"):
            np.testing.assert_array_equal(_value(a), _value(b), err_msg=a.path)
    # the guard is only a selection: the unguarded optimizer on the clean batches agrees
    plain_model, _ = fit(x[keep], y[keep])
    for a, b in zip(model.get_weights(), plain_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # and without the guard the NaN batch destroys the weights
    ruined, _ = fit(poisoned, y)
    assert not np.all(np.isfinite(ruined.get_weights()[0]))


# -- options, errors, serialization ----------------------------------------------------------------


@pytest.mark.backend_independent
@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"state": "int8"},
            NotImplementedError,
            "state='int8' is available in adamkit.torch and adamkit.numpy; not on the Keras "
            "front end yet",
        ),
        ({"state": "int8-companded"}, NotImplementedError, "not on the Keras front end yet"),
        (
            {"state": "fp16"},
            ValueError,
            "Unknown state format 'fp16' (state must be None or one of",
        ),
        ({"state": 16}, TypeError, "state must be None or a format name ('fp32', 'bf16'), got int"),
        (
            {"guard": "all"},
            NotImplementedError,
            "guard='all' is not available on the Keras front end yet: it offers only the "
            "non-finite skip (guard=True or 'default')",
        ),
        ({"guard": {"update_clip": "rms"}}, NotImplementedError, "offers only the non-finite skip"),
        ({"guard": "on"}, ValueError, "Invalid guard: 'on' (guard must be True, False, None"),
        ({"guard": {"skip_nan": True}}, TypeError, "skip_nan"),
        ({"guard": 1}, TypeError, "guard must be True, False, None"),
    ],
    ids=lambda v: str(v) if not isinstance(v, type) else v.__name__,
)
def test_unavailable_or_unknown_options_are_refused(cls, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        cls(**kwargs)


@pytest.mark.backend_independent
@pytest.mark.parametrize(
    ("guard", "on"),
    [
        (None, False),
        (False, False),
        ("off", False),
        (True, True),
        ("default", True),
        ({"skip_nonfinite": True}, True),
        (GuardConfig(), True),
        (GuardConfig(skip_nonfinite=False), False),
    ],
    ids=str,
)
def test_guard_spellings(guard, on):
    optimizer = Adam(guard=guard)
    assert (optimizer.skipped_steps is not None) is on
    assert optimizer.get_config()["guard"] == (
        True if on and not isinstance(guard, (bool, str)) else guard
    )


@pytest.mark.backend_independent
@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize(
    ("state", "guard"), [("fp32", True), ("bf16", "default"), ("native", None), (None, "off")]
)
def test_config_round_trip(cls, state, guard):
    optimizer = cls(learning_rate=3e-3, amsgrad=True, state=state, guard=guard)
    config = optimizer.get_config()
    assert config["state"] == (None if state == "native" else state)
    assert config["guard"] == guard
    restored = cls.from_config(config)
    assert restored.get_config() == config
    assert (restored.skipped_steps is None) == (optimizer.skipped_steps is None)
    assert (
        keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)).get_config() == config
    )


def test_save_load_keeps_state_dtype_and_counters(tmp_path):
    batch = 16
    x, y = regression_data(12, batch, "keras-guard-saving")
    x = x.copy()
    x[2 * batch + 1, 0] = np.inf
    model = mlp(0)
    optimizer = AdamW(learning_rate=1e-2, amsgrad=True, state="bf16", guard=True)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x[: 6 * batch], y[: 6 * batch], batch_size=batch, epochs=1, shuffle=False, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)

    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is AdamW
    assert loaded.optimizer.get_config() == optimizer.get_config()
    assert int(to_numpy(loaded.optimizer.skipped_steps)) == 1
    assert int(to_numpy(loaded.optimizer.iterations)) == 5
    moments = [v for v in loaded.optimizer.variables if "exp_avg" in v.path]
    assert len(moments) == 18  # 3 Dense layers x (kernel, bias) x (m, v, v_max)
    assert {keras.backend.standardize_dtype(v.dtype) for v in moments} == {"bfloat16"}
    for a, b in zip(loaded.optimizer.variables, optimizer.variables, strict=True):
        assert a.dtype == b.dtype, a.path
        np.testing.assert_array_equal(_f32(a), _f32(b), err_msg=a.path)

    rest = (x[6 * batch :], y[6 * batch :])
    rest[0][batch + 3, 1] = np.nan
    for m in (model, loaded):
        m.fit(*rest, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    assert int(to_numpy(loaded.optimizer.skipped_steps)) == 2
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
