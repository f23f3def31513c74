"""The guard: one object that decides, per optimizer step, what may happen, and reports it.

:class:`Guard` sees Python scalars only (the step's loss, the global gradient norm, optionally the
update and parameter norms) and answers with a :class:`StepPlan`; the optimizer does the tensor
work.  Order of one guarded step, caller in brackets:

1. **Loss spike** (only with ``loss_spike`` and a loss given): judge the loss against its running
   statistics.  Spike -> skip; ``loss_patience`` spikes in a row -> roll back to the snapshot.
   A validated loss may ask for a snapshot of the current (pre-update) state.
2. **Non-finite gradients** (``skip_nonfinite``): one reduction, the global L2 norm
   ``sqrt(sum_p sum_i g_pi^2)``, is NaN/Inf exactly when some gradient is (or the sum overflows);
   then skip, count, warn the first time.  [caller computes the norm; pass a callable to have it
   computed only when needed, e.g. not on a step already skipped for its loss.]
3. **Gradient-spike clipping** (``grad_spike``): the norm's z-score against its statistics gives
   ``grad_scale`` in (0, 1].
4. **Optimizer step** [caller]: if ``plan.restore_snapshot``: restore params + optimizer state
   (moments *and* step counts) from the snapshot, nothing else.  Else if ``plan.take_snapshot``:
   copy them first.  Then if ``plan.apply``: Adam with the gradients multiplied by
   ``plan.grad_scale`` out of place (the caller's gradients are never written) and each group's lr
   multiplied by ``plan.lr_scale`` for this step only (``param_groups`` untouched, so lr schedulers
   do not drift); ``plan.update_clip`` is applied per tensor inside the step
   (:mod:`adamkit.guard.update`).  If not ``plan.apply``: nothing changes, step counts included.
5. **Diagnostics** [caller reports norms via :meth:`Guard.record_update`]: the plain dict
   :attr:`Guard.diagnostics` describes the step; counters are cumulative.

With every behaviour off the plan is always ``apply`` with both scales 1.0, so a guarded step is
bit-identical to an unguarded one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from adamkit.core.config import to_real
from adamkit.guard._state import expect_mapping, read_int
from adamkit.guard.config import GuardConfig, resolve_guard
from adamkit.guard.spikes import GradSpikeClipper, LossSpikeDetector

__all__ = ["ACTIONS", "COUNTERS", "Guard", "GuardWarning", "StepPlan"]

ACTIONS: tuple[str, ...] = ("apply", "skip_nonfinite", "skip_loss_spike", "rollback")
COUNTERS: tuple[str, ...] = (
    "n_steps",
    "n_applied",
    "n_skipped_nonfinite",
    "n_loss_spikes",
    "n_rollbacks",
    "n_loss_resets",
    "n_snapshots",
    "n_grad_clipped",
    "n_update_clipped",
)
STATE_FORMAT = "adamkit.guard"
STATE_VERSION = 1


class GuardWarning(UserWarning):
    """Emitted once per guard, the first time a step is skipped for non-finite gradients."""


@dataclass(frozen=True)
class StepPlan:
    """What the optimizer must do this step (see the module docstring for the order).

    ``action``: one of :data:`ACTIONS`.  ``apply``: run the update.  ``grad_scale``: factor for
    the gradients (1.0 = untouched).  ``lr_scale``: factor for every group's lr this step.
    ``take_snapshot``: copy params and optimizer state *before* the update.  ``restore_snapshot``:
    restore them instead of updating.  ``update_clip``, ``rms_threshold``, ``atan2_a``,
    ``atan2_b``: the per-tensor update rule (from the config).
    """

    action: str
    apply: bool
    grad_scale: float = 1.0
    lr_scale: float = 1.0
    take_snapshot: bool = False
    restore_snapshot: bool = False
    update_clip: str | None = None
    rms_threshold: float = 1.0
    atan2_a: float = 1.27
    atan2_b: float = 1.0


def _empty_diagnostics() -> dict[str, Any]:
    return {
        "step": 0,
        "action": None,
        "applied": False,
        "skipped": False,
        "nonfinite": False,
        "loss_spike": False,
        "rolled_back": False,
        "loss_reset": False,
        "snapshot_taken": False,
        "grad_clipped": False,
        "update_clipped": False,
        "loss": None,
        "loss_mean": None,
        "loss_std": None,
        "loss_z": None,
        "grad_norm": None,
        "grad_z": None,
        "grad_scale": 1.0,
        "lr_scale": 1.0,
        "update_norm": None,
        "param_norm": None,
        "update_ratio": None,
        "update_scale_min": None,
    }


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def _check_norm(value: Any) -> float:
    norm = to_real(value, "grad_norm")
    if norm < 0.0:  # NaN passes: it is what the non-finite check is for
        raise ValueError(f"Invalid grad_norm: {norm!r} (grad_norm must be >= 0 or non-finite)")
    return norm


class Guard:
    """Stability guard for one optimizer: decisions, counters, diagnostics, state.

    ``config`` is ``None`` (the default :class:`GuardConfig`) or anything
    :func:`~adamkit.guard.config.resolve_guard` accepts that does not mean "off" (``False`` and
    ``"off"`` raise ``ValueError``: a disabled guard is no ``Guard`` at all).  Call
    :meth:`plan_step` once per ``optimizer.step()``, then (only when the plan applies)
    :meth:`record_update`.  Counters and running statistics move only through these two
    calls and :meth:`load_state_dict`.
    """

    def __init__(self, config: Any = None) -> None:
        resolved = GuardConfig() if config is None else resolve_guard(config)
        if resolved is None:
            raise ValueError(f"Guard({config!r}) would be disabled; use no guard instead")
        self.config: GuardConfig = resolved
        cfg = self.config
        self.grad_clipper = GradSpikeClipper.from_config(cfg) if cfg.grad_spike else None
        self.loss_detector = LossSpikeDetector.from_config(cfg) if cfg.loss_spike else None
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._diag: dict[str, Any] = _empty_diagnostics()

    # -- per step ---------------------------------------------------------------------------

    def plan_step(
        self,
        *,
        loss: Any = None,
        grad_norm: float | Callable[[], float] | None = None,
        stacklevel: int = 2,
    ) -> StepPlan:
        """Decide this step (steps 1-3 of the module docstring) and start its diagnostics.

        ``loss``: the loss at the current parameters (a real number or 0-d array/tensor), or
        ``None``.  ``grad_norm``: the global L2 norm of the gradients as a float, or a callable
        returning it (called at most once, only when needed); required when the config needs it
        (``skip_nonfinite`` or ``grad_spike``), else optional and only recorded.  Raises
        ``ValueError`` when a needed norm is missing, ``TypeError`` for a loss or norm value that
        is not a real number; the guard is unchanged then (a callable is only called mid-step,
        so whatever it raises propagates from there).  ``stacklevel`` is passed to ``warnings.warn``
        for the one-time :class:`GuardWarning` (2: the line that called ``plan_step``).
        """
        cfg = self.config
        if cfg.needs_grad_norm and grad_norm is None:
            raise ValueError(
                "grad_norm is required with skip_nonfinite or grad_spike "
                "(a float or a callable returning the global gradient L2 norm)"
            )
        loss_value = None if loss is None else to_real(loss, "loss")
        norm = None
        if grad_norm is not None and not callable(grad_norm):
            norm = _check_norm(grad_norm)
        plan_kw = {
            "update_clip": cfg.update_clip,
            "rms_threshold": cfg.rms_threshold,
            "atan2_a": cfg.atan2_a,
            "atan2_b": cfg.atan2_b,
        }
        self.counters["n_steps"] += 1
        diag = _empty_diagnostics()
        diag["step"] = self.counters["n_steps"]
        diag["loss"] = loss_value
        self._diag = diag

        # 1. loss spike
        take_snapshot = False
        if self.loss_detector is not None and loss_value is not None:
            action, take_snapshot = self._judge_loss(loss_value)
            if action == "rollback":
                return self._finish(StepPlan("rollback", False, restore_snapshot=True, **plan_kw))
            if action == "spike":
                return self._finish(StepPlan("skip_loss_spike", False, **plan_kw))

        # 2. non-finite gradients
        if callable(grad_norm) and cfg.needs_grad_norm:
            norm = _check_norm(grad_norm())
        diag["grad_norm"] = norm
        finite = norm is None or math.isfinite(norm)
        if cfg.skip_nonfinite and not finite:
            self.counters["n_skipped_nonfinite"] += 1
            diag["nonfinite"] = True
            if self.counters["n_skipped_nonfinite"] == 1:
                warnings.warn(
                    f"adamkit guard: non-finite gradients (norm {norm!r}) at step "
                    f"{diag['step']}; the update was skipped (further skips are only counted)",
                    GuardWarning,
                    stacklevel=stacklevel,
                )
            return self._finish(StepPlan("skip_nonfinite", False, **plan_kw))

        # 3. gradient-spike clipping
        grad_scale = 1.0
        if self.grad_clipper is not None and finite:
            clip = self.grad_clipper.observe(norm)
            grad_scale = clip.scale
            diag.update(grad_z=_num(clip.z), grad_clipped=clip.clipped)
            if clip.clipped:
                self.counters["n_grad_clipped"] += 1
        diag["grad_scale"] = grad_scale

        # 4. bookkeeping of the update the caller is about to apply
        lr_scale = 1.0
        detector = self.loss_detector
        if detector is not None:
            lr_scale = detector.lr_scale
            if take_snapshot:
                detector.snapshot_taken()
                self.counters["n_snapshots"] += 1
                diag["snapshot_taken"] = True
            detector.update_applied()
        diag["lr_scale"] = lr_scale
        self.counters["n_applied"] += 1
        plan = StepPlan("apply", True, grad_scale, lr_scale, take_snapshot=take_snapshot, **plan_kw)
        return self._finish(plan)

    def _judge_loss(self, loss: float) -> tuple[str, bool]:
        decision = self.loss_detector.observe(loss)
        diag = self._diag
        diag.update(
            loss_mean=_num(decision.mean), loss_std=_num(decision.std), loss_z=_num(decision.z)
        )
        if decision.action != "ok":
            self.counters["n_loss_spikes"] += 1
            diag["loss_spike"] = True
        if decision.action == "rollback":
            self.counters["n_rollbacks"] += 1
            diag["rolled_back"] = True
        elif decision.action == "reset":
            self.counters["n_loss_resets"] += 1
            diag["loss_reset"] = True
        return decision.action, decision.take_snapshot

    def _finish(self, plan: StepPlan) -> StepPlan:
        self._diag.update(action=plan.action, applied=plan.apply, skipped=not plan.apply)
        return plan

    def record_update(
        self,
        *,
        update_norm: float | None = None,
        param_norm: float | None = None,
        update_scales: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """Add what the applied update did (step 5) and return :attr:`diagnostics`.

        ``update_norm``: global L2 norm of ``theta_new - theta_old``; ``param_norm``: global L2
        norm of ``theta_old``; ``update_scales``: the per-tensor lr factors of ``update_clip="rms"``
        (any value < 1 counts the step as update-clipped).  Each is optional.
        """
        diag = self._diag
        if update_norm is not None:
            diag["update_norm"] = to_real(update_norm, "update_norm")
        if param_norm is not None:
            diag["param_norm"] = to_real(param_norm, "param_norm")
        if update_norm is not None and param_norm is not None:
            u, p = diag["update_norm"], diag["param_norm"]
            diag["update_ratio"] = u / p if p > 0.0 else (math.inf if u > 0.0 else 0.0)
        if update_scales:
            smallest = min(float(s) for s in update_scales)
            diag["update_scale_min"] = smallest
            if smallest < 1.0 and not diag["update_clipped"]:
                diag["update_clipped"] = True
                self.counters["n_update_clipped"] += 1
        return self.diagnostics

    # -- inspection -------------------------------------------------------------------------

    @property
    def diagnostics(self) -> dict[str, Any]:
        """The last step as a flat dict of Python scalars (``None`` = not measured) followed by
        the cumulative counters (``n_*``); a fresh copy each time."""
        return {**self._diag, **self.counters}

    @property
    def has_snapshot(self) -> bool:
        """Whether a rollback target is recorded (the caller holds the tensors)."""
        return self.loss_detector is not None and self.loss_detector.has_snapshot

    @property
    def lr_scale(self) -> float:
        """The lr factor of the next applied update (1.0 outside a post-rollback cool-down)."""
        return 1.0 if self.loss_detector is None else self.loss_detector.lr_scale

    def invalidate_snapshot(self) -> None:
        """Forget the snapshot record, e.g. when a checkpoint was loaded without its tensors."""
        if self.loss_detector is not None:
            self.loss_detector.invalidate_snapshot()

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as plain Python (JSON-serialisable) values::

            {"format": "adamkit.guard", "version": 1, "config": {...},
             "counters": {...}, "grad_clipper": {...} | None, "loss_detector": {...} | None}

        ``config`` is informative; :meth:`load_state_dict` keeps the live guard's config.
        """
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "counters": dict(self.counters),
            "grad_clipper": None if self.grad_clipper is None else self.grad_clipper.state_dict(),
            "loss_detector": (
                None if self.loss_detector is None else self.loss_detector.state_dict()
            ),
        }

    def load_state_dict(self, state: Any) -> None:
        """Restore from :meth:`state_dict`.

        The live config is kept: a component the saved guard had but this one lacks is ignored,
        one this guard has but the saved one lacked starts fresh (so behaviours can be switched
        on when resuming).  Raises ``TypeError``/``ValueError`` naming the bad entry, and then
        changes nothing.
        """
        keys = ("format", "version", "config", "counters", "grad_clipper", "loss_detector")
        state = expect_mapping(state, "guard state", keys)
        if state["format"] != STATE_FORMAT:
            raise ValueError(
                f"guard state format must be {STATE_FORMAT!r}, got {state['format']!r}"
            )
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"guard state version {state['version']!r} is not supported "
                f"(this adamkit reads version {STATE_VERSION})"
            )
        raw = expect_mapping(state["counters"], "guard state counters", COUNTERS)
        counters = {k: read_int(raw[k], f"counters.{k}") for k in COUNTERS}
        clipper = detector = None
        if self.grad_clipper is not None and state["grad_clipper"] is not None:
            clipper = GradSpikeClipper.from_config(self.config)
            clipper.load_state_dict(state["grad_clipper"])
        if self.loss_detector is not None and state["loss_detector"] is not None:
            detector = LossSpikeDetector.from_config(self.config)
            detector.load_state_dict(state["loss_detector"])
        # Validation is complete; commit.
        self.counters = counters
        if self.grad_clipper is not None:
            self.grad_clipper = clipper or GradSpikeClipper.from_config(self.config)
        if self.loss_detector is not None:
            self.loss_detector = detector or LossSpikeDetector.from_config(self.config)
        self._diag = _empty_diagnostics()
