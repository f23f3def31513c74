"""In-place Adam steps over NumPy arrays, and the one place that chooses how they are computed.

``adam_update_`` is what the stateful front ends call: ``adamkit.numpy`` directly, ``adamkit.torch``
on zero-copy ``tensor.numpy()`` views of CPU tensors.  Each implementation lives in its own module
and is tested against :func:`adamkit.core.reference.adam_step`, the specification.

Implementations (``impl=``):

- ``"reference"``: the pure reference step, results written back into the given arrays.
- ``"auto"``: the fastest valid implementation for the arrays at hand (today: ``"reference"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step

__all__ = ["IMPLS", "adam_update_", "resolve_impl"]

IMPLS: tuple[str, ...] = ("auto", "reference")


def resolve_impl(impl: str) -> str:
    """Map ``impl`` to a concrete implementation name; raise ``ValueError`` for unknown names."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    return "reference" if impl == "auto" else impl


def _reference_update_(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
    max_exp_avg_sqs: Sequence[np.ndarray | None],
    steps: Sequence[int],
    hp: AdamHyperParams,
) -> None:
    for param, grad, m, v, vmax, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, strict=True
    ):
        new_param, new = adam_step(param, grad, AdamState(step - 1, m, v, vmax), hp)
        np.copyto(param, new_param)
        np.copyto(m, new.exp_avg)
        np.copyto(v, new.exp_avg_sq)
        if vmax is not None:
            np.copyto(vmax, new.max_exp_avg_sq)


def adam_update_(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
    max_exp_avg_sqs: Sequence[np.ndarray | None],
    steps: Sequence[int],
    hp: AdamHyperParams,
    *,
    impl: str = "auto",
) -> None:
    """Apply one Adam step to each parameter in place (parameters and moments are overwritten).

    All sequences have one entry per parameter.  ``steps[i]`` is the 1-based index of the update
    being applied to ``params[i]`` (the caller increments its counter first).  Each array of a
    parameter has the parameter's shape and dtype (float32 or float64); ``max_exp_avg_sqs[i]`` is an
    array when ``hp.amsgrad`` and ``None`` otherwise.  ``grads`` are only read.  The caller
    validates; this function assumes consistent inputs.
    """
    resolve_impl(impl)
    _reference_update_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp)
