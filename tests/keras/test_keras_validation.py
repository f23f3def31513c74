"""Bad hyper-parameters are refused with adamkit's shared messages; configs round-trip."""

from __future__ import annotations

import copy
import re

import pytest

keras = pytest.importorskip("keras")

from _keras_helpers import to_numpy  # noqa: E402

from adamkit.keras import Adam, AdamW  # noqa: E402

BAD = [
    (
        {"learning_rate": -0.1},
        ValueError,
        "Invalid learning rate: -0.1 (learning_rate must be a finite number >= 0)",
    ),
    (
        {"learning_rate": float("nan")},
        ValueError,
        "Invalid learning rate: nan (learning_rate must be a finite number >= 0)",
    ),
    ({"learning_rate": "0.1"}, TypeError, "learning_rate must be a real number, got str '0.1'"),
    (
        {"beta_1": 1.0},
        ValueError,
        "Invalid beta parameter at index 0: 1.0 (beta1 must be in [0, 1))",
    ),
    (
        {"beta_2": -0.5},
        ValueError,
        "Invalid beta parameter at index 1: -0.5 (beta2 must be in [0, 1))",
    ),
    (
        {"epsilon": -1e-8},
        ValueError,
        "Invalid epsilon value: -1e-08 (epsilon must be a finite number >= 0)",
    ),
    (
        {"weight_decay": -0.01},
        ValueError,
        "Invalid weight_decay value: -0.01 (weight_decay must be a finite number >= 0)",
    ),
    ({"amsgrad": 1}, TypeError, "amsgrad must be True or False, got int 1"),
    ({"maximize": "no"}, TypeError, "maximize must be True or False, got str 'no'"),
    (
        {"state": "int8"},
        NotImplementedError,
        "state='int8' is available in adamkit.torch and adamkit.numpy; not on the Keras front end",
    ),
    ({"guard": "all"}, NotImplementedError, "guard='all' is not available on the Keras front end"),
    ({"betas": (0.9, 0.99)}, ValueError, "Argument(s) not recognized: {'betas': (0.9, 0.99)}"),
]


@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize(("kwargs", "error", "message"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments_are_refused_with_the_shared_message(cls, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        cls(**kwargs)


def test_adamw_always_decouples():
    with pytest.raises(TypeError, match="AdamW always decouples weight decay"):
        AdamW(decoupled_weight_decay=False)


def test_defaults_of_reserved_keywords_are_accepted():
    assert Adam(state=None, guard=False).guard is False
    assert Adam().state is None


def test_integer_learning_rate_is_accepted():
    # keras.optimizers.Adam(learning_rate=1) raises; adamkit's check turns it into a float.
    assert float(to_numpy(Adam(learning_rate=1).learning_rate)) == 1.0


@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_config_round_trip(cls):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=10, decay_rate=0.5)
    extra = {} if cls is AdamW else {"decoupled_weight_decay": True}
    optimizer = cls(
        learning_rate=schedule,
        beta_1=0.8,
        beta_2=0.95,
        epsilon=1e-6,
        amsgrad=True,
        weight_decay=0.2,
        clipnorm=1.5,
        maximize=True,
        bias_correction=False,
        **extra,
    )
    config = optimizer.get_config()
    assert {
        k: config[k]
        for k in (
            "beta_1",
            "beta_2",
            "epsilon",
            "amsgrad",
            "weight_decay",
            "clipnorm",
            "maximize",
            "bias_correction",
        )
    } == {
        "beta_1": 0.8,
        "beta_2": 0.95,
        "epsilon": 1e-6,
        "amsgrad": True,
        "weight_decay": 0.2,
        "clipnorm": 1.5,
        "maximize": True,
        "bias_correction": False,
    }
    assert ("decoupled_weight_decay" in config) is (cls is Adam)
    clone = cls.from_config(copy.deepcopy(config))  # Keras's from_config edits its argument
    assert type(clone) is cls
    assert clone.get_config() == config
    assert isinstance(clone._learning_rate, keras.optimizers.schedules.ExponentialDecay)
    revived = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(revived) is cls and revived.get_config() == config
    assert keras.optimizers.serialize(optimizer)["registered_name"] == f"adamkit>{cls.__name__}"
