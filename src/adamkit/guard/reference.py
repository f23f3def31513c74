r"""The guarded Adam step over NumPy arrays: the reference every framework's guarded step follows.

:func:`guarded_adam_step` runs one step of the order written in :mod:`adamkit.guard.policy` over a
list of parameters, with :func:`adamkit.core.reference.adam_step` doing the Adam math.
:func:`clipped_adam_step` is one tensor's Adam step with the optional update clipping::

    update_clip=None     adam_step(param, grad, state, hp)                      (unchanged)
    update_clip="rms"    adam_step with lr * s,  s = stable_adamw_scale(g_eff, v_hat, eps, d)
    update_clip="atan2"  moments as adam_step;
                         theta <- theta_d - lr * a * atan2(m_hat, b * sqrt(v_hat))

where ``g_eff`` is the gradient that entered the second moment (after coupled L2 decay),
``v_hat = v / (1 - beta2^t)`` the second moment Adam divides by (``max_exp_avg_sq`` with AMSGrad,
no correction with ``bias_correction=False``), ``m_hat = m / (1 - beta1^t)``, and ``theta_d`` the
parameter after AdamW's decoupled decay ``theta (1 - lr lambda)`` (computed with the clipped lr for
"rms", as StableAdamW does).  Pure functions: inputs are never modified.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step
from adamkit.guard.policy import Guard, StepPlan
from adamkit.guard.update import atan2_update, stable_adamw_scale

__all__ = [
    "GuardedStep",
    "Snapshot",
    "clipped_adam_step",
    "clipped_adam_update_",
    "global_grad_norm",
    "guarded_adam_step",
]


def global_grad_norm(grads: Iterable[np.ndarray | None]) -> float:
    """``sqrt(sum of squares)`` over every element of every array (``None`` skipped), in float64.

    NaN if any element is NaN, inf if any is infinite (or the sum overflows float64); 0.0 for no
    elements.  This is the guard's one reduction per step.
    """
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for g in grads:
            if g is not None:
                g64 = np.asarray(g, dtype=np.float64)
                total += float(np.sum(g64 * g64))
    return math.sqrt(total) if not math.isnan(total) else math.nan


def _bias_correction2(step: int, hp: AdamHyperParams) -> float:
    return 1.0 - hp.beta2**step if hp.bias_correction else 1.0


def clipped_adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    state: AdamState,
    hp: AdamHyperParams,
    *,
    update_clip: str | None = None,
    rms_threshold: float = 1.0,
    atan2_a: float = 1.27,
    atan2_b: float = 1.0,
) -> tuple[np.ndarray, AdamState, float | None]:
    """One tensor's Adam step with optional update clipping (see the module docstring).

    Returns ``(new_param, new_state, lr_factor)``; ``lr_factor`` is StableAdamW's factor in
    [0, 1] for ``update_clip="rms"`` and ``None`` otherwise.  Shapes, dtypes and errors as
    :func:`adamkit.core.reference.adam_step`; ``ValueError`` for an unknown ``update_clip``.
    """
    if update_clip not in (None, "rms", "atan2"):
        raise ValueError(f"Invalid update_clip: {update_clip!r} (must be None, 'rms' or 'atan2')")
    if update_clip == "atan2":
        # Only the moments are used; the discarded Adam update may divide 0 by 0 when eps = 0.
        with np.errstate(divide="ignore", invalid="ignore"):
            new_param, new_state = adam_step(param, grad, state, hp)
    else:
        new_param, new_state = adam_step(param, grad, state, hp)
    if update_clip is None:
        return new_param, new_state, None

    param = np.asarray(param)
    dtype = param.dtype
    second = new_state.max_exp_avg_sq if hp.amsgrad else new_state.exp_avg_sq
    bc2 = _bias_correction2(new_state.step, hp)
    if update_clip == "rms":
        # Same gradient as went into v: maximize flips its sign *before* coupled L2 decay adds
        # lambda * theta (so the sign matters then, as in torch's Adam and adam_step).
        g_eff = np.asarray(grad).astype(dtype, copy=False)
        if hp.maximize:
            g_eff = -g_eff
        if hp.weight_decay != 0.0 and not hp.decoupled_weight_decay:
            g_eff = g_eff + hp.weight_decay * param
        v_hat = np.asarray(second, dtype=np.float64) / bc2
        factor = stable_adamw_scale(g_eff, v_hat, eps=hp.eps, threshold=rms_threshold)
        if factor < 1.0:
            # The moments do not depend on lr, so re-running the step only changes the update.
            new_param, new_state = adam_step(
                param, grad, state, dataclasses.replace(hp, lr=hp.lr * factor)
            )
        return new_param, new_state, factor

    bc1 = 1.0 - hp.beta1**new_state.step if hp.bias_correction else 1.0
    m_hat = new_state.exp_avg / np.asarray(bc1, dtype=dtype)
    v_hat = second / np.asarray(bc2, dtype=dtype)
    update = atan2_update(m_hat, v_hat, atan2_a, atan2_b)
    base = param
    if hp.weight_decay != 0.0 and hp.decoupled_weight_decay:
        base = param * (1.0 - hp.lr * hp.weight_decay)
    return np.asarray(base - hp.lr * update, dtype=dtype), new_state, None


def clipped_adam_update_(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
    max_exp_avg_sqs: Sequence[np.ndarray | None],
    steps: Sequence[int],
    hp: AdamHyperParams,
    *,
    grad_scale: float = 1.0,
    lr_scale: float = 1.0,
    update_clip: str | None = None,
    rms_threshold: float = 1.0,
    atan2_a: float = 1.27,
    atan2_b: float = 1.0,
) -> list[float]:
    """In-place twin of :func:`adamkit.kernels.adam_update_` with the guard's step-4 options.

    Same argument contract as ``adam_update_`` (``steps[i]`` is the 1-based index of the update
    being applied; parameters and moments are overwritten; ``grads`` only read).  The gradients
    are multiplied by ``grad_scale`` and ``hp.lr`` by ``lr_scale`` for this call; ``update_clip``
    as :func:`clipped_adam_step`.  Returns the per-tensor "rms" factors (empty list otherwise).
    """
    if lr_scale != 1.0:
        hp = dataclasses.replace(hp, lr=hp.lr * lr_scale)
    factors: list[float] = []
    for param, grad, m, v, vmax, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, strict=True
    ):
        if grad_scale != 1.0:
            grad = np.asarray(grad, dtype=param.dtype) * grad_scale
        new_param, new, factor = clipped_adam_step(
            param,
            grad,
            AdamState(step - 1, m, v, vmax),
            hp,
            update_clip=update_clip,
            rms_threshold=rms_threshold,
            atan2_a=atan2_a,
            atan2_b=atan2_b,
        )
        np.copyto(param, new_param)
        np.copyto(m, new.exp_avg)
        np.copyto(v, new.exp_avg_sq)
        if vmax is not None:
            np.copyto(vmax, new.max_exp_avg_sq)
        if factor is not None:
            factors.append(factor)
    return factors


def _copy_state(state: AdamState) -> AdamState:
    vmax = state.max_exp_avg_sq
    return AdamState(
        state.step,
        np.array(state.exp_avg, copy=True),
        np.array(state.exp_avg_sq, copy=True),
        None if vmax is None else np.array(vmax, copy=True),
    )


class Snapshot(NamedTuple):
    """A rollback target: copies of every parameter and its Adam state (step count included).

    Memory: :attr:`nbytes`, i.e. 3x the parameters (4x with AMSGrad).
    """

    params: tuple[np.ndarray, ...]
    states: tuple[AdamState, ...]

    @classmethod
    def take(cls, params: Sequence[np.ndarray], states: Sequence[AdamState]) -> Snapshot:
        """Copy ``params`` and ``states`` (the inputs stay independent of the snapshot)."""
        return cls(
            tuple(np.array(p, copy=True) for p in params), tuple(_copy_state(s) for s in states)
        )

    def restore(self) -> tuple[list[np.ndarray], list[AdamState]]:
        """Fresh copies of the saved parameters and states (the snapshot stays reusable)."""
        return [np.array(p, copy=True) for p in self.params], [_copy_state(s) for s in self.states]

    @property
    def nbytes(self) -> int:
        """Bytes held by the copies."""
        total = sum(p.nbytes for p in self.params)
        for s in self.states:
            total += s.exp_avg.nbytes + s.exp_avg_sq.nbytes
            total += 0 if s.max_exp_avg_sq is None else s.max_exp_avg_sq.nbytes
        return total


class GuardedStep(NamedTuple):
    """Result of :func:`guarded_adam_step`: the new ``params``/``states`` lists (the inputs' own
    arrays where nothing changed), the ``snapshot`` to pass to the next step, the ``plan`` the guard
    made and the step's ``diagnostics`` dict."""

    params: list[np.ndarray]
    states: list[AdamState]
    snapshot: Snapshot | None
    plan: StepPlan
    diagnostics: dict[str, Any]


