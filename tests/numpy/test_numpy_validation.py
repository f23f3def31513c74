"""Every input rule of adamkit.numpy.Adam: the exception, its words, and that nothing changed.

Rules about hyper-parameter values come from the one validator (core/config.py); here they are
checked through each entry point (constructor, group dicts, edits of param_groups between steps,
add_param_group).  Gradient and structure rules are the optimizer's own.  Each error test takes a
deep snapshot of parameters, state and groups first and compares it bit for bit afterwards.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _numpy_helpers import assert_unchanged, make_grads, snapshot, trained_optimizer

from adamkit.core.config import validate_hyperparams
from adamkit.numpy import Adam, AdamW
from adamkit.testing import seeded_rng

# (hyper-parameter overrides, exception, message regex) — one row per validator rule
BAD_HYPERPARAMS = [
    ({"lr": -0.1}, ValueError, r"Invalid learning rate: -0\.1 \(lr must be a finite number >= 0\)"),
    ({"lr": math.nan}, ValueError, r"Invalid learning rate: nan"),
    ({"lr": math.inf}, ValueError, r"Invalid learning rate: inf"),
    ({"lr": True}, TypeError, r"lr must be a real number, got bool True"),
    ({"lr": "1e-3"}, TypeError, r"lr must be a real number, got str"),
    (
        {"betas": (1.0, 0.999)},
        ValueError,
        r"Invalid beta parameter at index 0: 1\.0 \(beta1 must be in \[0, 1\)\)",
    ),
    ({"betas": (-0.5, 0.999)}, ValueError, r"Invalid beta parameter at index 0: -0\.5"),
    (
        {"betas": (0.9, 1.0)},
        ValueError,
        r"Invalid beta parameter at index 1: 1\.0 \(beta2 must be in \[0, 1\)\)",
    ),
    ({"betas": (0.9, math.nan)}, ValueError, r"Invalid beta parameter at index 1: nan"),
    ({"betas": (0.9, True)}, TypeError, r"beta2 must be a real number, got bool"),
    ({"betas": (0.9,)}, ValueError, r"betas must be a pair \(beta1, beta2\), got 1 values"),
    ({"betas": "0.9"}, TypeError, r"betas must be a pair"),
    (
        {"eps": -1e-8},
        ValueError,
        r"Invalid epsilon value: -1e-08 \(eps must be a finite number >= 0\)",
    ),
    ({"eps": math.inf}, ValueError, r"Invalid epsilon value: inf"),
    ({"eps": "tiny"}, TypeError, r"eps must be a real number, got str"),
    (
        {"weight_decay": -1.0},
        ValueError,
        r"Invalid weight_decay value: -1\.0 \(weight_decay must be a finite number >= 0\)",
    ),
    ({"weight_decay": math.nan}, ValueError, r"Invalid weight_decay value: nan"),
    ({"weight_decay": False}, TypeError, r"weight_decay must be a real number, got bool"),
    ({"amsgrad": 1}, TypeError, r"amsgrad must be True or False, got int 1"),
    ({"maximize": "no"}, TypeError, r"maximize must be True or False, got str"),
    ({"bias_correction": None}, TypeError, r"bias_correction must be True or False, got NoneType"),
    ({"decoupled_weight_decay": 0}, TypeError, r"decoupled_weight_decay must be True or False"),
]
CORE_VALID = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "amsgrad": False,
    "maximize": False,
}
IDS = [f"{next(iter(o))}={next(iter(o.values()))!r}" for o, _, _ in BAD_HYPERPARAMS]


@pytest.fixture
def rng(request):
    return seeded_rng(request.node.nodeid)


@pytest.mark.parametrize(("overrides", "exc", "match"), BAD_HYPERPARAMS, ids=IDS)
def test_constructor_rejects_bad_hyperparameters(rng, overrides, exc, match):
    w = rng.standard_normal(3)
    w0 = w.copy()
    with pytest.raises(exc, match=match):
        Adam([w], **overrides)
    assert np.array_equal(w, w0)


@pytest.mark.parametrize(("overrides", "exc", "match"), BAD_HYPERPARAMS, ids=IDS)
def test_group_dict_rejects_bad_hyperparameters_naming_the_group(rng, overrides, exc, match):
    a, b = rng.standard_normal(3), rng.standard_normal(2)
    with pytest.raises(exc, match=r"^param_groups\[1\]: " + match):
        Adam([{"params": [a]}, {"params": [b], **overrides}])


@pytest.mark.parametrize(("overrides", "exc", "match"), BAD_HYPERPARAMS, ids=IDS)
def test_edited_param_groups_are_checked_before_step_changes_anything(rng, overrides, exc, match):
    opt, params = trained_optimizer(rng)
    opt.param_groups[2].update(overrides)  # the last group: groups 0 and 1 must not move either
    before = snapshot(opt, params)
    with pytest.raises(exc, match=r"^param_groups\[2\]: " + match):
        opt.step(make_grads(rng, params))
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize(("overrides", "exc", "match"), BAD_HYPERPARAMS, ids=IDS)
def test_add_param_group_rejects_bad_hyperparameters(rng, overrides, exc, match):
    opt, params = trained_optimizer(rng)
    before = snapshot(opt, params)
    with pytest.raises(exc, match=r"^param_groups\[3\]: " + match):
        opt.add_param_group({"params": [rng.standard_normal(4)], **overrides})
    assert_unchanged(opt, params, before)
    assert len(opt.param_groups) == 3


# validate_hyperparams takes no bias_correction / decoupled_weight_decay; those rows are above
CORE_ROWS = [row for row in BAD_HYPERPARAMS if set(row[0]) <= set(CORE_VALID)]


@pytest.mark.parametrize(("overrides", "exc"), [r[:2] for r in CORE_ROWS], ids=lambda x: None)
def test_messages_are_the_validators_words(overrides, exc):
    with pytest.raises(exc) as core:
        validate_hyperparams(**{**CORE_VALID, **overrides})
    with pytest.raises(exc) as ours:
        Adam([np.zeros(2)], **overrides)
    assert str(ours.value) == str(core.value)


def test_unknown_keyword_arguments_are_rejected():
    with pytest.raises(TypeError, match="unexpected keyword argument 'momentum'"):
        Adam([np.zeros(2)], momentum=0.9)
    with pytest.raises(TypeError, match="unexpected keyword argument 'decoupled_weight_decay'"):
        AdamW([np.zeros(2)], decoupled_weight_decay=False)  # AdamW is decoupled by definition
    with pytest.raises(ValueError, match=r"impl must be one of 'auto', 'reference'.*got 'fast'"):
        Adam([np.zeros(2)], impl="fast")


# (params argument factory, exception, message regex)
def _bad_params():
    w = np.zeros(3)
    ro = np.zeros(2)
    ro.flags.writeable = False
    base = np.zeros(6)
    return [
        ("empty", [], ValueError, r"optimizer got an empty parameter list"),
        ("empty group", [{"params": []}], ValueError, r"param_groups\[0\] has no parameters"),
        ("no params key", [{"lr": 0.1}], ValueError, r"param_groups\[0\] has no 'params' key"),
        (
            "single array",
            w,
            TypeError,
            r"params must be a list of arrays or of group dicts, got ndarray",
        ),
        ("single group", {"params": [w]}, TypeError, r"params must be a list .* got dict"),
        ("set", {1.0}, TypeError, r"params must be a list .* got set"),
        ("mix", [w, {"params": [np.zeros(1)]}], TypeError, r"all arrays or all group dicts"),
        (
            "list param",
            [[1.0, 2.0]],
            TypeError,
            r"param_groups\[0\]\['params'\]\[0\] must be a numpy.ndarray .* got list",
        ),
        (
            "int dtype",
            [np.zeros(2, dtype=np.int64)],
            TypeError,
            r"must have dtype float32 or float64, got int64",
        ),
        (
            "float16",
            [np.zeros(2, dtype=np.float16)],
            TypeError,
            r"must have dtype float32 or float64, got float16",
        ),
        ("complex", [np.zeros(2, dtype=complex)], TypeError, r"got complex128"),
        ("read-only", [ro], ValueError, r"param_groups\[0\]\['params'\]\[0\] is read-only"),
        (
            "twice",
            [w, w],
            ValueError,
            r"\['params'\]\[1\] is the same array as param_groups\[0\]\['params'\]\[0\]",
        ),
        (
            "two groups",
            [{"params": [w]}, {"params": [np.ones(1), w]}],
            ValueError,
            r"param_groups\[1\]\['params'\]\[1\] is the same array as param_groups\[0\]",
        ),
        (
            "overlapping views",
            [base[:4], base[2:]],
            ValueError,
            r"\['params'\]\[1\] shares memory with param_groups\[0\]\['params'\]\[0\]",
        ),
        (
            "view and transpose",
            [{"params": base.reshape(2, 3)}, {"params": base.reshape(2, 3).T}],
            ValueError,
            r"shares memory",
        ),
        (
            "unknown group key",
            [{"params": [w], "momentum": 0.9}],
            TypeError,
            r"param_groups\[0\] has unknown key 'momentum'",
        ),
        (
            "name type",
            [{"params": [w], "name": 3}],
            TypeError,
            r"param_groups\[0\]\['name'\] must be a str or None, got int",
        ),
        ("empty name", [{"params": [w], "name": ""}], ValueError, r"must be a non-empty str"),
        (
            "duplicate name",
            [{"params": [w], "name": "a"}, {"params": [np.ones(1)], "name": "a"}],
            ValueError,
            r"param_groups\[1\]\['name'\] 'a' is already used",
        ),
        (
            "group not dict",
            [{"params": [w]}, [np.ones(1)]],
            TypeError,
            r"all arrays or all group dicts",
        ),
    ]


@pytest.mark.parametrize(
    ("params", "exc", "match"), [r[1:] for r in _bad_params()], ids=[r[0] for r in _bad_params()]
)
def test_constructor_rejects_bad_params(params, exc, match):
    arrays = [p for p in (params if isinstance(params, list) else []) if isinstance(p, np.ndarray)]
    copies = [a.copy() for a in arrays]
    with pytest.raises(exc, match=match):
        Adam(params)
    for a, c in zip(arrays, copies, strict=True):
        assert np.array_equal(a, c)


def test_interleaved_views_that_do_not_overlap_are_fine():
    base = np.zeros(6)
    opt = Adam([base[::2], base[1::2]], lr=0.1)
    opt.step([np.ones(3), -np.ones(3)])
    assert np.allclose(base, [-0.1, 0.1] * 3)


def test_add_param_group_rejects_an_array_already_present(rng):
    opt, params = trained_optimizer(rng)
    before = snapshot(opt, params)
    with pytest.raises(
        ValueError,
        match=r"\[3\]\['params'\]\[1\] is the same array as param_groups\[1\]\['params'\]\[0\]",
    ):
        opt.add_param_group({"params": [rng.standard_normal(2), params[2]]})
    with pytest.raises(ValueError, match=r"param_groups\[3\]\['name'\] 'head' is already used"):
        opt.add_param_group({"params": [rng.standard_normal(2)], "name": "head"})
    with pytest.raises(TypeError, match=r"param_groups\[3\] has unknown key 'weight_decay_rate'"):
        opt.add_param_group({"params": [rng.standard_normal(2)], "weight_decay_rate": 0.1})
    with pytest.raises(TypeError, match=r"param_groups\[3\] must be a dict, got list"):
        opt.add_param_group([rng.standard_normal(2)])
    assert_unchanged(opt, params, before)
    assert len(opt.param_groups) == 3 and len(opt.state) == 6  # the empty array has state too


# Edits of param_groups between steps other than hyper-parameter values: (edit, exception, regex)
def _edit_unknown_key(opt, params):
    opt.param_groups[1]["momentum"] = 0.9


def _edit_remove_key(opt, params):
    del opt.param_groups[2]["eps"]


def _edit_params_list(opt, params):
    opt.param_groups[1]["params"].append(np.zeros(2))


def _edit_drop_group(opt, params):
    opt.param_groups.pop()


def _edit_duplicate_name(opt, params):
    opt.param_groups[2]["name"] = "encoder"


def _edit_read_only(opt, params):
    params[5].flags.writeable = False


def _edit_amsgrad_off(opt, params):
    opt.param_groups[0]["amsgrad"] = False


def _edit_amsgrad_on(opt, params):
    opt.param_groups[1]["amsgrad"] = True


def _edit_reshape(opt, params):
    params[0].shape = (3, 4)  # in place: same array object, different shape


EDITS = [
    (_edit_unknown_key, TypeError, r"param_groups\[1\] has unknown key 'momentum'"),
    (_edit_remove_key, ValueError, r"param_groups\[2\] lacks the key 'eps'"),
    (
        _edit_params_list,
        ValueError,
        r"param_groups\[1\]\['params'\] was changed .* add_param_group",
    ),
    (_edit_drop_group, ValueError, r"param_groups was changed"),
    (_edit_duplicate_name, ValueError, r"param_groups\[2\]\['name'\] 'encoder' is already used"),
    (_edit_read_only, ValueError, r"param_groups\[2\]\['params'\]\[1\] is read-only"),
    (
        _edit_amsgrad_off,
        ValueError,
        r"param_groups\[0\]: amsgrad was changed to False .* cannot change mid-run",
    ),
    (_edit_amsgrad_on, ValueError, r"param_groups\[1\]: amsgrad was changed to True"),
    (_edit_reshape, ValueError, r"param_groups\[0\]\['params'\]\[0\] now has shape \(3, 4\)"),
]


@pytest.mark.parametrize(("edit", "exc", "match"), EDITS, ids=[e[0].__name__[6:] for e in EDITS])
def test_structural_edits_are_caught_before_step_changes_anything(rng, edit, exc, match):
    opt, params = trained_optimizer(rng)
    grads = make_grads(rng, params)
    edit(opt, params)
    before = snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.step(grads)
    assert_unchanged(opt, params, before)


def _unname_last_group(opt, grads):
    opt.param_groups[2]["name"] = None  # keying gradients by name needs every group named
    return grads


def _grads_with(rng, params, index, value):
    grads = make_grads(rng, params)
    grads[index] = value
    return grads


# (id, gradient factory (rng, optimizer, params) -> grads, exception, regex).  The bad entry is
# the last one whenever possible: a step that started before checking would have moved the others.
BAD_GRADS = [
    (
        "too few",
        lambda r, o, p: make_grads(r, p)[:-1],
        ValueError,
        r"step\(\) got 5 gradients, expected 6 \(one per parameter",
    ),
    (
        "too many",
        lambda r, o, p: [*make_grads(r, p), None],
        ValueError,
        r"got 7 gradients, expected 6",
    ),
    (
        "shape",
        lambda r, o, p: _grads_with(r, p, 5, np.zeros((2, 0))),
        ValueError,
        r"grads\[5\] has shape \(2, 0\), expected \(0, 2\)",
    ),
    (
        "broadcast",
        lambda r, o, p: _grads_with(r, p, 4, np.float32(1.0)),
        ValueError,
        r"grads\[4\] has shape \(\), expected \(5,\)",
    ),
    (
        "0-d vs 1",
        lambda r, o, p: _grads_with(r, p, 3, np.ones(1)),
        ValueError,
        r"grads\[3\] has shape \(1,\), expected \(\)",
    ),
    (
        "int",
        lambda r, o, p: _grads_with(r, p, 5, np.zeros((0, 2), dtype=np.int32)),
        TypeError,
        r"grads\[5\] must have a real floating dtype, got int32",
    ),
    (
        "bool",
        lambda r, o, p: _grads_with(r, p, 4, np.ones(5, dtype=bool)),
        TypeError,
        r"floating dtype, got bool",
    ),
    (
        "complex",
        lambda r, o, p: _grads_with(r, p, 4, np.ones(5, dtype=np.complex64)),
        TypeError,
        r"floating dtype, got complex64",
    ),
    (
        "str",
        lambda r, o, p: _grads_with(r, p, 3, "1.0"),
        TypeError,
        r"grads\[3\] must have a real floating dtype, got <U3",
    ),
    (
        "ndarray",
        lambda r, o, p: np.zeros(6),
        TypeError,
        r"grads must be a list/tuple .* got ndarray",
    ),
    ("generator", lambda r, o, p: (g for g in make_grads(r, p)), TypeError, r"got generator"),
    (
        "dict with an unnamed group",
        lambda r, o, p: _unname_last_group(o, {"encoder": [None, None]}),
        ValueError,
        r"keyed by group name, but param_groups\[2\] has no name",
    ),
]


@pytest.mark.parametrize(
    ("make", "exc", "match"), [b[1:] for b in BAD_GRADS], ids=[b[0] for b in BAD_GRADS]
)
def test_bad_gradients_are_rejected_before_anything_changes(rng, make, exc, match):
    opt, params = trained_optimizer(rng)
    grads = make(rng, opt, params)
    before = snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.step(grads)
    assert_unchanged(opt, params, before)


BAD_GRAD_DICTS = [
    (
        "missing group",
        lambda g: {"encoder": g[0:2], "head": g[2:4]},
        ValueError,
        r"step\(\) got no gradients for group 'extra'",
    ),
    (
        "unknown group",
        lambda g: {"encoder": g[0:2], "head": g[2:4], "extra": g[4:], "tail": []},
        ValueError,
        r"unknown group 'tail'; groups: \['encoder', 'head', 'extra'\]",
    ),
    (
        "short list",
        lambda g: {"encoder": g[0:2], "head": g[2:4], "extra": g[4:5]},
        ValueError,
        r"grads\['extra'\] has 1 entries, expected 2",
    ),
    (
        "not a list",
        lambda g: {"encoder": g[0:2], "head": g[2:4], "extra": g[4]},
        TypeError,
        r"grads\['extra'\] must be a list or tuple, got ndarray",
    ),
    (
        "bad shape",
        lambda g: {"encoder": g[0:2], "head": g[2:4], "extra": [g[4], g[4]]},
        ValueError,
        r"grads\['extra'\]\[1\] has shape \(5,\), expected \(0, 2\)",
    ),
]


@pytest.mark.parametrize(
    ("make", "exc", "match"), [b[1:] for b in BAD_GRAD_DICTS], ids=[b[0] for b in BAD_GRAD_DICTS]
)
def test_bad_gradient_dicts_are_rejected_before_anything_changes(rng, make, exc, match):
    opt, params = trained_optimizer(rng)
    grads = make(make_grads(rng, params))
    before = snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.step(grads)
    assert_unchanged(opt, params, before)
