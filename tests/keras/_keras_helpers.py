"""Pieces shared by the Keras front end's tests; import only after ``importorskip("keras")``."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from adamkit.keras import Adam, AdamW
from adamkit.testing import OptimizerCase, seeded_rng

#: Set in the child processes that rerun this folder on another backend.
CHILD_ENV = "ADAMKIT_KERAS_CHILD"


def keras_front(case: OptimizerCase, **overrides: Any) -> tuple[type[Adam], dict[str, Any]]:
    """``(adamkit.keras class, kwargs in Keras's names)`` for a case of ``adamkit.testing.CASES``.

    Decoupled decay maps to :class:`AdamW` (weight decay given explicitly), the rest to
    :class:`Adam`.
    ``overrides`` use adamkit's names (``eps=...``) and are applied first.
    """
    hp = case.hyperparams(**overrides)
    kwargs = {
        "learning_rate": hp.lr,
        "beta_1": hp.beta1,
        "beta_2": hp.beta2,
        "epsilon": hp.eps,
        "amsgrad": hp.amsgrad,
        "maximize": hp.maximize,
        "bias_correction": hp.bias_correction,
    }
    if hp.decoupled_weight_decay:
        return AdamW, {**kwargs, "weight_decay": hp.weight_decay}
    return Adam, {**kwargs, "weight_decay": hp.weight_decay or None}


def to_numpy(x: Any) -> np.ndarray:
    """A Keras variable or backend tensor as a NumPy array (a copy)."""
    value = x.value if isinstance(x, keras.Variable) else x
    if hasattr(value, "detach"):  # torch: Keras's own conversion warns under NumPy 2 (no copy=)
        return value.detach().cpu().numpy().copy()
    return np.array(value)


def optimizer_state(optimizer: Any, variable_name: str) -> dict[str, np.ndarray]:
    """The optimizer's state for the model variable called ``variable_name``, by torch key."""
    state = {}
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        found = [v for v in optimizer.variables if v.path.endswith(f"/{variable_name}_{key}")]
        if found:
            (state[key],) = found
            state[key] = to_numpy(state[key])
    return state


def mlp(seed: int = 0) -> keras.Sequential:
    """A small regression MLP 8 -> 16 (tanh) -> 16 (tanh) -> 1 with seeded initial weights."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )


def regression_data(steps: int, batch_size: int, *keys: Any) -> tuple[np.ndarray, np.ndarray]:
    """Float32 inputs ``(steps * batch_size, 8)`` and noisy nonlinear targets ``(n, 1)``."""
    rng = seeded_rng("keras-regression", steps, batch_size, *keys)
    x = rng.standard_normal((steps * batch_size, 8)).astype(np.float32)
    y = np.sin(x[:, :1] * 2.0) + 0.5 * x[:, 1:2] * x[:, 2:3]
    # the offset keeps the output bias's gradient away from zero for the whole run
    y = (y + 2.0 + 0.1 * rng.standard_normal(y.shape)).astype(np.float32)
    return x, y


def train_mlp(optimizer: Any, x: np.ndarray, y: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Fit :func:`mlp` (seed 0) for one unshuffled epoch with ``optimizer``; return the weights."""
    model = mlp(0)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return model.get_weights()
