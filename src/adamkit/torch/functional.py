r"""One Adam step over lists of tensors, and the one function that chooses how it is computed.

Every implementation has the same keyword-only signature (:data:`StepFn`) and updates ``params``,
``exp_avgs``, ``exp_avg_sqs``, ``max_exp_avg_sqs`` and ``state_steps`` in place; ``grads`` are only
read.  ``weight_decay`` is the *effective* coefficient (the optimizer turns
``decay_mode="independent"`` into ``weight_decay / initial_lr``, see :mod:`adamkit.torch.optim`),
so the math below is the whole story::

    t  <- t + 1                                  (state_steps, float32 0-d tensors, like torch)
    g  <- -g                                     if maximize
    theta <- theta * (1 - lr * lambda)           decoupled decay (AdamW)
    g  <- g + lambda * theta                     coupled L2 decay (Adam)
    m  <- lerp(m, g, 1 - beta1)
    v  <- beta2 * v + (1 - beta2) * g * g
    v_max <- max(v_max, v)                       if amsgrad; v_max replaces v below
    theta <- theta - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Implementations (``impl=``):

- ``"torch"``: torch ops, op for op the same as ``torch.optim.adam._single_tensor_adam`` (what
  ``torch.optim.Adam`` runs on CPU, and elsewhere with ``foreach=False``), so results are
  bit-identical to it in every dtype (tested on CPU in float32, float64, bfloat16 and complex64);
  device-agnostic; complex parameters are updated through ``torch.view_as_real`` like torch.
- ``"reference"``: :func:`adamkit.kernels.adam_update_` on zero-copy ``tensor.numpy()`` views;
  CPU float32/float64 tensors only.  This is how the NumPy reference (and later the fast NumPy
  kernels) run under the torch front end.  DTensors (FSDP2) are viewed through their local
  shards: the step is elementwise, so updating each rank's shard is the whole step.
- ``"numba"``: the fused kernel of :mod:`adamkit.kernels.numba_cpu` on the same NumPy views
  (float64 bit-identical to the reference; float32 within a few ulps per step: it uses a
  hardware FMA and a reciprocal where torch and the reference round differently).
- ``"auto"``: ``"numba"`` for CPU float32/float64 groups when numba is installed (the fastest
  path on CPU, see ``adamkit bench``), else ``"torch"``.  :func:`select_impl` is the one place
  that decides.

Bias corrections are computed from the step count as a Python float (double precision) in eager
mode.  While ``torch.compile`` traces, the count stays a tensor (reading it would break the graph)
and the corrections are computed in float64 tensor arithmetic instead.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from adamkit.core.config import AdamHyperParams
from adamkit.kernels import adam_update_, numba_available
from adamkit.torch._addresses import Table, numba_threads, param_tables, update_tables_

__all__ = ["IMPLS", "StepFn", "adam_reference_", "adam_torch_", "select_impl"]

IMPLS: tuple[str, ...] = ("auto", "torch", "reference", "numba")

_REFERENCE_DTYPES = (torch.float32, torch.float64)


class StepFn(Protocol):
    """Signature shared by every implementation (all sequences have one entry per parameter)."""

    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        max_exp_avg_sqs: Sequence[Tensor],
        state_steps: Sequence[Tensor],
        *,
        lr: float | Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled_weight_decay: bool,
        amsgrad: bool,
        maximize: bool,
    ) -> None: ...


def _step_value(step_t: Tensor) -> float | Tensor:
    # Eager: the count as a Python float, so the corrections below are double precision.
    # Tracing: `.item()` would break the graph; float64 tensor arithmetic keeps the precision.
    if torch.compiler.is_compiling():
        return step_t.to(torch.float64)
    return step_t.item()


def adam_torch_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    update_clip: str | None = None,
    rms_threshold: float = 1.0,
    atan2_a: float = 1.27,
    atan2_b: float = 1.0,
) -> list[float]:
    """Adam step with torch ops (see the module docstring); any device, floating or complex dtype.

    ``max_exp_avg_sqs`` has one tensor per parameter when ``amsgrad`` and is empty otherwise.
    ``lr`` may be a float or a 0-d tensor (used as torch uses it, so a float32 tensor lr rounds
    ``lr / (1 - beta1^t)`` to float32 exactly as ``torch.optim.Adam`` does).

    ``update_clip`` is the stability guard's per-tensor update rule, the torch twin of
    :func:`adamkit.guard.reference.clipped_adam_step`: ``None`` (default) is plain Adam above,
    op for op; ``"rms"`` (StableAdamW) runs each tensor with ``lr * s``,
    ``s = 1 / max(1, RMS / rms_threshold)``, ``RMS = sqrt(mean(g^2 / max(v_hat, eps^2)))``
    (decoupled decay uses the clipped lr too; ``s`` is read with ``.item()``, one device sync per
    tensor); ``"atan2"`` (Adam-atan2) moves ``theta`` by ``-lr * atan2_a * atan2(m_hat,
    atan2_b * sqrt(v_hat))`` and ignores ``eps``.  Returns the per-tensor factors ``s`` for
    ``"rms"``, an empty list otherwise.
    """
    if isinstance(lr, Tensor) and lr.dim() != 0:
        lr = lr.squeeze()
    factors: list[float] = []
    for i, param in enumerate(params):
        # New tensors, never in-place ops on the caller's gradient.
        grad = grads[i] if not maximize else -grads[i]
        exp_avg = exp_avgs[i]
        exp_avg_sq = exp_avg_sqs[i]
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsgrad else None
        step_t = state_steps[i]
        step_t += 1

        if weight_decay != 0:
            if decoupled_weight_decay:
                if update_clip != "rms":  # "rms" decays with the clipped lr, known further down
                    param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)
            exp_avg_sq = torch.view_as_real(exp_avg_sq)
            if max_exp_avg_sq is not None:
                max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
            param = torch.view_as_real(param)

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        step = _step_value(step_t)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1

        second = exp_avg_sq
        if max_exp_avg_sq is not None:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            second = max_exp_avg_sq
        if update_clip == "atan2":
            v_hat_sqrt = second.sqrt() / bias_correction2_sqrt
            update = torch.atan2(exp_avg / bias_correction1, v_hat_sqrt.mul_(atan2_b))
            param.add_(update.mul_(atan2_a), alpha=-lr)
            continue
        if update_clip == "rms":
            factor = _rms_lr_factor(grad, second, 1 - beta2**step, eps, rms_threshold)
            factors.append(factor)
            clipped_lr = lr * factor if factor < 1.0 else lr
            if weight_decay != 0 and decoupled_weight_decay:
                param.mul_(1 - clipped_lr * weight_decay)
            step_size = clipped_lr / bias_correction1
        denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
    return factors


def _rms_lr_factor(
    grad: Tensor, second: Tensor, bias_correction2: float | Tensor, eps: float, threshold: float
) -> float:
    # StableAdamW's factor 1 / max(1, RMS / threshold), as adamkit.guard.update.rms_ratio: at
    # least float32 (bf16 would make the mean meaningless), and 0/0 elements count as 0.
    if grad.numel() == 0:
        return 1.0
    dtype = torch.promote_types(grad.dtype, torch.float32)
    g2 = grad.to(dtype).square()
    v_hat = (second.to(dtype) / bias_correction2).clamp_(min=eps * eps)
    ratio = torch.where(g2 == 0, 0.0, g2 / v_hat)
    rms = ratio.mean().sqrt().item() / threshold
    return 1.0 / rms if rms > 1.0 else 1.0


def _dtensor_type() -> type | None:
    # No DTensor can exist unless torch.distributed.tensor has been imported; do not import it
    # (or torch.distributed) for the many programs that never use it.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _check_shards(
    params: Sequence[Tensor], *others: Sequence[Tensor], dtensor: type | None
) -> None:
    # A DTensor parameter can be updated shard by shard only if its gradient and state are
    # DTensors laid out the same way (FSDP2 makes them so); anything else would pair numbers of
    # different elements.
    if dtensor is None:
        return
    for i, p in enumerate(params):
        if not isinstance(p, dtensor):
            continue
        for tensors in others:
            t = tensors[i]
            if (
                not isinstance(t, dtensor)
                or t.device_mesh != p.device_mesh
                or t.placements != p.placements
                or any(placement.is_partial() for placement in p.placements)
            ):
                layout = t.placements if isinstance(t, dtensor) else type(t).__name__
                raise ValueError(
                    "impl='reference' updates a DTensor parameter shard by shard and needs its "
                    f"gradient and state laid out the same way; the parameter has {p.placements}"
                    f", got {layout}; use impl='torch' or impl='auto'"
                )


def _numpy_view(tensor: Tensor, dtensor: type | None) -> np.ndarray:
    # Shares memory with `tensor` (strides included), so writes land in the tensor; a DTensor's
    # local shard likewise shares memory with the DTensor.
    if dtensor is not None and isinstance(tensor, dtensor):
        tensor = tensor.to_local()
    return tensor.detach().numpy()


_HP_CACHE: dict[tuple[Any, ...], AdamHyperParams] = {}


def hyper_params(
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
) -> AdamHyperParams:
    """``AdamHyperParams`` of these settings (validated as its constructor validates:
    ``ValueError``/``TypeError``), from a small cache: the same settings recur every step, and
    construction validates every field."""
    values = (lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize)
    # Types are part of the key (1 == 1.0 == True); anything else than plain numbers and flags
    # is validated every time.
    cacheable = all(type(v) in (float, int, bool) for v in values)
    key = tuple((type(v), v) for v in values) if cacheable else None
    hp = _HP_CACHE.get(key) if key is not None else None
    if hp is None:
        hp = AdamHyperParams(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
        )
        if key is not None:
            if len(_HP_CACHE) >= 64:  # an lr schedule makes a new key every step
                _HP_CACHE.clear()
            _HP_CACHE[key] = hp
    return hp


def _adam_numpy_(
    kernel: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
) -> None:
    # The NumPy-backed step shared by "reference" and "numba" (kernel: adam_update_'s impl).
    if not params:
        return
    dtensor = _dtensor_type()
    moments = (exp_avgs, exp_avg_sqs, *((max_exp_avg_sqs,) if amsgrad else ()))
    _check_shards(params, grads, *moments, dtensor=dtensor)
    hp = hyper_params(
        float(lr), beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize
    )
    rest: Sequence[int] = range(len(params))
    tables: dict[torch.dtype, Table] = {}
    if kernel != "reference" and dtensor is None:
        maxes = moments[2] if amsgrad else [None] * len(params)
        tables, rest = param_tables(
            list(zip(params, grads, exp_avgs, exp_avg_sqs, maxes, state_steps, strict=True))
        )
    # Views first: anything that raises does so before the step counts change.
    views = [
        [_numpy_view(tensors[i], dtensor) for i in rest] for tensors in (params, grads, *moments)
    ]
    update_tables_(tables, hp)
    if not rest:
        return
    counts = [state_steps[i] for i in rest]
    # One op and one read for all counts: per-tensor `.item()` calls dominate tiny tensors.
    torch._foreach_add_(counts, 1.0)
    steps = [int(n) for n in torch.stack(counts).tolist()]
    adam_update_(
        views[0],
        views[1],
        views[2],
        views[3],
        views[4] if amsgrad else [None] * len(steps),
        steps,
        hp,
        impl=kernel,
    )


def _numpy_backed(kernel: str, name: str, doc: str) -> StepFn:
    # adam_reference_ and adam_numba_: the same NumPy-view step, told which kernel to run.
    def step(
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        max_exp_avg_sqs: Sequence[Tensor],
        state_steps: Sequence[Tensor],
        **hyper: Any,
    ) -> None:
        with numba_threads() if kernel != "reference" else contextlib.nullcontext():
            _adam_numpy_(
                kernel, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **hyper
            )

    step.__name__ = step.__qualname__ = name
    step.__doc__ = doc
    return step


adam_reference_ = _numpy_backed(
    "reference",
    "adam_reference_",
    """Adam step by :func:`adamkit.kernels.adam_update_` (``impl="reference"``) on NumPy views.

    Same arguments as :func:`adam_torch_` (:data:`StepFn`).  Tensors must be on the CPU with
    dtype float32 or float64 (:func:`select_impl` checks this); ``lr`` is used as a Python float.
    DTensors are updated through their local shards and need gradient and state placed like the
    parameter (else ``ValueError``, before anything changes).
    """,
)

adam_numba_ = _numpy_backed(
    "auto",
    "adam_numba_",
    """Adam step by the fused numba kernel on NumPy views; same contract as
    :func:`adam_reference_`.

    Tensors the kernel cannot take (non-contiguous) go to the reference step.  numba's thread
    count follows ``torch.get_num_threads()`` (capped by ``NUMBA_NUM_THREADS``), so
    ``torch.set_num_threads`` governs both; torch's own count is restored afterwards.
    """,
)


_IMPLEMENTATIONS: dict[str, StepFn] = {
    "torch": adam_torch_,
    "reference": adam_reference_,
    "numba": adam_numba_,
}


def _numpy_backed(params: Sequence[Tensor]) -> bool:
    return all(
        p.device.type == "cpu"
        and p.dtype in _REFERENCE_DTYPES
        and (p.grad is None or p.grad.dtype == p.dtype)
        for p in params
    )


def select_impl(impl: str, params: Sequence[Tensor]) -> StepFn:
    """Return the step function for ``impl`` and one group's ``params``; the one point of choice.

    ``"auto"`` takes the fused numba kernel when numba is installed and every parameter is a CPU
    float32/float64 tensor (with a gradient of the same dtype), outside ``torch.compile``
    tracing; anything else (bfloat16, complex, CUDA, compiled steps) runs the torch-ops step.
    Raises ``ValueError`` naming ``impl`` when it is unknown or cannot run on these tensors
    (``"reference"`` and ``"numba"`` need CPU float32/float64 tensors), ``ImportError`` for
    ``"numba"`` without numba.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "auto":
        if (
            params
            and not torch.compiler.is_compiling()
            and _numpy_backed(params)
            and numba_available()
        ):
            return adam_numba_
        return adam_torch_
    if impl == "numba" and not numba_available():
        raise ImportError("impl='numba' needs numba: pip install adamkit[fast]")
    if impl in ("reference", "numba"):
        for p in params:
            if p.device.type != "cpu" or p.dtype not in _REFERENCE_DTYPES:
                raise ValueError(
                    f"impl={impl!r} needs CPU float32/float64 tensors, got a {p.dtype} "
                    f"tensor on {p.device}; use impl='torch' or impl='auto'"
                )
    return _IMPLEMENTATIONS[impl]
