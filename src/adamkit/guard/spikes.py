r"""Spike policies on scalar streams: gradient-norm clipping and loss-spike handling.

Both see one Python float per step and keep :class:`~adamkit.guard.stats.EmaStats`; neither knows
about tensors.  Their thresholds are z-scores against the running statistics::

    z = (x - mu) / (sigma + eps)

:class:`GradSpikeClipper` (ZClip-style; Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for
LLM Pre-Training"): after ``warmup`` norms, a norm with ``z > z_thresh`` is clipped to
``mu + z_thresh * sigma`` (``mode="threshold"``) or ``mu + z_thresh**2 / z * sigma``
(``mode="adaptive"``, ZClip's default "adaptive scaling": the larger the outlier, the harder the
clip).  The statistics are then fed the *clipped* norm, so one spike does not inflate them.

:class:`LossSpikeDetector`: after ``warmup`` accepted losses, a loss is a spike when
``z > z_thresh`` and ``loss > mu + margin * |mu|``; a non-finite loss is always a spike.  Spikes
are not fed to the statistics.  ``patience`` spikes in a row ask for a rollback to the last
snapshot (when one exists and an update was applied since the last rollback), else (finite loss)
for a reset of the statistics, which accepts the new loss level.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from adamkit.core.config import to_real
from adamkit.guard._state import expect_mapping, read_bool, read_float, read_int
from adamkit.guard.config import GuardConfig
from adamkit.guard.stats import EmaStats, zscore

__all__ = ["ClipDecision", "GradSpikeClipper", "LossDecision", "LossSpikeDetector"]


class ClipDecision(NamedTuple):
    """What :meth:`GradSpikeClipper.observe` decided for one gradient norm.

    ``scale`` multiplies the gradients (1.0 when not clipped, else ``threshold / norm`` in (0, 1));
    ``z`` is the norm's z-score (``nan`` during warm-up); ``threshold`` the norm it was clipped to
    (``nan`` when not clipped).
    """

    scale: float
    clipped: bool
    z: float
    threshold: float


class GradSpikeClipper:
    """Adaptive clipping of the global gradient norm against its own running statistics.

    ``observe(norm)`` needs a finite norm >= 0 (``ValueError`` otherwise, state unchanged); the
    caller skips non-finite steps without observing them.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        mode: str = "threshold",
        eps: float = 1e-6,
    ) -> None:
        GuardConfig(  # the one validator for these values
            grad_alpha=alpha, grad_z=z_thresh, grad_warmup=warmup, grad_mode=mode, grad_eps=eps
        )
        self.stats = EmaStats(alpha)
        self.z_thresh = float(z_thresh)
        self.warmup = int(warmup)
        self.mode = mode
        self.eps = float(eps)

    @classmethod
    def from_config(cls, config: GuardConfig) -> GradSpikeClipper:
        """Build from the ``grad_*`` fields of ``config``."""
        return cls(
            alpha=config.grad_alpha,
            z_thresh=config.grad_z,
            warmup=config.grad_warmup,
            mode=config.grad_mode,
            eps=config.grad_eps,
        )

    def observe(self, norm: float) -> ClipDecision:
        """Decide the clip for one finite gradient norm and update the statistics."""
        norm = float(norm)
        if not (math.isfinite(norm) and norm >= 0.0):
            raise ValueError(f"grad norm must be a finite number >= 0, got {norm!r}")
        if self.stats.count < self.warmup:
            self.stats.update(norm)
            return ClipDecision(1.0, False, math.nan, math.nan)
        mean, std = self.stats.mean, self.stats.std
        z = zscore(norm, mean, std, self.eps)
        if z <= self.z_thresh:
            self.stats.update(norm)
            return ClipDecision(1.0, False, z, math.nan)
        if self.mode == "adaptive":
            threshold = mean + self.z_thresh * self.z_thresh / z * std
        else:
            threshold = mean + self.z_thresh * std
        self.stats.update(threshold)
        # z > z_thresh > 0 implies norm > threshold >= 0, so the scale is in [0, 1).
        return ClipDecision(threshold / norm, True, z, threshold)

    def state_dict(self) -> dict[str, Any]:
        """``{"stats": EmaStats.state_dict()}``."""
        return {"stats": self.stats.state_dict()}

    def load_state_dict(self, state: Any, where: str = "grad_clipper") -> None:
        """Restore from :meth:`state_dict`; malformed input raises and changes nothing."""
        state = expect_mapping(state, where, ("stats",))
        self.stats.load_state_dict(state["stats"], f"{where}.stats")


