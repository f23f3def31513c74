r"""The Adam family, written once, as pure NumPy functions. This module is the specification.

Notation follows Kingma & Ba (2015), Algorithm 1, with torch's conventions for the variants.
For a parameter :math:`\theta`, gradient :math:`g_t`, step :math:`t = 1, 2, \dots` (bias
correction starts at ``t = 1``, i.e. the first step uses :math:`1 - \beta^1`)::

    g  <- -g                                  if maximize
    g  <- g + lambda * theta                  coupled L2 decay (Adam's weight_decay)
    theta <- theta * (1 - lr * lambda)        decoupled decay (AdamW, Loshchilov & Hutter)
    m  <- m + (1 - beta1) * (g - m)           = beta1 * m + (1 - beta1) * g
    v  <- beta2 * v + (1 - beta2) * g * g
    v_max <- max(v_max, v)                    if amsgrad (torch: the max is over v, not v_hat)
    m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)      (1 if bias correction is off)
    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

``eps`` sits *outside* the square root and is added to :math:`\sqrt{\hat v}`, as in the paper,
torch and optax.  (Keras writes the same formula with "epsilon hat" added to :math:`\sqrt{v}`
before bias correction, so the same number means something slightly different there.)

The operations are ordered as in ``torch.optim.adam._single_tensor_adam`` so that float64
results agree with torch to rounding and float32 results to a few ulps:
``theta + (-(lr / bc1) * m) / (sqrt(v) / sqrt(bc2) + eps)``, with the moment updates
rounded once per multiply-add like torch's fused CPU kernels.  The scalars ``lr / bc1`` and
``sqrt(bc2)`` are computed in Python float (double) precision before they meet the arrays, so a
float32 parameter never sees ``beta2 ** t`` rounded to float32 (which would lose the correction
for large ``t``).

All functions are pure: inputs are never modified; outputs have the parameter's dtype and shape
(0-d stays 0-d).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from adamkit.core.config import AdamHyperParams

__all__ = [
    "AdamState",
    "adam_step",
    "bias_corrections",
    "ema",
    "fused_multiply_add",
    "init_state",
]


class AdamState(NamedTuple):
    """Per-parameter Adam state.

    ``step`` is the number of updates applied so far (0 before the first).  ``exp_avg`` (m),
    ``exp_avg_sq`` (v) and, with AMSGrad, ``max_exp_avg_sq`` (running max of v) have the
    parameter's shape and dtype.  ``max_exp_avg_sq`` is ``None`` without AMSGrad.
    """

    step: int
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    max_exp_avg_sq: np.ndarray | None = None


def init_state(param: np.ndarray, *, amsgrad: bool = False) -> AdamState:
    """Zero state for ``param`` (step 0, moments of the parameter's shape and dtype)."""
    zeros = np.zeros_like(param)
    return AdamState(0, zeros, zeros.copy(), zeros.copy() if amsgrad else None)


def fused_multiply_add(a: np.ndarray, b: np.ndarray | float, c: np.ndarray) -> np.ndarray:
    """``a * b + c`` rounded once to the dtype of ``c``.

    For dtypes narrower than float64 the product and sum are formed in float64 (where the product
    of two float32 numbers is exact) and rounded at the end, which is what a hardware FMA gives
    and what torch's CPU kernels for ``lerp``/``addcmul`` compute.  In float64 it is ``a * b + c``.
    """
    dtype = c.dtype
    if dtype.itemsize >= 8:
        return a * b + c
    wide = np.float64
    b_wide = np.asarray(b, dtype=dtype).astype(wide)
    return (np.asarray(a, dtype=dtype).astype(wide) * b_wide + c.astype(wide)).astype(dtype)


def ema(average: np.ndarray, new: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average ``average + weight * (new - average)``.

    Evaluated like ``torch.lerp``: one fused multiply-add, and for ``weight >= 0.5`` the
    algebraically equal ``new - (new - average) * (1 - weight)``, which rounds better there.
    """
    diff = new - average
    if weight < 0.5:
        return fused_multiply_add(diff, weight, average)
    return fused_multiply_add(diff, -(1.0 - weight), new)


def bias_corrections(
    step: int, beta1: float, beta2: float, enabled: bool = True
) -> tuple[float, float]:
    """Return ``(1 - beta1**step, sqrt(1 - beta2**step))`` in double precision.

    ``step`` is the 1-based index of the update being computed.  With ``enabled=False`` both are 1.
    """
    if not enabled:
        return 1.0, 1.0
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


def adam_step(
    param: np.ndarray, grad: np.ndarray, state: AdamState, hp: AdamHyperParams
) -> tuple[np.ndarray, AdamState]:
    """One Adam-family update; returns ``(new_param, new_state)`` and modifies nothing.

    ``param`` and ``grad`` must have the same shape and floating dtype; ``state`` must come from
    :func:`init_state` (or an earlier call) for this parameter, with ``max_exp_avg_sq`` present
    exactly when ``hp.amsgrad``.  Raises ``ValueError`` when shapes or the AMSGrad state disagree.
    """
    param = np.asarray(param)
    grad = np.asarray(grad)
    if grad.shape != param.shape:
        raise ValueError(f"grad has shape {grad.shape}, expected the parameter's {param.shape}")
    if hp.amsgrad != (state.max_exp_avg_sq is not None):
        raise ValueError("state.max_exp_avg_sq must be present exactly when amsgrad=True")
    dtype = param.dtype
    grad = grad.astype(dtype, copy=False)

    if hp.maximize:
        grad = -grad
    if hp.weight_decay != 0.0:
        if hp.decoupled_weight_decay:
            param = param * (1.0 - hp.lr * hp.weight_decay)
        else:
            grad = grad + hp.weight_decay * param

    step = state.step + 1
    exp_avg = ema(state.exp_avg, grad, 1.0 - hp.beta1)
    exp_avg_sq = fused_multiply_add((1.0 - hp.beta2) * grad, grad, state.exp_avg_sq * hp.beta2)

    max_exp_avg_sq = None
    second = exp_avg_sq
    if hp.amsgrad:
        max_exp_avg_sq = np.maximum(state.max_exp_avg_sq, exp_avg_sq)
        second = max_exp_avg_sq

    bc1, bc2_sqrt = bias_corrections(step, hp.beta1, hp.beta2, hp.bias_correction)
    step_size = hp.lr / bc1
    denom = np.sqrt(second) / bc2_sqrt + hp.eps
    new_param = param + ((-step_size) * exp_avg) / denom

    def _as(x: np.ndarray | None) -> np.ndarray | None:
        return None if x is None else np.asarray(x, dtype=dtype)

    return _as(new_param), AdamState(step, _as(exp_avg), _as(exp_avg_sq), _as(max_exp_avg_sq))
