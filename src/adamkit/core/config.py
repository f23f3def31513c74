"""Hyper-parameters of the Adam family and the one validator every front end calls.

Every front end (NumPy, SciPy, PyTorch, Keras, the CLI) validates through the functions here, so a
bad value produces the same words everywhere.  Messages start with PyTorch's wording where PyTorch
has one (``Invalid learning rate: -1.0``) and then state the allowed range, naming the argument::

    Invalid beta parameter at index 0: 1.0 (beta1 must be in [0, 1))

``ValueError`` is raised for a value out of range, ``TypeError`` for a value of the wrong type
(``bool`` is not accepted as a number).  Nothing here imports a framework.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "AdamHyperParams",
    "check_betas",
    "check_eps",
    "check_flag",
    "check_lr",
    "check_weight_decay",
    "to_real",
    "validate_hyperparams",
]


def to_real(value: Any, name: str) -> float:
    """Return ``value`` as a Python float, or raise ``TypeError`` naming ``name``.

    Accepts Python and NumPy real numbers and any object with ``__float__`` that is not a bool
    (so 0-d arrays and 1-element tensors work).  Does not check finiteness.
    """
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    size = getattr(value, "size", None)
    if callable(size):  # torch.Tensor.size is a method; numel() gives the count
        size = value.numel() if hasattr(value, "numel") else None
    if size is not None and size != 1:
        raise ValueError(f"{name} must be a single number, got an array/tensor of {size} elements")
    item = getattr(value, "item", None)
    if size == 1 and callable(item):
        value = item()  # float() refuses 1-d arrays of one element in NumPy >= 2
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a real number, got {type(value).__name__} {value!r}"
        ) from None


def _finite(x: float, what: str, name: str, rule: str) -> None:
    if not math.isfinite(x):
        raise ValueError(f"Invalid {what}: {x!r} ({name} must be {rule})")


def check_lr(lr: Any, name: str = "lr") -> float:
    """Validate a learning rate: a finite real number >= 0. Returns it as a float."""
    value = to_real(lr, name)
    rule = "a finite number >= 0"
    _finite(value, "learning rate", name, rule)
    if value < 0.0:
        raise ValueError(f"Invalid learning rate: {value!r} ({name} must be {rule})")
    return value


def check_betas(betas: Any, name: str = "betas") -> tuple[float, float]:
    """Validate ``(beta1, beta2)``: a pair of finite reals, each in [0, 1). Returns floats."""
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence):
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {type(betas).__name__}")
    if len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {len(betas)} values")
    out = []
    for index, beta in enumerate(betas):
        label = f"beta{index + 1}"
        value = to_real(beta, label)
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise ValueError(
                f"Invalid beta parameter at index {index}: {value!r} ({label} must be in [0, 1))"
            )
        out.append(value)
    return out[0], out[1]


def check_eps(eps: Any, name: str = "eps") -> float:
    """Validate epsilon: a finite real number >= 0. Returns it as a float."""
    value = to_real(eps, name)
    rule = "a finite number >= 0"
    _finite(value, "epsilon value", name, rule)
    if value < 0.0:
        raise ValueError(f"Invalid epsilon value: {value!r} ({name} must be {rule})")
    return value


def check_weight_decay(weight_decay: Any, name: str = "weight_decay") -> float:
    """Validate weight decay: a finite real number >= 0. Returns it as a float."""
    value = to_real(weight_decay, name)
    rule = "a finite number >= 0"
    _finite(value, "weight_decay value", name, rule)
    if value < 0.0:
        raise ValueError(f"Invalid weight_decay value: {value!r} ({name} must be {rule})")
    return value


def check_flag(value: Any, name: str) -> bool:
    """Validate a boolean option (``amsgrad``, ``maximize``, ...): only ``True``/``False``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def validate_hyperparams(
    *,
    lr: Any,
    betas: Any,
    eps: Any,
    weight_decay: Any,
    amsgrad: Any = False,
    maximize: Any = False,
) -> dict[str, Any]:
    """Validate one group's hyper-parameters; return them normalised to Python types.

    Raises ``ValueError``/``TypeError`` for the first offending argument (checked in signature
    order), naming it, echoing the value and stating the allowed range.
    """
    return {
        "lr": check_lr(lr),
        "betas": check_betas(betas),
        "eps": check_eps(eps),
        "weight_decay": check_weight_decay(weight_decay),
        "amsgrad": check_flag(amsgrad, "amsgrad"),
        "maximize": check_flag(maximize, "maximize"),
    }


@dataclass(frozen=True)
class AdamHyperParams:
    """The numbers one Adam step needs, already validated.

    Attributes use the paper's names: ``lr`` (alpha), ``beta1``, ``beta2``, ``eps`` (epsilon, added
    to sqrt(v_hat), torch's and optax's placement), ``weight_decay`` (lambda).  With
    ``decoupled_weight_decay`` the decay is AdamW's ``p <- p - lr * lambda * p``; otherwise it is
    coupled L2 (``g <- g + lambda * p``, as ``torch.optim.Adam(weight_decay=)``).

    Construction validates every field and raises ``ValueError``/``TypeError`` as described in the
    module docstring.
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    amsgrad: bool = False
    maximize: bool = False
    bias_correction: bool = True

    def __post_init__(self) -> None:
        checked = validate_hyperparams(
            lr=self.lr,
            betas=(self.beta1, self.beta2),
            eps=self.eps,
            weight_decay=self.weight_decay,
            amsgrad=self.amsgrad,
            maximize=self.maximize,
        )
        object.__setattr__(self, "lr", checked["lr"])
        object.__setattr__(self, "beta1", checked["betas"][0])
        object.__setattr__(self, "beta2", checked["betas"][1])
        object.__setattr__(self, "eps", checked["eps"])
        object.__setattr__(self, "weight_decay", checked["weight_decay"])
        object.__setattr__(
            self,
            "decoupled_weight_decay",
            check_flag(self.decoupled_weight_decay, "decoupled_weight_decay"),
        )
        object.__setattr__(
            self, "bias_correction", check_flag(self.bias_correction, "bias_correction")
        )
