"""Checks of one parameter group's settings, shared by the optimizer and state-dict loading.

Numbers go through :func:`adamkit.core.config.validate_hyperparams`, so the words are the same as
in every other front end.  Nothing here changes a group unless all of its checks pass.
"""

from __future__ import annotations

from typing import Any

import torch

from adamkit.core.config import check_flag, check_lr, validate_hyperparams
from adamkit.torch.functional import IMPLS

DECAY_MODES: tuple[str, ...] = ("lr_scaled", "independent")

# torch.optim.Adam's implementation switches.  They are kept in every group (with torch's
# defaults) so that adamkit's state_dicts load into torch.optim.Adam unchanged; adamkit chooses its
# implementation with `impl` instead.  `foreach` is only a speed hint and `capturable` only says
# where `step` lives (torch.compile sets it to True in the groups it traces; adamkit's step works
# either way), so any value of those two is accepted and has no effect.
TORCH_SWITCHES: dict[str, Any] = {
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
}
_SWITCH_ALLOWED: dict[str, tuple[Any, ...]] = {
    "foreach": (None, False, True),
    "capturable": (False, True),
    "differentiable": (False,),
    "fused": (None, False),
}

# Keys a group may carry besides the hyper-parameters: torch's bookkeeping, an optional display
# name, the lr schedulers' `initial_lr` and adamkit's record of the lr at construction.
EXTRA_KEYS: frozenset[str] = frozenset(
    {"params", "param_names", "name", "initial_lr", "construction_lr"}
)


def check_group(group: dict[str, Any]) -> dict[str, Any]:
    """Validate a complete group (defaults already filled in); return its normalised settings.

    Returns the hyper-parameters as Python types (``lr`` stays a tensor when given as one; a
    tensor must have exactly one element).  Raises ``ValueError``/``TypeError`` naming the
    setting and the allowed values.  ``group`` itself is not modified.
    """
    lr = group["lr"]
    checked = validate_hyperparams(
        lr=lr,
        betas=group["betas"],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        amsgrad=group["amsgrad"],
        maximize=group["maximize"],
    )
    if isinstance(lr, torch.Tensor):
        checked["lr"] = lr
    checked["decoupled_weight_decay"] = check_flag(
        group["decoupled_weight_decay"], "decoupled_weight_decay"
    )
    mode = group["decay_mode"]
    if mode not in DECAY_MODES:
        raise ValueError(
            f"decay_mode must be one of {', '.join(map(repr, DECAY_MODES))}, got {mode!r}"
        )
    if mode == "independent" and not checked["decoupled_weight_decay"]:
        raise ValueError(
            "decay_mode='independent' needs decoupled_weight_decay=True (use AdamW); "
            "coupled L2 decay is part of the gradient and has no schedule-independent form"
        )
    impl = group["impl"]
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    for key, allowed in _SWITCH_ALLOWED.items():
        value = group.get(key, TORCH_SWITCHES[key])
        if value not in allowed:
            raise ValueError(
                f"{key}={value!r} is not supported by adamkit.torch (allowed: "
                f"{', '.join(map(repr, allowed))}); choose the implementation with impl= instead"
            )
    if mode == "independent":
        decay_reference_lr(group)
    return checked


def decay_reference_lr(group: dict[str, Any]) -> float:
    """The lr that ``decay_mode="independent"`` divides by: ``initial_lr`` (set by torch's lr
    schedulers), else ``construction_lr`` (the lr when the group was added), else ``lr`` (a group
    being added).  Raises ``ValueError`` unless it is a finite number > 0."""
    key = next(k for k in ("initial_lr", "construction_lr", "lr") if k in group)
    value = check_lr(group[key], key)
    if value <= 0.0:
        raise ValueError(
            f"decay_mode='independent' divides by the initial learning rate, so {key} must be "
            f"> 0, got {value!r}"
        )
    return value


def effective_weight_decay(group: dict[str, Any]) -> float:
    """The coefficient the step functions use: ``weight_decay`` for ``decay_mode="lr_scaled"``,
    ``weight_decay / initial_lr`` for ``"independent"`` (so ``lr * coefficient`` is the schedule
    multiplier times ``weight_decay``)."""
    weight_decay = float(group["weight_decay"])
    if group["decay_mode"] == "lr_scaled" or weight_decay == 0.0:
        return weight_decay
    return weight_decay / decay_reference_lr(group)
