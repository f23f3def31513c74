"""The optimizers ``adamkit train`` offers: a table from name to description and factory.

Importing this module imports no framework; each factory imports what it needs when called, so
``--help`` and argument checking stay fast and ``adamkit.torch`` is loaded only if used.
A factory receives the model's parameters and the whole run configuration, so options added
later reach the optimizer without changing this interface: ``--state`` (``config.state``) is
passed to adamkit's optimizers as ``state=`` (``config.py`` refuses it for the others).

``--guard`` (``config.guard``): ``"default"`` builds each optimizer as it comes (adamkit's guard
skips non-finite steps, torch's optimizers have none), ``"off"`` passes ``guard=False`` to
adamkit's, ``"all"`` passes ``guard="all"`` to adamkit's and wraps torch's in
:class:`adamkit.torch.GuardedOptimizer` (every behaviour but update clipping, which lives inside
Adam's own step).  :func:`describe_guard` says what a built optimizer got.

``--framework keras`` has its own table, :data:`KERAS_OPTIMIZERS`, whose factories receive only
the configuration (Keras optimizers find their variables when ``fit`` builds them); the same
names mean the same algorithm and settings in both tables.  :func:`optimizer_table` picks one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

    from adamkit.app.config import TrainConfig

__all__ = [
    "BUILT_IN_GUARD",
    "KERAS_OPTIMIZERS",
    "OPTIMIZERS",
    "KerasOptimizerSpec",
    "OptimizerSpec",
    "describe_guard",
    "make_optimizer",
    "optimizer_table",
]

Factory = Callable[[Iterable[Any], "TrainConfig"], "torch.optim.Optimizer"]


class OptimizerSpec(NamedTuple):
    """A ``--optimizer`` choice: a one-line description for ``--help`` and its factory."""

    description: str
    factory: Factory


def _adamkit_guard(config: TrainConfig) -> Any:
    # "default" leaves the optimizer's own default in place (non-finite skip).
    return {"default": True, "off": False, "all": "all"}[config.guard]


def _adamkit_adam(params: Iterable[Any], config: TrainConfig) -> torch.optim.Optimizer:
    from adamkit.torch import Adam

    return Adam(params, lr=config.lr, guard=_adamkit_guard(config), state=config.state)


def _adamkit_adamw(params: Iterable[Any], config: TrainConfig) -> torch.optim.Optimizer:
    from adamkit.torch import AdamW

    return AdamW(params, lr=config.lr, guard=_adamkit_guard(config), state=config.state)


def _torch_adam(params: Iterable[Any], config: TrainConfig) -> torch.optim.Optimizer:
    import torch

    return torch.optim.Adam(params, lr=config.lr)


def _torch_adamw(params: Iterable[Any], config: TrainConfig) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(params, lr=config.lr)


def _sgd(params: Iterable[Any], config: TrainConfig) -> torch.optim.Optimizer:
    import torch

    # Momentum 0.9 makes SGD a fair baseline; plain SGD at Adam's lr barely moves in 5 epochs.
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamkit": OptimizerSpec("adamkit.torch.Adam (betas 0.9, 0.999, eps 1e-8)", _adamkit_adam),
    "adamkit-adamw": OptimizerSpec("adamkit.torch.AdamW (weight_decay 0.01)", _adamkit_adamw),
    "torch-adam": OptimizerSpec("torch.optim.Adam, for comparison", _torch_adam),
    "torch-adamw": OptimizerSpec("torch.optim.AdamW (weight_decay 0.01)", _torch_adamw),
    "sgd": OptimizerSpec("torch.optim.SGD with momentum 0.9", _sgd),
}


class KerasOptimizerSpec(NamedTuple):
    """A ``--optimizer`` choice of ``--framework keras``: description and ``factory(config)``."""

    description: str
    factory: Callable[[TrainConfig], Any]  # -> keras.optimizers.Optimizer


def _keras_adamkit_adam(config: TrainConfig) -> Any:
    from adamkit.keras import Adam

    return Adam(learning_rate=config.lr)


def _keras_adamkit_adamw(config: TrainConfig) -> Any:
    from adamkit.keras import AdamW

    return AdamW(learning_rate=config.lr)


def _keras_adam(config: TrainConfig) -> Any:
    import keras

    return keras.optimizers.Adam(learning_rate=config.lr)


def _keras_sgd(config: TrainConfig) -> Any:
    import keras

    # Momentum 0.9, as the torch path's sgd.
    return keras.optimizers.SGD(learning_rate=config.lr, momentum=0.9)


KERAS_OPTIMIZERS: dict[str, KerasOptimizerSpec] = {
    "adamkit": KerasOptimizerSpec(
        "adamkit.keras.Adam (betas 0.9, 0.999, eps 1e-8)", _keras_adamkit_adam
    ),
    "adamkit-adamw": KerasOptimizerSpec(
        "adamkit.keras.AdamW (weight_decay 0.01)", _keras_adamkit_adamw
    ),
    "keras-adam": KerasOptimizerSpec(
        "keras.optimizers.Adam at Keras's defaults (epsilon-hat 1e-7), for comparison",
        _keras_adam,
    ),
    "sgd": KerasOptimizerSpec("keras.optimizers.SGD with momentum 0.9", _keras_sgd),
}


def optimizer_table(framework: str) -> dict[str, Any]:
    """The ``--optimizer`` table of ``framework`` (``"torch"`` or ``"keras"``).

    Raises ``KeyError`` for another framework (the CLI checks it first).
    """
    return {"torch": OPTIMIZERS, "keras": KERAS_OPTIMIZERS}[framework]


#: Optimizers of :data:`OPTIMIZERS` that carry their own guard (``guard=``); the others are
#: wrapped in ``GuardedOptimizer`` for ``--guard all``.
BUILT_IN_GUARD = ("adamkit", "adamkit-adamw")


def make_optimizer(name: str, params: Iterable[Any], config: TrainConfig) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``params`` with ``config.lr`` and ``config.guard``.

    Raises ``KeyError`` for an unknown name (the CLI checks names first) and ``ImportError``
    when the optimizer's package is missing.
    """
    optimizer = OPTIMIZERS[name].factory(params, config)
    if config.guard == "all" and name not in BUILT_IN_GUARD:
        from adamkit.torch import GuardedOptimizer

        optimizer = GuardedOptimizer(optimizer, guard="all")
    return optimizer


def describe_guard(optimizer: Any, setting: str) -> dict[str, Any]:
    """What ``--guard setting`` gave ``optimizer``, for ``config.json``.

    ``{"setting": "default"|"off"|"all", "active": bool, "how": "built-in"|"GuardedOptimizer"|
    None, "config": GuardConfig.to_dict() or None}``.
    """
    guard = getattr(optimizer, "guard", None)
    if guard is None:
        return {"setting": setting, "active": False, "how": None, "config": None}
    from adamkit.torch import GuardedOptimizer

    how = "GuardedOptimizer" if isinstance(optimizer, GuardedOptimizer) else "built-in"
    return {"setting": setting, "active": True, "how": how, "config": guard.config.to_dict()}
