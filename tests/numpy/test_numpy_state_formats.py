"""``adamkit.numpy.Adam(..., state=...)``: compressed optimizer state in the NumPy front end.

Training with each format tracks ``state=None`` over 300 steps of a noisy least-squares problem
within ``TRACK_TOL`` (relative parameter difference, largest over 10 seeds: fp32 2.1e-7, bf16
0.011, int8 0.043) and ``LOSS_TOL`` (relative loss difference over the last 20 steps, largest
measured: bf16 0.0009, int8 0.091).  State dicts hold each format's compact form, resume
exactly, convert between every pair of formats within the target codec's error, and bad ones are
refused with nothing changed.
"""

from __future__ import annotations

import copy
import secrets

import numpy as np
import pytest

from adamkit.formats import Storage, get_format
from adamkit.formats.int8_blockwise import max_half_gap
from adamkit.numpy import Adam, AdamW
from adamkit.testing import assert_trees_equal, rel_diff

FORMATS = [None, "fp32", "bf16", "int8"]
TRACK_TOL = {"fp32": 1e-6, "bf16": 0.04, "int8": 0.12}
LOSS_TOL = {"fp32": 1e-6, "bf16": 0.01, "int8": 0.2}


def _problem(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    y = x @ rng.standard_normal((64, 96)).astype(np.float32)
    return x, y


def _train(state, seed, steps=300, params=None, opt=None, start=0, **kwargs):
    """Minibatch least squares on a (64, 96) weight (int8 codes) and a bias (fp32 by the rule)."""
    x, y = _problem(seed)
    if params is None:
        params = [np.zeros((64, 96), np.float32), np.zeros(96, np.float32)]
    if opt is None:
        opt = Adam(params, lr=1e-2, state=state, seed=seed, **kwargs)
    w, b = params
    losses = []
    for t in range(start, steps):
        idx = np.random.default_rng((seed, t)).integers(0, 256, 32)
        r = x[idx] @ w + b - y[idx]
        losses.append(0.5 * float((r**2).mean()))
        opt.step([(x[idx].T @ r / r.size).astype(np.float32), r.sum(0) / r.size])
    return params, opt, losses


@pytest.mark.parametrize("state", ["fp32", "bf16", "int8"])
def test_training_tracks_full_precision_state(state):
    seed = secrets.randbits(31)
    (w0, _), _, base = _train(None, seed)
    (w, _), opt, losses = _train(state, seed)
    diff = rel_diff(w, w0)
    loss_diff = abs(np.mean(losses[-20:]) - np.mean(base[-20:])) / np.mean(base[-20:])
    assert diff <= TRACK_TOL[state], f"seed={seed}: parameter difference {diff:.3g}"
    assert loss_diff <= LOSS_TOL[state], f"seed={seed}: loss difference {loss_diff:.3g}"
    assert losses[-1] < 0.1 * losses[0], f"seed={seed}: did not train"
    # the weight has the group's format; under int8 the 1-d bias keeps float32 moments
    bias_format = "fp32" if state == "int8" else state
    assert opt.state[0]["exp_avg"].format == state
    assert opt.state[1]["exp_avg"].format == bias_format


def test_group_state_overrides_the_default_and_none_means_arrays():
    rng = np.random.default_rng(secrets.randbits(31))
    params = [rng.standard_normal((64, 96)).astype(np.float32) for _ in range(3)]
    opt = AdamW(
        [
            {"params": [params[0]]},
            {"params": [params[1]], "state": "fp32"},  # a group the user marks
            {"params": [params[2]], "state": None},
        ],
        state="int8",
    )
    opt.step([np.ones_like(p) for p in params])
    assert [g["state"] for g in opt.param_groups] == ["int8", "fp32", None]
    assert opt.state[0]["exp_avg"].format == "int8" and opt.state[1]["exp_avg"].format == "fp32"
    assert isinstance(opt.state[2]["exp_avg"], np.ndarray)
    sd = opt.state_dict()
    assert [g.get("state") for g in sd["param_groups"]] == ["int8", "fp32", None]
    assert "state" not in sd["param_groups"][2]  # state=None groups are saved as before


def test_changing_a_groups_state_mid_run_re_encodes():
    seed = secrets.randbits(31)
    (w, b), opt, _ = _train("fp32", seed, steps=20)
    moment = opt.state[0]["exp_avg"].arrays["values"].copy()
    opt.param_groups[0]["state"] = "int8"
    _train("int8", seed, steps=21, params=[w, b], opt=opt, start=20)
    assert opt.state[0]["exp_avg"].format == "int8" and opt.state[0]["step"] == 21
    with pytest.raises(ValueError, match=r"param_groups\[0\]: Unknown state format 'int9'"):
        opt.param_groups[0]["state"] = "int9"
        opt.step([np.zeros_like(w), np.zeros_like(b)])
    assert moment.shape == w.shape


@pytest.mark.parametrize("state", ["fp32", "bf16", "int8"])
def test_resume_from_state_dict_is_exact(state):
    seed = secrets.randbits(31)
    full, _, _ = _train(state, seed, steps=40)
    params, opt, _ = _train(state, seed, steps=25)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"][0]["exp_avg"]["format"] == state and "rng" in sd
    resumed = [p.copy() for p in params]
    opt2 = Adam(resumed, lr=1e-2, state=state, seed=seed + 1)  # another seed: the dict's rng wins
    opt2.load_state_dict(sd)
    _train(state, seed, steps=40, params=resumed, opt=opt2, start=25)
    for p, q in zip(resumed, full, strict=True):
        assert np.array_equal(p, q), f"seed={seed}"


def _decoded(opt, index, role):
    moment = opt.state[index][role]
    if isinstance(moment, Storage):
        return get_format(moment.format).load(moment).astype(np.float64)
    return moment.astype(np.float64)


def _bound(target, values, role):
    """Largest error of storing ``values`` in ``target`` (per tensor, as max|x| multiples)."""
    scale = np.abs(values).max()
    if target in (None, "fp32"):
        return 1e-7 * scale
    if target == "bf16":
        return 2**-7 * scale
    if role == "exp_avg":  # block absmax <= tensor absmax
        return (max_half_gap(True) + 2**-22) * scale
    root = np.sqrt(scale)  # second moments are stored as sqrt(v)
    return ((root + (max_half_gap(False) + 2**-22) * root) ** 2 - root**2) * 1.01


@pytest.mark.parametrize("target", FORMATS, ids=str)
@pytest.mark.parametrize("source", FORMATS, ids=str)
def test_state_dict_converts_between_formats(source, target):
    seed = secrets.randbits(31)
    _, opt, _ = _train(source, seed, steps=10, amsgrad=True)
    params = [np.zeros((64, 96), np.float32), np.zeros(96, np.float32)]
    other = Adam(params, lr=1e-2, state=target, amsgrad=True)
    other.load_state_dict(opt.state_dict())
    for role in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        before, after = _decoded(opt, 0, role), _decoded(other, 0, role)
        err = np.abs(after - before).max()
        assert err <= _bound(target, before, role), f"seed={seed} {role}: {err:.3g}"
        moment = other.state[0][role]
        assert (moment.format if isinstance(moment, Storage) else None) == target
        if target == source:  # same format: taken exactly
            assert np.array_equal(after, before)
    assert other.param_groups[0]["state"] == target  # the optimizer's format, not the dict's


def _trained_int8():
    _, opt, _ = _train("int8", secrets.randbits(31), steps=3)
    return opt


def _edit_codes_length(sd):
    sd["state"][0]["exp_avg"]["codes"] = sd["state"][0]["exp_avg"]["codes"][:-1]


def _edit_format(sd):
    sd["state"][0]["exp_avg_sq"]["format"] = "int4"


def _edit_shape(sd):
    sd["state"][0]["exp_avg"]["shape"] = [96, 64]


def _edit_group_state(sd):
    sd["param_groups"][0]["state"] = "int4"


def _edit_rng(sd):
    sd["rng"] = {"bit_generator": "PCG64", "state": "nonsense"}


def _edit_role(sd):
    sd["state"][0]["exp_avg"], sd["state"][0]["exp_avg_sq"] = (
        sd["state"][0]["exp_avg_sq"],
        sd["state"][0]["exp_avg"],
    )


def _edit_scales(sd):
    sd["state"][0]["exp_avg"]["scales"][2] = np.nan


BAD = [
    ("code length", _edit_codes_length, r"'codes' has 6143 entries, expected 6144"),
    ("unknown format", _edit_format, r"unknown state format 'int4'"),
    ("shape", _edit_shape, r"saved for shape \(96, 64\), the parameter has \(64, 96\)"),
    ("group state", _edit_group_state, r"Unknown state format 'int4'"),
    ("rng", _edit_rng, r"state_dict\['rng'\] is not a valid PCG64 state"),
    ("role", _edit_role, r"holds the role 'exp_avg_sq', expected 'exp_avg'"),
    ("scales", _edit_scales, r"'scales' must be finite and >= 0"),
]


@pytest.mark.parametrize(("edit", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_state_dicts_are_refused_and_change_nothing(edit, match):
    opt = _trained_int8()
    sd = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(sd)
    edit(sd)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_trees_equal(opt.state_dict(), before, "optimizer after a refused load")


def test_non_finite_into_int8_is_refused_on_load_and_on_step():
    seed = secrets.randbits(31)
    _, opt, _ = _train(None, seed, steps=3)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"][1, 2] = np.inf
    int8 = _trained_int8()
    before = copy.deepcopy(int8.state_dict())
    with pytest.raises(ValueError, match=r"\['state'\]\[0\]: exp_avg has non-finite values"):
        int8.load_state_dict(sd)
    grads = [np.ones((64, 96), np.float32), np.ones(96, np.float32)]
    grads[0][5, 5] = np.nan
    weights = [p.copy() for p in int8.param_groups[0]["params"]]
    with pytest.raises(ValueError, match=r"grads\[0\] has non-finite values, which state='int8'"):
        int8.step(grads)
    assert_trees_equal(int8.state_dict(), before, "optimizer after refusals")
    for p, q in zip(int8.param_groups[0]["params"], weights, strict=True):
        assert np.array_equal(p, q)
    bf16 = Adam([np.zeros((4, 4), np.float32)], state="bf16")
    bf16.step([np.full((4, 4), np.nan, np.float32)])  # bf16 holds NaN like float32 does
    assert np.isnan(_decoded(bf16, 0, "exp_avg")).all()


def test_state_bytes_per_parameter():
    n = 1024 * 1024
    per_param = {}
    for state in FORMATS:
        opt = Adam([np.zeros((1024, 1024), np.float32)], state=state)
        opt.step([np.ones((1024, 1024), np.float32)])
        per_param[state] = opt.state_nbytes() / n
    assert per_param == {None: 8.0, "fp32": 8.0, "bf16": 4.0, "int8": 2 + 2 * 4 / 256}


def test_option_errors():
    p = [np.zeros((4, 4))]
    with pytest.raises(ValueError, match=r"Unknown state format 'int4'"):
        Adam(p, state="int4")
    with pytest.raises(TypeError, match=r"param_groups\[0\]: state must be None or a format name"):
        Adam([{"params": p, "state": 8}])
    with pytest.raises(TypeError, match=r"seed must be None or an int >= 0, got int -1"):
        Adam(p, seed=-1)


@pytest.mark.parametrize("state", ["fp32", "bf16", "int8"])
def test_gradients_are_never_written(state):
    rng = np.random.default_rng(secrets.randbits(31))
    params = [rng.standard_normal((64, 96)), rng.standard_normal(96).astype(np.float32)]
    grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in params]
    saved = [g.copy() for g in grads]
    opt = Adam(params, state=state, amsgrad=True, weight_decay=0.1, maximize=True)
    for _ in range(3):
        opt.step(grads)
    for g, s in zip(grads, saved, strict=True):
        assert np.array_equal(g, s)
