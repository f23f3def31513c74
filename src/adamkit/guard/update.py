r"""Per-tensor update clipping rules over NumPy arrays (the reference for every other path).

StableAdamW (Wortsman et al. 2023, "Stable and low-precision training for large-scale
vision-language models", Adafactor's update clipping moved into AdamW's learning rate)::

    RMS_t = sqrt( mean( g_t^2 / max(v_hat_t, eps^2) ) )     over the tensor's elements
    lr_t  = lr / max(1, RMS_t / d)                            d = rms_threshold (1 in the paper)

``g_t`` is the gradient that entered the second moment this step and ``v_hat_t`` the bias-corrected
second moment Adam divides by (after this step's update; the running max with AMSGrad).
``RMS_t > 1`` means ``v_hat`` underestimates the current squared gradient, the situation that
precedes loss spikes; the tensor's step is then shrunk.  At ``t = 1`` with bias correction,
``v_hat = g^2`` and ``RMS = 1``: no clipping.  Since ``v_t >= (1 - beta2) g_t^2``, ``RMS <=
sqrt((1 - beta2^t) / (1 - beta2))``; with the previous step's ``v_hat`` (not the paper's rule) it
would be unbounded.  With ``beta2 = 0.999`` and ``t << 1000``, ``v_hat`` is nearly the plain mean of
all past ``g^2``, so gradients that merely grow (early training) already give ``RMS > 1``: the
guard's "all" preset uses ``d = 2`` (see :meth:`adamkit.guard.GuardConfig.all`).

Adam-atan2 (Everett et al. 2024, "Scaling Exponents Across Parameterizations and Optimizers")
replaces the division and ``eps``::

    update = a * atan2(m_hat, b * sqrt(v_hat))                    theta <- theta - lr * update

Each element satisfies ``|update| <= a * pi / 2``; ``atan2(0, 0) = 0`` so no ``eps`` is needed.
The paper's constants are ``a = 1.27`` (about 4/pi) and ``b = 1``; for ``|m_hat| << b sqrt(v_hat)``
it equals ``(a / b) * m_hat / sqrt(v_hat)``, i.e. Adam up to the factor ``a / b``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["atan2_update", "rms_ratio", "stable_adamw_scale"]


def rms_ratio(grad: np.ndarray, v_hat: np.ndarray, eps: float) -> float:
    """``sqrt(mean(grad**2 / max(v_hat, eps**2)))`` in float64 (0.0 for an empty tensor).

    Elements where both ``grad`` and the floored ``v_hat`` are 0 contribute 0 (no evidence of an
    underestimate); ``grad != 0`` over a zero denominator gives ``inf``.  ``grad`` and ``v_hat``
    must have the same shape; raises ``ValueError`` otherwise.
    """
    g = np.asarray(grad, dtype=np.float64)
    v = np.asarray(v_hat, dtype=np.float64)
    if g.shape != v.shape:
        raise ValueError(f"grad has shape {g.shape} but v_hat has shape {v.shape}")
    if g.size == 0:
        return 0.0
    denom = np.maximum(v, float(eps) ** 2)
    g2 = g * g
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.where(g2 == 0.0, 0.0, g2 / denom)
        return float(np.sqrt(np.mean(ratio)))


def stable_adamw_scale(
    grad: np.ndarray, v_hat: np.ndarray, *, eps: float, threshold: float = 1.0
) -> float:
    """StableAdamW's learning-rate factor for one tensor: ``1 / max(1, RMS / threshold)``.

    Returns a float in [0, 1] (0 only for an infinite RMS); see the module docstring.
    """
    rms = rms_ratio(grad, v_hat, eps) / float(threshold)
    return 1.0 / rms if rms > 1.0 else 1.0


def atan2_update(
    m_hat: np.ndarray, v_hat: np.ndarray, a: float = 1.27, b: float = 1.0
) -> np.ndarray:
    """Adam-atan2's update direction ``a * atan2(m_hat, b * sqrt(v_hat))``.

    ``m_hat`` and ``v_hat`` (>= 0) are the bias-corrected moments, of one shape and floating
    dtype; the result has that shape and dtype.  The parameter moves by ``-lr * update``.
    """
    m_hat = np.asarray(m_hat)
    v_hat = np.asarray(v_hat)
    if m_hat.shape != v_hat.shape:
        raise ValueError(f"m_hat has shape {m_hat.shape} but v_hat has shape {v_hat.shape}")
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise ValueError(f"a and b must be finite numbers > 0, got a={a!r}, b={b!r}")
    dtype = np.result_type(m_hat, v_hat)
    out = a * np.arctan2(m_hat, b * np.sqrt(v_hat))
    return np.asarray(out, dtype=dtype)
