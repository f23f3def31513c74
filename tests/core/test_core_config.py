"""The one validator (core/config.py): every rule, its exception type and its words."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adamkit.core.config import (
    AdamHyperParams,
    check_betas,
    check_eps,
    check_flag,
    check_lr,
    check_weight_decay,
    validate_hyperparams,
)

VALID = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}

# (argument overrides, exception, regex the message must match)
BAD = [
    (
        {"lr": -1e-3},
        ValueError,
        r"Invalid learning rate: -0\.001 \(lr must be a finite number >= 0\)",
    ),
    ({"lr": math.nan}, ValueError, r"Invalid learning rate: nan"),
    ({"lr": math.inf}, ValueError, r"Invalid learning rate: inf"),
    ({"lr": True}, TypeError, r"lr must be a real number, got bool True"),
    ({"lr": "0.1"}, TypeError, r"lr must be a real number, got str '0.1'"),
    ({"lr": np.ones(2)}, ValueError, r"lr must be a single number"),
    (
        {"betas": (1.0, 0.999)},
        ValueError,
        r"Invalid beta parameter at index 0: 1\.0 \(beta1 must be in \[0, 1\)\)",
    ),
    ({"betas": (-0.1, 0.999)}, ValueError, r"Invalid beta parameter at index 0: -0\.1"),
    (
        {"betas": (0.9, 1.0)},
        ValueError,
        r"Invalid beta parameter at index 1: 1\.0 \(beta2 must be in \[0, 1\)\)",
    ),
    ({"betas": (0.9, math.nan)}, ValueError, r"Invalid beta parameter at index 1: nan"),
    ({"betas": (0.9, -math.inf)}, ValueError, r"Invalid beta parameter at index 1: -inf"),
    ({"betas": (False, 0.999)}, TypeError, r"beta1 must be a real number, got bool"),
    ({"betas": (0.9, "0.99")}, TypeError, r"beta2 must be a real number, got str"),
    ({"betas": (0.9,)}, ValueError, r"betas must be a pair \(beta1, beta2\), got 1 values"),
    ({"betas": 0.9}, TypeError, r"betas must be a pair \(beta1, beta2\), got float"),
    ({"betas": "ab"}, TypeError, r"betas must be a pair \(beta1, beta2\), got str"),
    (
        {"eps": -1e-8},
        ValueError,
        r"Invalid epsilon value: -1e-08 \(eps must be a finite number >= 0\)",
    ),
    ({"eps": math.inf}, ValueError, r"Invalid epsilon value: inf"),
    ({"eps": None}, TypeError, r"eps must be a real number, got NoneType"),
    (
        {"weight_decay": -0.1},
        ValueError,
        r"Invalid weight_decay value: -0\.1 \(weight_decay must be a finite number >= 0\)",
    ),
    ({"weight_decay": math.nan}, ValueError, r"Invalid weight_decay value: nan"),
    ({"weight_decay": True}, TypeError, r"weight_decay must be a real number, got bool"),
    ({"amsgrad": 1}, TypeError, r"amsgrad must be True or False, got int 1"),
    ({"maximize": "yes"}, TypeError, r"maximize must be True or False, got str 'yes'"),
]


@pytest.mark.parametrize(("overrides", "exc", "match"), BAD, ids=lambda x: None)
def test_validate_hyperparams_rejects(overrides, exc, match):
    with pytest.raises(exc, match=match):
        validate_hyperparams(**{**VALID, **overrides})


# AdamHyperParams takes beta1 and beta2 separately: rows about the shape of `betas` do not apply.
PAIR_BAD = [
    row
    for row in BAD
    if isinstance(betas := row[0].get("betas", VALID["betas"]), tuple) and len(betas) == 2
]


@pytest.mark.parametrize(("overrides", "exc", "match"), PAIR_BAD, ids=lambda x: None)
def test_hyperparams_dataclass_rejects_the_same(overrides, exc, match):
    kwargs = {**VALID, **overrides}
    kwargs["beta1"], kwargs["beta2"] = kwargs.pop("betas")
    with pytest.raises(exc, match=match):
        AdamHyperParams(**kwargs)


def test_boundaries_are_accepted_and_normalised():
    out = validate_hyperparams(
        lr=np.float32(0.0), betas=[0, np.float64(0.5)], eps=0, weight_decay=np.int64(0)
    )
    assert out == {
        "lr": 0.0,
        "betas": (0.0, 0.5),
        "eps": 0.0,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
    }
    assert all(type(v) is float for v in (out["lr"], out["eps"], *out["betas"]))
    assert check_flag(np.bool_(True), "amsgrad") is True
    assert check_lr(np.array(0.5)) == 0.5  # 0-d arrays are numbers


def test_each_check_names_the_argument_it_was_given():
    with pytest.raises(ValueError, match=r"\(group_lr must be"):
        check_lr(-1, "group_lr")
    with pytest.raises(ValueError, match=r"\(my_eps must be"):
        check_eps(-1, "my_eps")
    with pytest.raises(ValueError, match=r"\(wd must be"):
        check_weight_decay(-1, "wd")
    with pytest.raises(TypeError, match=r"b must be a pair"):
        check_betas(None, "b")


def test_dataclass_checks_its_own_flags():
    with pytest.raises(TypeError, match="bias_correction must be True or False"):
        AdamHyperParams(bias_correction=0)
    with pytest.raises(TypeError, match="decoupled_weight_decay must be True or False"):
        AdamHyperParams(decoupled_weight_decay="no")
    hp = AdamHyperParams(lr=np.float32(0.25), beta1=0, beta2=0.5)
    assert (hp.lr, hp.beta1, hp.beta2) == (0.25, 0.0, 0.5)
    assert type(hp.beta1) is float
