r"""Running statistics of a scalar stream (gradient norms, losses) in plain Python floats.

:class:`EmaStats` keeps the exponentially weighted mean and variance of the observations
:math:`x_1, \dots, x_n` with weights :math:`w_i = \alpha^{n-i}`, normalised by their sum
:math:`W_n = \sum_i w_i = (1 - \alpha^n) / (1 - \alpha)`::

    mu_n     = sum_i w_i x_i / W_n
    sigma2_n = sum_i w_i (x_i - mu_n)^2 / W_n

This is the bias-corrected EMA (``mu_n = m_n / (1 - alpha^n)`` with ``m_n = alpha m_{n-1} +
(1 - alpha) x_n``, Adam's correction), so the first observation is the mean and nothing is pulled
towards zero during warm-up.  It is updated with West's (1979) weighted incremental algorithm, which
needs no stored history and does not cancel catastrophically like ``E[x^2] - E[x]^2``::

    W   <- alpha W + 1
    d    = x - mu
    mu  <- mu + d / W
    S   <- alpha S + d (x - mu)             sigma2 = S / W

A constant stream keeps ``mu`` exactly constant and ``sigma2`` exactly 0.
"""

from __future__ import annotations

import math
from typing import Any

from adamkit.guard._state import expect_mapping, read_float, read_int

__all__ = ["EmaStats", "zscore"]


class EmaStats:
    """Exponentially weighted mean/variance with bias correction and an observation count.

    ``alpha`` in (0, 1) is the weight kept by the past per observation (ZClip's 0.97 forgets with
    a time constant of about 33 observations).  ``update`` takes finite floats only and raises
    ``ValueError`` otherwise, leaving the statistics unchanged.
    """

    __slots__ = ("alpha", "count", "m2", "mean", "weight")

    def __init__(self, alpha: float) -> None:
        if not (0.0 < alpha < 1.0):
            raise ValueError(f"Invalid alpha: {alpha!r} (alpha must be in (0, 1))")
        self.alpha = float(alpha)
        self.reset()

    def reset(self) -> None:
        """Forget every observation (count 0, warm-up starts again)."""
        self.count = 0
        self.weight = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        """Weighted population variance (0 before two observations)."""
        return self.m2 / self.weight if self.count else 0.0

    @property
    def std(self) -> float:
        """Square root of :attr:`var`."""
        return math.sqrt(self.var)

    def update(self, x: float) -> None:
        """Add one finite observation."""
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"EmaStats.update needs a finite number, got {x!r}")
        self.weight = self.alpha * self.weight + 1.0
        delta = x - self.mean
        self.mean += delta / self.weight
        # max(): rounding must never make the sum of squares negative.
        self.m2 = max(0.0, self.alpha * self.m2 + delta * (x - self.mean))
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"count": int, "weight": float, "mean": float, "m2": float}``; ``alpha`` is config."""
        return {"count": self.count, "weight": self.weight, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Any, where: str = "stats") -> None:
        """Restore from :meth:`state_dict`; raises ``TypeError``/``ValueError`` (and changes
        nothing) for a malformed entry, naming it under ``where``."""
        state = expect_mapping(state, where, ("count", "weight", "mean", "m2"))
        count = read_int(state["count"], f"{where}.count")
        weight = read_float(state["weight"], f"{where}.weight", low=0.0)
        mean = read_float(state["mean"], f"{where}.mean")
        m2 = read_float(state["m2"], f"{where}.m2", low=0.0)
        if (count == 0) != (weight == 0.0):
            raise ValueError(f"{where}: count {count} and weight {weight!r} disagree")
        self.count, self.weight, self.mean, self.m2 = count, weight, mean, m2


def zscore(x: float, mean: float, std: float, eps: float) -> float:
    """``(x - mean) / (std + eps)``; with a zero denominator ``+inf``/``-inf``/0 by the sign."""
    denom = std + eps
    diff = x - mean
    if denom > 0.0:
        return diff / denom
    return math.copysign(math.inf, diff) if diff != 0.0 else 0.0