def guarded_adam_step(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray | None],
    states: Sequence[AdamState],
    hp: AdamHyperParams | Sequence[AdamHyperParams],
    guard: Guard,
    *,
    loss: Any = None,
    snapshot: Snapshot | None = None,
) -> GuardedStep:
    """One guarded Adam step over several parameters; only ``guard`` is modified.

    ``grads[i]`` is ``None`` for a parameter without a gradient (left as is, like torch).  ``hp``
    is one :class:`AdamHyperParams` for all parameters or one per parameter (parameter groups).
    ``loss`` is the loss at the current parameters (for loss-spike handling); ``snapshot`` is the
    one returned by the previous step.  Raises ``ValueError`` (guard unchanged) when the lengths
    disagree or the guard records a snapshot but ``snapshot`` is ``None``.
    """
    n = len(params)
    hps = [hp] * n if isinstance(hp, AdamHyperParams) else list(hp)
    if not (len(grads) == len(states) == len(hps) == n):
        raise ValueError(
            f"got {n} params, {len(grads)} grads, {len(states)} states and {len(hps)} "
            "hyper-parameter sets; they must match one to one"
        )
    if guard.has_snapshot and snapshot is None:
        raise ValueError(
            "the guard records a snapshot but snapshot=None; pass the snapshot returned by the "
            "previous step (or call guard.invalidate_snapshot())"
        )
    plan = guard.plan_step(loss=loss, grad_norm=lambda: global_grad_norm(grads), stacklevel=3)
    if plan.restore_snapshot:
        restored_params, restored_states = snapshot.restore()
        return GuardedStep(restored_params, restored_states, snapshot, plan, guard.diagnostics)
    if plan.take_snapshot:
        snapshot = Snapshot.take(params, states)
    if not plan.apply:
        return GuardedStep(list(params), list(states), snapshot, plan, guard.diagnostics)

    new_params, new_states, factors = [], [], []
    update_sq = param_sq = 0.0
    for param, grad, state, group_hp in zip(params, grads, states, hps, strict=True):
        if grad is None:
            new_params.append(param)
            new_states.append(state)
            continue
        if plan.grad_scale != 1.0:
            grad = np.asarray(grad, dtype=np.asarray(param).dtype) * plan.grad_scale
        if plan.lr_scale != 1.0:
            group_hp = dataclasses.replace(group_hp, lr=group_hp.lr * plan.lr_scale)
        new_param, new_state, factor = clipped_adam_step(
            param,
            grad,
            state,
            group_hp,
            update_clip=plan.update_clip,
            rms_threshold=plan.rms_threshold,
            atan2_a=plan.atan2_a,
            atan2_b=plan.atan2_b,
        )
        if factor is not None:
            factors.append(factor)
        if guard.config.track_update_norm:
            old = np.asarray(param, dtype=np.float64)
            delta = np.asarray(new_param, dtype=np.float64) - old
            update_sq += float(np.sum(delta * delta))
            param_sq += float(np.sum(old * old))
        new_params.append(new_param)
        new_states.append(new_state)
    norms: dict[str, float] = {}
    if guard.config.track_update_norm:
        norms = {"update_norm": math.sqrt(update_sq), "param_norm": math.sqrt(param_sq)}
    diagnostics = guard.record_update(update_scales=factors, **norms)
    return GuardedStep(new_params, new_states, snapshot, plan, diagnostics)
