"""state_dict / load_state_dict of adamkit.numpy.Adam: exact round trips and every rejection."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from _numpy_helpers import (
    assert_unchanged,
    grouped,
    make_grads,
    make_params,
    snapshot,
    trained_optimizer,
)

from adamkit.numpy import STATE_FORMAT, Adam, AdamW
from adamkit.testing import assert_trees_equal, seeded_rng

STEPS, SAVE_AT = 30, 12


def _grads_for(t, grads):
    # parameter 1 gets no gradient before step 5 and parameter 3 none on odd steps, so the
    # saved state has entries with different step counts (and some still missing at save time)
    return [None if (i == 1 and t < 5) or (i == 3 and t % 2) else g for i, g in enumerate(grads)]


@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_resume_after_load_is_bit_identical_to_an_uninterrupted_run(cls):
    rng = seeded_rng("round-trip", cls.__name__)
    start = make_params(rng)
    grads = [_grads_for(t, make_grads(rng, start)) for t in range(1, STEPS + 1)]

    full = [p.copy() for p in start]
    uninterrupted = cls(grouped(full))
    for t, g in enumerate(grads, 1):
        if t == 20:
            uninterrupted.param_groups[0]["lr"] = 1e-4
        uninterrupted.step(g)

    first = [p.copy() for p in start]
    before = cls(grouped(first))
    for g in grads[:SAVE_AT]:
        before.step(g)
    saved = pickle.loads(pickle.dumps(before.state_dict()))  # as if written to disk
    resumed_params = [p.copy() for p in first]
    # different hyper-parameters on purpose: loading must restore the saved ones
    resumed = cls(grouped(resumed_params), lr=0.5, betas=(0.5, 0.5))
    resumed.param_groups[2]["eps"] = 0.25
    resumed.load_state_dict(saved)
    assert_trees_equal(resumed.state_dict(), saved, "state_dict after load")
    for t, g in enumerate(grads[SAVE_AT:], SAVE_AT + 1):
        if t == 20:
            resumed.param_groups[0]["lr"] = 1e-4
        resumed.step(g)

    for p, q in zip(resumed_params, full, strict=True):
        assert p.dtype == q.dtype and np.array_equal(p, q)
    assert_trees_equal(resumed.state_dict(), uninterrupted.state_dict(), "final state")


def test_state_dict_layout_and_copies():
    rng = seeded_rng("layout")
    opt, params = trained_optimizer(rng)
    sd = opt.state_dict()
    assert sd["format"] == STATE_FORMAT == "adamkit.numpy.Adam" and sd["version"] == 1
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3], [4, 5]]
    assert [g["name"] for g in sd["param_groups"]] == ["encoder", "head", "extra"]
    assert sd["param_groups"][0] == {
        "lr": 3e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.05,
        "amsgrad": True,
        "maximize": False,
        "bias_correction": True,
        "decoupled_weight_decay": False,
        "name": "encoder",
        "params": [0, 1],
    }
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert set(sd["state"][4]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][4]["exp_avg"].dtype == np.float32 and type(sd["state"][4]["step"]) is int

    # no aliasing in either direction
    saved = copy.deepcopy(sd)
    opt.step(make_grads(rng, params))
    assert_trees_equal(sd, saved, "state_dict after a later step")
    opt.load_state_dict(sd)
    sd["state"][0]["exp_avg"][...] = 123.0
    sd["param_groups"][0]["lr"] = 9.0
    assert_trees_equal(opt.state_dict(), saved, "optimizer after editing the loaded dict")


def test_load_keeps_current_names_when_the_saved_ones_are_missing():
    rng = seeded_rng("names")
    opt, params = trained_optimizer(rng)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        group["name"] = None
    other = Adam(grouped([p.copy() for p in params]))
    other.load_state_dict(sd)
    assert [g["name"] for g in other.param_groups] == ["encoder", "head", "extra"]


def test_loading_an_adam_dict_configures_adamw_groups_from_the_dict():
    rng = seeded_rng("adam-into-adamw")
    opt, params = trained_optimizer(rng)
    target = AdamW(grouped([p.copy() for p in params]))
    target.load_state_dict(opt.state_dict())
    assert [g["decoupled_weight_decay"] for g in target.param_groups] == [False] * 3


def _set(path, value):
    def edit(sd):
        *head, last = path
        node = sd
        for key in head:
            node = node[key]
        node[last] = value

    return edit


def _delete(path):
    def edit(sd):
        *head, last = path
        node = sd
        for key in head:
            node = node[key]
        del node[last]

    return edit


def _move_state(sd):
    sd["state"][99] = sd["state"].pop(0)


def _string_key(sd):
    sd["state"]["0"] = sd["state"].pop(0)


def _repeat_index(sd):
    sd["param_groups"][1]["params"] = [0, 3]


def _drop_group(sd):
    sd["param_groups"].pop()


def _grow_group(sd):
    sd["param_groups"][2]["params"].append(6)


def _amsgrad_on_without_max(sd):
    sd["param_groups"][1]["amsgrad"] = True


def _amsgrad_off_with_max(sd):
    sd["param_groups"][0]["amsgrad"] = False


# (id, edit of a valid state_dict, exception, regex)
BAD_DICTS = [
    (
        "format",
        _set(["format"], "torch.optim.Adam"),
        ValueError,
        r"\['format'\] must be 'adamkit.numpy.Adam', got 'torch.optim.Adam'",
    ),
    (
        "newer version",
        _set(["version"], 2),
        ValueError,
        r"\['version'\] 2 is not supported \(this adamkit reads version 1\)",
    ),
    ("version as str", _set(["version"], "1"), ValueError, r"\['version'\] '1' is not supported"),
    ("missing state", _delete(["state"]), ValueError, r"state_dict lacks the key 'state'"),
    ("extra key", _set(["extra"], 1), ValueError, r"state_dict has unknown key 'extra'"),
    (
        "groups not a list",
        _set(["param_groups"], {}),
        TypeError,
        r"\['param_groups'\] must be a list, got dict",
    ),
    (
        "group count",
        _drop_group,
        ValueError,
        r"state_dict has 2 parameter groups, the optimizer has 3",
    ),
    (
        "group size",
        _grow_group,
        ValueError,
        r"\['param_groups'\]\[2\] has 3 parameters, param_groups\[2\] has 2",
    ),
    (
        "repeated index",
        _repeat_index,
        ValueError,
        r"\['param_groups'\]\[1\]\['params'\] repeats the index 0",
    ),
    (
        "index type",
        _set(["param_groups", 0, "params"], [0.0, 1.0]),
        TypeError,
        r"\['params'\] must be a list of int indices",
    ),
    (
        "name",
        _set(["param_groups", 1, "name"], "decoder"),
        ValueError,
        r"\['name'\] is 'decoder', but param_groups\[1\] is named 'head'",
    ),
    (
        "group lr",
        _set(["param_groups", 2, "lr"], -1.0),
        ValueError,
        r"^state_dict\['param_groups'\]\[2\]: Invalid learning rate: -1\.0",
    ),
    (
        "group betas",
        _set(["param_groups", 0, "betas"], (0.9, 1.5)),
        ValueError,
        r"Invalid beta parameter at index 1: 1\.5",
    ),
    (
        "group flag",
        _set(["param_groups", 0, "maximize"], "no"),
        TypeError,
        r"maximize must be True or False",
    ),
    (
        "group missing key",
        _delete(["param_groups", 1, "eps"]),
        ValueError,
        r"\['param_groups'\]\[1\] lacks the key 'eps'",
    ),
    (
        "group unknown key",
        _set(["param_groups", 1, "momentum"], 0.9),
        ValueError,
        r"\['param_groups'\]\[1\] has unknown key 'momentum'",
    ),
    (
        "state not a dict",
        _set(["state"], []),
        TypeError,
        r"state_dict\['state'\] must be a dict, got list",
    ),
    (
        "unknown index",
        _move_state,
        ValueError,
        r"state_dict\['state'\] has index 99, which no group lists",
    ),
    (
        "index as str",
        _string_key,
        TypeError,
        r"state_dict\['state'\] keys must be int indices, got '0'",
    ),
    (
        "entry type",
        _set(["state", 2], None),
        TypeError,
        r"\['state'\]\[2\] must be a dict, got NoneType",
    ),
    (
        "missing moment",
        _delete(["state", 2, "exp_avg"]),
        ValueError,
        r"\['state'\]\[2\] lacks the key 'exp_avg'",
    ),
    (
        "extra entry",
        _set(["state", 2, "momentum_buffer"], np.zeros((2, 2, 2))),
        ValueError,
        r"\['state'\]\[2\] has unknown key 'momentum_buffer'",
    ),
    (
        "step float",
        _set(["state", 2, "step"], 2.0),
        TypeError,
        r"\['state'\]\[2\]\['step'\] must be an int, got float",
    ),
    (
        "step bool",
        _set(["state", 2, "step"], True),
        TypeError,
        r"\['step'\] must be an int, got bool",
    ),
    (
        "step negative",
        _set(["state", 2, "step"], -1),
        ValueError,
        r"\['state'\]\[2\]\['step'\] must be >= 0, got -1",
    ),
    (
        "shape",
        _set(["state", 0, "exp_avg"], np.zeros((3, 4))),
        ValueError,
        r"\['state'\]\[0\]\['exp_avg'\] has shape \(3, 4\), expected \(4, 3\)",
    ),
    (
        "0-d shape",
        _set(["state", 3, "exp_avg_sq"], np.zeros(1)),
        ValueError,
        r"\['exp_avg_sq'\] has shape \(1,\), expected \(\)",
    ),
    (
        "dtype",
        _set(["state", 4, "exp_avg"], np.zeros(5)),
        TypeError,
        r"\['state'\]\[4\]\['exp_avg'\] has dtype float64, expected float32",
    ),
    (
        "not an array",
        _set(["state", 2, "exp_avg"], [[[0.0] * 2] * 2] * 2),
        TypeError,
        r"\['exp_avg'\] must be a numpy.ndarray, got list",
    ),
    (
        "negative second moment",
        _set(["state", 2, "exp_avg_sq"], -np.ones((2, 2, 2))),
        ValueError,
        r"\['exp_avg_sq'\] has negative entries",
    ),
    (
        "amsgrad without max",
        _amsgrad_on_without_max,
        ValueError,
        r"\['state'\]\[2\] lacks 'max_exp_avg_sq', which its group's amsgrad=True needs",
    ),
    (
        "max without amsgrad",
        _amsgrad_off_with_max,
        ValueError,
        r"\['state'\]\[0\] has 'max_exp_avg_sq', but its group has amsgrad=False",
    ),
    (
        "missing max",
        _delete(["state", 1, "max_exp_avg_sq"]),
        ValueError,
        r"\['state'\]\[1\] lacks 'max_exp_avg_sq'",
    ),
]


@pytest.mark.parametrize(
    ("edit", "exc", "match"), [b[1:] for b in BAD_DICTS], ids=[b[0] for b in BAD_DICTS]
)
def test_bad_state_dicts_are_rejected_and_change_nothing(edit, exc, match):
    rng = seeded_rng("bad-dict", match)
    opt, params = trained_optimizer(rng)
    sd = opt.state_dict()
    # a dict worth loading: other values than the optimizer's current ones
    opt.step(make_grads(rng, params))
    opt.param_groups[2]["lr"] = 0.02
    edit(sd)
    before = snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, before)


def test_not_a_dict():
    rng = seeded_rng("not-a-dict")
    opt, params = trained_optimizer(rng)
    before = snapshot(opt, params)
    with pytest.raises(TypeError, match=r"state_dict must be a dict, got list"):
        opt.load_state_dict([])
    assert_unchanged(opt, params, before)


def test_loading_repairs_hyperparameters_edited_to_invalid_values():
    rng = seeded_rng("repair")
    opt, params = trained_optimizer(rng)
    sd = opt.state_dict()
    opt.param_groups[1]["lr"] = -1.0
    opt.param_groups[2]["betas"] = (1.0, 1.0)
    opt.load_state_dict(sd)
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[2]["betas"] == (0.9, 0.999)
    opt.step(make_grads(rng, params))
