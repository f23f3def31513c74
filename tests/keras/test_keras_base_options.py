"""Every general Keras optimizer option still works on adamkit.keras, checked against numbers.

Each option is reproduced outside Keras (the clipped gradient, the scheduled learning rate, the
averaged gradients, the moving average of the weights) and fed to the NumPy reference
(:mod:`adamkit.core.reference`), which must then agree with the optimizer step by step.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from _keras_helpers import to_numpy  # noqa: E402

from adamkit.core.config import AdamHyperParams  # noqa: E402
from adamkit.core.reference import adam_step, init_state  # noqa: E402
from adamkit.keras import Adam, AdamW  # noqa: E402
from adamkit.testing import assert_rel_close, seeded_rng  # noqa: E402

TOL = 1e-5  # float32, as in test_keras_optimizers.py
SHAPES = {"kernel": (4, 3), "bias": (3,)}
STEPS = 6


class Twin:
    """Keras variables and their NumPy reference copies, stepped together."""

    def __init__(self, optimizer, key: str, hp: AdamHyperParams | dict[str, AdamHyperParams]):
        self.rng = seeded_rng("keras-options", key)
        self.optimizer = optimizer
        self.hp = hp if isinstance(hp, dict) else dict.fromkeys(SHAPES, hp)
        self.params = {n: self.rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
        self.variables = [keras.Variable(p, name=n) for n, p in self.params.items()]
        self.states = {n: init_state(p, amsgrad=self.hp[n].amsgrad) for n, p in self.params.items()}

    def grads(self, scale: float = 1.0) -> dict[str, np.ndarray]:
        return {
            n: (scale * self.rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()
        }

    def apply(self, grads: dict[str, np.ndarray]) -> None:
        self.optimizer.apply(
            [keras.ops.convert_to_tensor(g) for g in grads.values()], self.variables
        )

    def reference(self, grads: dict[str, np.ndarray], **overrides) -> None:
        for n, grad in grads.items():
            hp = AdamHyperParams(**{**self.hp[n].__dict__, **overrides})
            self.params[n], self.states[n] = adam_step(self.params[n], grad, self.states[n], hp)

    def check(self, what: str) -> None:
        for variable, (n, expected) in zip(self.variables, self.params.items(), strict=True):
            assert_rel_close(to_numpy(variable), expected, TOL, f"{what} {n}")


def _f32(x: float) -> float:
    # Keras keeps a float learning rate in a float32 variable.
    return float(np.float32(x))


def test_learning_rate_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.7)
    twin = Twin(Adam(learning_rate=schedule), "schedule", AdamHyperParams())
    for step in range(STEPS):
        grads = twin.grads()
        twin.apply(grads)
        twin.reference(grads, lr=0.05 * 0.7**step)  # evaluated at the count before the step
        twin.check(f"step {step}")


def test_learning_rate_changed_between_steps():
    twin = Twin(Adam(learning_rate=0.02), "set-lr", AdamHyperParams(lr=_f32(0.02)))
    for step in range(STEPS):
        if step == 3:
            twin.optimizer.learning_rate = 0.003
        grads = twin.grads()
        twin.apply(grads)
        twin.reference(grads, lr=_f32(0.02 if step < 3 else 0.003))
        twin.check(f"step {step}")


def _clip_by_norm(g: np.ndarray, clip: float, norm: float) -> np.ndarray:
    return (g.astype(np.float64) * clip / max(norm, clip)).astype(np.float32)


@pytest.mark.parametrize("option", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_gradient_clipping(option):
    limit = 0.4
    hp = AdamHyperParams(lr=_f32(0.01))
    twin = Twin(Adam(learning_rate=0.01, **{option: limit}), option, hp)
    for step in range(STEPS):
        grads = twin.grads(scale=2.0)
        twin.apply(grads)
        if option == "clipnorm":
            norms = {n: float(np.linalg.norm(g)) for n, g in grads.items()}
            assert min(norms.values()) > limit  # the clip is active
            clipped = {n: _clip_by_norm(g, limit, norms[n]) for n, g in grads.items()}
        elif option == "global_clipnorm":
            norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))
            assert norm > limit
            clipped = {n: _clip_by_norm(g, limit, norm) for n, g in grads.items()}
        else:
            assert max(np.abs(g).max() for g in grads.values()) > limit
            clipped = {n: np.clip(g, -limit, limit) for n, g in grads.items()}
        twin.reference(clipped)
        twin.check(f"step {step}")


def test_use_ema_averages_the_weights():
    momentum = 0.8
    twin = Twin(
        Adam(learning_rate=0.05, use_ema=True, ema_momentum=momentum),
        "ema",
        AdamHyperParams(lr=_f32(0.05)),
    )
    average = None
    for step in range(STEPS):
        grads = twin.grads()
        twin.apply(grads)
        twin.reference(grads)
        twin.check(f"step {step}")
        # Keras starts the average at the weights after the first step
        current = {n: p.astype(np.float64) for n, p in twin.params.items()}
        average = (
            current
            if average is None
            else {n: momentum * average[n] + (1 - momentum) * current[n] for n in current}
        )
    twin.optimizer.finalize_variable_values(twin.variables)
    for variable, (n, expected) in zip(twin.variables, average.items(), strict=True):
        assert_rel_close(to_numpy(variable), expected, TOL, f"EMA {n}")
        assert not np.allclose(expected, twin.params[n], rtol=1e-3)


def test_gradient_accumulation_steps():
    twin = Twin(
        Adam(learning_rate=0.01, gradient_accumulation_steps=3),
        "accumulate",
        AdamHyperParams(lr=_f32(0.01)),
    )
    for update in range(3):
        window = [twin.grads() for _ in range(3)]
        before = [to_numpy(v) for v in twin.variables]
        for i, grads in enumerate(window):
            twin.apply(grads)
            if i < 2:  # accumulating: no change yet
                for variable, old in zip(twin.variables, before, strict=True):
                    np.testing.assert_array_equal(to_numpy(variable), old)
        mean = {
            n: (sum(g[n].astype(np.float64) for g in window) / 3).astype(np.float32) for n in SHAPES
        }
        twin.reference(mean)
        twin.check(f"update {update}")
    assert int(to_numpy(twin.optimizer.iterations)) == 3


def test_loss_scale_factor_unscales_the_gradients():
    scale = 512.0
    optimizer = Adam(learning_rate=0.01, loss_scale_factor=scale)
    assert float(to_numpy(optimizer.scale_loss(keras.ops.convert_to_tensor(1.5)))) == 768.0
    twin = Twin(optimizer, "loss-scale", AdamHyperParams(lr=_f32(0.01)))
    for step in range(STEPS):
        grads = twin.grads()
        twin.apply({n: g * np.float32(scale) for n, g in grads.items()})
        twin.reference(grads)
        twin.check(f"step {step}")


@pytest.mark.parametrize("how", ["var_names", "var_list"])
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam-l2"])
def test_exclude_from_weight_decay(decoupled, how):
    lr, wd = _f32(0.05), 0.3
    cls = AdamW if decoupled else Adam
    optimizer = cls(learning_rate=0.05, weight_decay=wd)
    decayed = AdamHyperParams(lr=lr, weight_decay=wd, decoupled_weight_decay=decoupled)
    twin = Twin(
        optimizer, f"exclude-{decoupled}-{how}", {"kernel": decayed, "bias": AdamHyperParams(lr=lr)}
    )
    if how == "var_names":
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    else:
        optimizer.exclude_from_weight_decay(var_list=[twin.variables[1]])
    for step in range(STEPS):
        grads = twin.grads()
        twin.apply(grads)
        twin.reference(grads)
        twin.check(f"step {step}")