class LossDecision(NamedTuple):
    """What :meth:`LossSpikeDetector.observe` decided for one loss.

    ``action`` is ``"ok"`` (apply the update), ``"spike"`` (skip it), ``"rollback"`` (skip it and
    restore the last snapshot) or ``"reset"`` (statistics were reset; apply the update).
    ``take_snapshot``: the current, just validated state should be copied before the update.
    ``z``, ``mean``, ``std``: the loss's z-score and the statistics it was judged against (``nan``
    during warm-up).
    """

    action: str
    take_snapshot: bool
    z: float
    mean: float
    std: float


class LossSpikeDetector:
    """Detect loss spikes; schedule skips, rollbacks, statistic resets and the lr factor.

    Protocol per step: ``observe(loss)`` first; if the caller then really applies the update it
    calls :meth:`update_applied`, and if it copied the state as asked, :meth:`snapshot_taken`
    (before ``update_applied``).  :attr:`lr_scale` is the factor for the current update (read
    before ``update_applied``).  ``observe`` needs a real number (``TypeError`` otherwise).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.95,
        z_thresh: float = 5.0,
        margin: float = 0.5,
        warmup: int = 20,
        eps: float = 1e-8,
        patience: int = 3,
        snapshot_interval: int = 0,
        lr_factor: float = 1.0,
        lr_cooldown: int = 0,
    ) -> None:
        GuardConfig(
            loss_alpha=alpha,
            loss_z=z_thresh,
            loss_margin=margin,
            loss_warmup=warmup,
            loss_eps=eps,
            loss_patience=patience,
            snapshot_interval=snapshot_interval,
            lr_factor=lr_factor,
            lr_cooldown=lr_cooldown,
        )
        self.stats = EmaStats(alpha)
        self.z_thresh = float(z_thresh)
        self.margin = float(margin)
        self.warmup = int(warmup)
        self.eps = float(eps)
        self.patience = int(patience)
        self.snapshot_interval = int(snapshot_interval)
        self.lr_factor = float(lr_factor)
        self.lr_cooldown = int(lr_cooldown)
        self.consecutive = 0  # spikes in a row
        self.lr_scale = 1.0
        self.cooldown_left = 0  # applied updates left at the lowered lr
        self.has_snapshot = False
        self.updates_since_snapshot = 0
        self.rolled_back = False  # no update applied since the last rollback

    @classmethod
    def from_config(cls, config: GuardConfig) -> LossSpikeDetector:
        """Build from the ``loss_*``, snapshot and lr fields of ``config``."""
        return cls(
            alpha=config.loss_alpha,
            z_thresh=config.loss_z,
            margin=config.loss_margin,
            warmup=config.loss_warmup,
            eps=config.loss_eps,
            patience=config.loss_patience,
            snapshot_interval=config.snapshot_interval,
            lr_factor=config.lr_factor,
            lr_cooldown=config.lr_cooldown,
        )

    def _is_spike(self, loss: float) -> tuple[bool, float, float, float]:
        if not math.isfinite(loss):
            return True, math.nan, math.nan, math.nan
        if self.stats.count < self.warmup:
            return False, math.nan, math.nan, math.nan
        mean, std = self.stats.mean, self.stats.std
        z = zscore(loss, mean, std, self.eps)
        return (z > self.z_thresh and loss > mean + self.margin * abs(mean)), z, mean, std

    def _snapshot_due(self) -> bool:
        return self.snapshot_interval > 0 and (
            not self.has_snapshot or self.updates_since_snapshot >= self.snapshot_interval
        )

    def observe(self, loss: Any) -> LossDecision:
        """Judge one loss and update the statistics and the spike/rollback bookkeeping."""
        loss = to_real(loss, "loss")
        spike, z, mean, std = self._is_spike(loss)
        if not spike:
            self.consecutive = 0
            self.stats.update(loss)
            return LossDecision("ok", self._snapshot_due(), z, mean, std)
        self.consecutive += 1
        if self.consecutive < self.patience:
            return LossDecision("spike", False, z, mean, std)
        if self.has_snapshot and not self.rolled_back:
            self.consecutive = 0
            self.rolled_back = True
            self.updates_since_snapshot = 0
            if self.lr_cooldown > 0 and self.lr_factor < 1.0:
                self.lr_scale *= self.lr_factor
                self.cooldown_left = self.lr_cooldown
            return LossDecision("rollback", False, z, mean, std)
        if not math.isfinite(loss):
            return LossDecision("spike", False, z, mean, std)  # never accept a non-finite loss
        # No usable snapshot (none kept, or spikes resumed right after a rollback): the loss level
        # itself has moved, so start the statistics afresh from this loss and carry on.
        self.consecutive = 0
        self.stats.reset()
        self.stats.update(loss)
        if self.snapshot_interval > 0:
            self.has_snapshot = False  # the old snapshot belongs to the old loss level
        return LossDecision("reset", self._snapshot_due(), z, mean, std)

    def snapshot_taken(self) -> None:
        """The caller copied the current state as :attr:`LossDecision.take_snapshot` asked."""
        self.has_snapshot = True
        self.updates_since_snapshot = 0

    def invalidate_snapshot(self) -> None:
        """Forget the snapshot (e.g. the caller could not restore its tensors); one is retaken at
        the next validated step."""
        self.has_snapshot = False
        self.updates_since_snapshot = 0

    def update_applied(self) -> None:
        """One update was applied: advance the snapshot interval and the lr cool-down."""
        self.rolled_back = False
        self.updates_since_snapshot += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            if self.cooldown_left == 0:
                self.lr_scale = 1.0

    _KEYS = (
        "stats",
        "consecutive",
        "lr_scale",
        "cooldown_left",
        "has_snapshot",
        "updates_since_snapshot",
        "rolled_back",
    )

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: the statistics and the spike/rollback/lr bookkeeping."""
        return {
            "stats": self.stats.state_dict(),
            "consecutive": self.consecutive,
            "lr_scale": self.lr_scale,
            "cooldown_left": self.cooldown_left,
            "has_snapshot": self.has_snapshot,
            "updates_since_snapshot": self.updates_since_snapshot,
            "rolled_back": self.rolled_back,
        }

    def load_state_dict(self, state: Any, where: str = "loss_detector") -> None:
        """Restore from :meth:`state_dict`; malformed input raises and changes nothing."""
        state = expect_mapping(state, where, self._KEYS)
        stats = EmaStats(self.stats.alpha)
        stats.load_state_dict(state["stats"], f"{where}.stats")
        values = {
            "consecutive": read_int(state["consecutive"], f"{where}.consecutive"),
            "lr_scale": read_float(state["lr_scale"], f"{where}.lr_scale", low=0.0),
            "cooldown_left": read_int(state["cooldown_left"], f"{where}.cooldown_left"),
            "has_snapshot": read_bool(state["has_snapshot"], f"{where}.has_snapshot"),
            "updates_since_snapshot": read_int(
                state["updates_since_snapshot"], f"{where}.updates_since_snapshot"
            ),
            "rolled_back": read_bool(state["rolled_back"], f"{where}.rolled_back"),
        }
        if values["lr_scale"] > 1.0:
            raise ValueError(f"{where}.lr_scale must be in [0, 1], got {values['lr_scale']!r}")
        self.stats = stats
        for name, value in values.items():
            setattr(self, name, value)
