"""Stability guard for the Adam family: framework-independent decisions, NumPy reference step.

A :class:`Guard` (configured by :class:`GuardConfig`, read from an optimizer's ``guard=`` argument
by :func:`resolve_guard`) decides per step, from Python scalars only, whether to skip the update
(non-finite gradients, loss spike), roll back to a snapshot, clip the gradient norm (ZClip-style
z-score against its running statistics) or lower the lr after a rollback; the optimizer applies the
:class:`StepPlan` and per-tensor update clipping (StableAdamW's RMS rule or Adam-atan2,
:mod:`adamkit.guard.update`).  The order of one guarded step is written in
:mod:`adamkit.guard.policy`; :func:`guarded_adam_step` is its NumPy reference.

Layering: depends on :mod:`adamkit.core` and NumPy only; framework front ends call into it.
"""

from adamkit.guard.config import GuardConfig, resolve_guard
from adamkit.guard.policy import Guard, GuardWarning, StepPlan
from adamkit.guard.reference import (
    GuardedStep,
    Snapshot,
    clipped_adam_step,
    clipped_adam_update_,
    global_grad_norm,
    guarded_adam_step,
)
from adamkit.guard.spikes import GradSpikeClipper, LossSpikeDetector
from adamkit.guard.stats import EmaStats
from adamkit.guard.update import atan2_update, stable_adamw_scale

__all__ = [
    "EmaStats",
    "GradSpikeClipper",
    "Guard",
    "GuardConfig",
    "GuardWarning",
    "GuardedStep",
    "LossSpikeDetector",
    "Snapshot",
    "StepPlan",
    "atan2_update",
    "clipped_adam_step",
    "clipped_adam_update_",
    "global_grad_norm",
    "guarded_adam_step",
    "resolve_guard",
    "stable_adamw_scale",
]
