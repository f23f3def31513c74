"""Every knob of the stability guard, validated once, and the one function that reads ``guard=``.

:class:`GuardConfig` is frozen; construction validates each field and raises ``ValueError`` (value
out of range) or ``TypeError`` (wrong type), naming the field, echoing the value and stating the
allowed range, in the words of :mod:`adamkit.core.config`::

    Invalid grad_alpha: 1.0 (grad_alpha must be in (0, 1))

Defaults are safe for everyone: only the non-finite skip is on.  :meth:`GuardConfig.all` turns every
behaviour on with the defaults documented on each field.

Memory: with ``loss_spike=True`` and ``snapshot_interval > 0`` the caller keeps one snapshot of the
parameters and the optimizer state (Adam: parameter + ``exp_avg`` + ``exp_avg_sq`` [+
``max_exp_avg_sq``]), i.e. 3x (4x with AMSGrad) the parameters' memory on top of training.  Nothing
else in the guard grows with the model: its own state is a handful of Python numbers.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from adamkit.core.config import check_flag, to_real

__all__ = ["GUARD_PRESETS", "UPDATE_CLIPS", "GuardConfig", "resolve_guard"]

UPDATE_CLIPS: tuple[str, ...] = ("rms", "atan2")
GRAD_MODES: tuple[str, ...] = ("threshold", "adaptive")
GUARD_PRESETS: tuple[str, ...] = ("default", "all", "off")


def _real(value: Any, name: str, *, low: float, high: float = math.inf, rule: str) -> float:
    # Inclusive bounds; callers reject the excluded end points of open ranges themselves.
    x = to_real(value, name)
    if not (math.isfinite(x) and low <= x <= high):
        raise ValueError(f"Invalid {name}: {x!r} ({name} must be {rule})")
    return x


def _positive(value: Any, name: str) -> float:
    x = _real(value, name, low=0.0, rule="a finite number > 0")
    if x == 0.0:
        raise ValueError(f"Invalid {name}: {x!r} ({name} must be a finite number > 0)")
    return x


def _non_negative(value: Any, name: str) -> float:
    return _real(value, name, low=0.0, rule="a finite number >= 0")


def _open_unit(value: Any, name: str) -> float:
    x = _real(value, name, low=0.0, high=1.0, rule="in (0, 1)")
    if x in (0.0, 1.0):
        raise ValueError(f"Invalid {name}: {x!r} ({name} must be in (0, 1))")
    return x


def _half_open_unit(value: Any, name: str) -> float:
    x = _real(value, name, low=0.0, high=1.0, rule="in (0, 1]")
    if x == 0.0:
        raise ValueError(f"Invalid {name}: {x!r} ({name} must be in (0, 1])")
    return x


def check_int(value: Any, name: str, low: int) -> int:
    """Validate an integer option ``>= low`` (bool and non-integral numbers are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"Invalid {name}: {int(value)!r} ({name} must be an integer >= {low})")
    return int(value)


def _choice(value: Any, name: str, choices: tuple[str, ...], *, allow_none: bool) -> str | None:
    if value is None and allow_none:
        return None
    allowed = ", ".join(map(repr, choices)) + (" or None" if allow_none else "")
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {allowed}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} ({name} must be one of {allowed})")
    return value


@dataclass(frozen=True)
class GuardConfig:
    """Configuration of :class:`adamkit.guard.Guard`; every behaviour can be switched on or off.

    Non-finite skip
        ``skip_nonfinite`` (default ``True``): a step whose gradient norm is NaN/Inf is skipped
        (parameters, moments and step count untouched), counted, and warned about once.

    Update clipping (per tensor, inside the Adam step), ``update_clip``:
        ``None`` (default) plain Adam.  ``"rms"``: StableAdamW (Wortsman et al. 2023), the tensor's
        learning rate becomes ``lr / max(1, RMS / rms_threshold)`` with
        ``RMS = sqrt(mean(g**2 / max(v_hat, eps**2)))``, ``v_hat`` the bias-corrected second
        moment after this step's update (see :func:`~adamkit.guard.update.stable_adamw_scale`).
        ``"atan2"``: Adam-atan2 (Everett et al. 2024), the update ``m_hat / (sqrt(v_hat) +
        eps)`` is replaced by ``atan2_a * atan2(m_hat, atan2_b * sqrt(v_hat))``, bounded by
        ``atan2_a * pi / 2`` and free of ``eps``.  Defaults
        ``rms_threshold=1.0``, ``atan2_a=1.27``, ``atan2_b=1.0`` (the papers' values;
        :meth:`all` uses ``rms_threshold=2.0``, see there why).

    Gradient-spike clipping (ZClip-style, Kumar et al. 2025), ``grad_spike`` (default ``False``):
        the global gradient norm ``x`` is compared with the exponentially weighted mean ``mu`` and
        standard deviation ``sigma`` of earlier (clipped) norms, weight ``grad_alpha`` (0.97).
        After ``grad_warmup`` (25) norms, if ``z = (x - mu) / (sigma + grad_eps) > grad_z`` (2.5)
        the gradients are scaled so their norm becomes ``mu + grad_z * sigma``
        (``grad_mode="threshold"``) or ZClip's ``mu + grad_z**2 / z * sigma``
        (``grad_mode="adaptive"``); ``grad_eps`` defaults to 1e-6.

    Loss-spike handling, ``loss_spike`` (default ``False``; needs the step's loss):
        a loss is a spike when it is not finite, or, after ``loss_warmup`` (20; >= 1) accepted
        losses, when both ``z = (loss - mu) / (sigma + loss_eps) > loss_z`` (5.0) and
        ``loss > mu + loss_margin * |mu|`` (0.5: at least 50% above the running mean) hold, with
        ``mu, sigma`` the exponentially weighted statistics of accepted losses (weight
        ``loss_alpha``, 0.95; ``loss_eps`` 1e-8).  A spike skips the update.
        ``loss_patience`` (3) spikes in a row roll back to the last snapshot when one exists
        (``snapshot_interval > 0``: a snapshot of the validated state is taken every
        ``snapshot_interval`` applied updates; 0 = no snapshots, no rollback) and multiply the
        learning rate by ``lr_factor`` (1.0: unchanged; compounded over rollbacks) for the next
        ``lr_cooldown`` applied updates.  Without a usable snapshot the running statistics are
        reset instead and the update is applied, so training cannot stall.

    Diagnostics
        ``track_update_norm`` (default ``False``): also measure the update norm and the
        update-to-weight ratio (one more reduction over the parameters per step).

    Where the gradient norm is taken, ``check_in_backward`` (default ``True``; ``adamkit.torch``
    only, ignored elsewhere): large gradients (>= 65,536 elements, CPU float32/float64,
    contiguous) are read for the norm by a post-accumulate-grad hook during backward, while they
    are in cache, and ``step()`` uses that value as long as the gradient is the same tensor with
    an unchanged version counter; otherwise it reads the gradient itself.  The norm, and so every
    decision, is bit-identical either way.  Turn it off when code modifies gradients after
    backward in ways torch's version counter does not see (``grad.data``, NumPy views); see
    :mod:`adamkit.torch.backward_checks`.  Not used when the guard reduces across processes.

    Raises ``ValueError``/``TypeError`` as described in the module docstring.
    """

    skip_nonfinite: bool = True

    update_clip: str | None = None
    rms_threshold: float = 1.0
    atan2_a: float = 1.27
    atan2_b: float = 1.0

    grad_spike: bool = False
    grad_alpha: float = 0.97
    grad_z: float = 2.5
    grad_warmup: int = 25
    grad_mode: str = "threshold"
    grad_eps: float = 1e-6

    loss_spike: bool = False
    loss_alpha: float = 0.95
    loss_z: float = 5.0
    loss_margin: float = 0.5
    loss_warmup: int = 20
    loss_eps: float = 1e-8
    loss_patience: int = 3
    snapshot_interval: int = 0
    lr_factor: float = 1.0
    lr_cooldown: int = 0

    track_update_norm: bool = False

    check_in_backward: bool = True

    def __post_init__(self) -> None:
        checked = {
            "skip_nonfinite": check_flag(self.skip_nonfinite, "skip_nonfinite"),
            "update_clip": _choice(self.update_clip, "update_clip", UPDATE_CLIPS, allow_none=True),
            "rms_threshold": _positive(self.rms_threshold, "rms_threshold"),
            "atan2_a": _positive(self.atan2_a, "atan2_a"),
            "atan2_b": _positive(self.atan2_b, "atan2_b"),
            "grad_spike": check_flag(self.grad_spike, "grad_spike"),
            "grad_alpha": _open_unit(self.grad_alpha, "grad_alpha"),
            "grad_z": _positive(self.grad_z, "grad_z"),
            "grad_warmup": check_int(self.grad_warmup, "grad_warmup", 2),
            "grad_mode": _choice(self.grad_mode, "grad_mode", GRAD_MODES, allow_none=False),
            "grad_eps": _non_negative(self.grad_eps, "grad_eps"),
            "loss_spike": check_flag(self.loss_spike, "loss_spike"),
            "loss_alpha": _open_unit(self.loss_alpha, "loss_alpha"),
            "loss_z": _positive(self.loss_z, "loss_z"),
            "loss_margin": _non_negative(self.loss_margin, "loss_margin"),
            "loss_warmup": check_int(self.loss_warmup, "loss_warmup", 1),
            "loss_eps": _non_negative(self.loss_eps, "loss_eps"),
            "loss_patience": check_int(self.loss_patience, "loss_patience", 1),
            "snapshot_interval": check_int(self.snapshot_interval, "snapshot_interval", 0),
            "lr_factor": _half_open_unit(self.lr_factor, "lr_factor"),
            "lr_cooldown": check_int(self.lr_cooldown, "lr_cooldown", 0),
            "track_update_norm": check_flag(self.track_update_norm, "track_update_norm"),
            "check_in_backward": check_flag(self.check_in_backward, "check_in_backward"),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def all(cls, **overrides: Any) -> GuardConfig:
        """Every behaviour on: non-finite skip, ``update_clip="rms"`` with ``rms_threshold=2.0``,
        gradient-spike clipping with ``grad_z=4.0``, loss-spike handling judged from the second
        loss on (``loss_warmup=1``) with a snapshot every 100 updates, ``lr_factor=0.25`` for
        ``lr_cooldown=1000`` updates after a rollback, update-norm tracking.  ``overrides``
        replace single fields (unknown names raise ``TypeError``).

        Why ``loss_warmup=1`` and a long cool-down: with a too-high lr, Adam's very first update
        (``lr * sign(g)`` on every weight) already blows the loss up (Fashion-MNIST MLP at lr 0.3:
        2.3 -> 198 at step 2), before 20 losses could be collected; judged against the first
        loss (spread 0, so the ``loss_margin`` of 50% decides) the blow-up is a spike, the run
        rolls back to the snapshot of step 1 and cuts its lr, again until the loss stays down.
        The lower lr must then last (a cool-down of 100 updates let the run diverge again each
        time it ended).  ``lr_factor=0.25`` rather than 0.5: each rollback costs ``loss_patience``
        (3) skipped steps; from lr 1, halving needs 5-6 rollbacks (15-18 of the 80 steps of the
        benchmark's CNN run, final accuracy 77.4%), quartering 2-3 (80.7%).

        Why ``rms_threshold=2.0`` and not the paper's 1.0: the rule compares this step's squared
        gradient with ``v_hat``, which after ``t`` steps is (with ``beta2 = 0.999``, ``t <<
        1000``) nearly the plain mean of all ``t`` squared gradients.  When the gradients grow,
        as they do early in training, ``RMS > 1`` is the normal state, not a warning: in the
        benchmark's CNN at lr 1e-3 (80 steps) 69% of the tensor-steps had ``RMS > 1`` (79 of 80
        steps clipped, mean lr factor 0.73 when clipped), which cost 1.8 points of test
        accuracy.  At 2.0 (``v_hat`` underestimating the mean square 4-fold) 1-2% of the
        tensor-steps are clipped and the cost is within seed noise, while a real spike still
        is: a 10x gradient after 50 steady ones gives ``RMS`` about 5.8.  ``RMS`` uses ``v_hat``
        *after* this step's update, as in the paper (``u_t``); with the previous ``v_hat`` it
        would be unbounded and larger (the same 10x spike: 10), clipping even more.

        Why ``grad_z=4.0`` and not ZClip's 2.5: in the same runs the gradient norm trends up
        (0.25 -> 1.5 in 50 steps) and a 2.5-sigma threshold against its lagging running mean
        clipped 1-5 ordinary steps per run (about -0.4 points); at 4.0 most of those pass (the
        16-image last batch of an epoch, z 5-12, is still clipped) and so is a real spike (a
        fault such as inputs x1000 multiplies the norm by orders of magnitude).  Measured by
        ``adamkit bench stability`` (benchmarks/results/2026-11-25b)."""
        preset: dict[str, Any] = {
            "skip_nonfinite": True,
            "update_clip": "rms",
            "rms_threshold": 2.0,
            "grad_spike": True,
            "grad_z": 4.0,
            "loss_spike": True,
            "loss_warmup": 1,
            "snapshot_interval": 100,
            "lr_factor": 0.25,
            "lr_cooldown": 1000,
            "track_update_norm": True,
        }
        _check_names(overrides)
        return cls(**{**preset, **overrides})

    @property
    def needs_grad_norm(self) -> bool:
        """Whether the guard must see the global gradient norm every step."""
        return self.skip_nonfinite or self.grad_spike

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-friendly); ``GuardConfig(**d)`` rebuilds it."""
        return asdict(self)


def _check_names(options: dict[str, Any]) -> None:
    known = {f.name for f in fields(GuardConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"unknown guard option(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(known))}"
        )


def resolve_guard(guard: Any) -> GuardConfig | None:
    """Read the ``guard=`` argument of an optimizer; ``None`` means no guard at all.

    - ``False``, ``None`` or ``"off"``: ``None``.
    - ``True`` or ``"default"``: ``GuardConfig()`` (non-finite skip only).
    - ``"all"``: :meth:`GuardConfig.all`.
    - a ``dict``: its keys override the defaults; it may hold ``"preset": "all"`` to start from
      :meth:`GuardConfig.all` instead.
    - a :class:`GuardConfig`: returned as is.

    Raises ``TypeError`` for any other type or an unknown option name, ``ValueError`` for an
    unknown preset name or an option value out of range.
    """
    if guard is None or guard is False:
        return None
    if guard is True:
        return GuardConfig()
    if isinstance(guard, GuardConfig):
        return guard
    if isinstance(guard, str):
        if guard == "off":
            return None
        if guard == "default":
            return GuardConfig()
        if guard == "all":
            return GuardConfig.all()
        raise ValueError(
            f"Invalid guard: {guard!r} (guard must be True, False, None, a GuardConfig, a dict "
            f"of options or one of {', '.join(map(repr, GUARD_PRESETS))})"
        )
    if isinstance(guard, dict):
        options = dict(guard)
        preset = options.pop("preset", "default")
        if preset not in ("default", "all"):
            raise ValueError(
                f"Invalid guard preset: {preset!r} (preset must be 'default' or 'all')"
            )
        _check_names(options)
        return GuardConfig.all(**options) if preset == "all" else GuardConfig(**options)
    raise TypeError(
        "guard must be True, False, None, a GuardConfig, a dict of options or one of "
        f"{', '.join(map(repr, GUARD_PRESETS))}, got {type(guard).__name__} {guard!r}"
    )
