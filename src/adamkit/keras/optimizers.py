r"""adamkit's Adam and AdamW as Keras 3 optimizers, written with ``keras.ops`` for every backend.

The math is :mod:`adamkit.core.reference` (the paper's, torch's and optax's), with Keras's names
for the arguments.  One update of a variable :math:`\theta` with gradient :math:`g`, at step
:math:`t = 1, 2, \dots` (``iterations + 1``; with gradient accumulation, the number of real
updates)::

    g  <- clip(g)                             the base class: clipnorm / clipvalue / global_clipnorm
    theta <- theta - lr * lambda * theta      AdamW (decoupled decay, before the moments)
    g  <- -g                                  if maximize
    g  <- g + lambda * theta                  Adam with weight_decay (coupled L2, like torch's Adam)
    m  <- m + (1 - beta_1) * (g - m)
    v  <- beta_2 * v + (1 - beta_2) * g * g
    v_max <- max(v_max, v)                    if amsgrad (the max is over v, as in torch and Keras)
    theta <- theta - (lr / (1 - beta_1^t)) * m / (sqrt(v_max or v) / sqrt(1 - beta_2^t) + epsilon)

(with ``bias_correction=False`` both corrections are 1).

**Where epsilon sits.** ``epsilon`` is added to :math:`\sqrt{\hat v}`, after bias correction, as in
Algorithm 1 of Kingma & Ba, ``torch.optim.Adam`` and optax; the default is ``1e-8``.
``keras.optimizers.Adam`` instead adds its ``epsilon`` ("epsilon hat", default ``1e-7``) to
:math:`\sqrt{v}` *before* bias correction and folds the correction into the step size.  The two
agree exactly when ``epsilon_keras = epsilon * sqrt(1 - beta_2^t)``, which depends on the step, so
no constant makes them equal; they differ noticeably only while :math:`\sqrt{\hat v}` is not much
larger than epsilon (tiny gradients, early steps).

**Weight decay.** ``adamkit.keras.Adam(weight_decay=λ)`` is coupled L2 (``g + λ·θ`` enters the
moments), as ``torch.optim.Adam`` and the other adamkit front ends; ``keras.optimizers.Adam``'s
``weight_decay`` is decoupled.  Pass ``decoupled_weight_decay=True``, or use :class:`AdamW`, for
the decoupled form ``θ ← θ − lr·λ·θ`` (Keras's and torch's AdamW; applied before the moments are
updated, after clipping).  ``exclude_from_weight_decay`` is honoured by both forms.

**Bias corrections** are computed as ``-expm1(t * log(beta))`` in at least float32 (float64 for
float64 variables): ``1 - beta**t`` in float32 loses most of its digits to cancellation for small
``t`` (``1 - float32(0.999)`` is off by 1.3e-5 relative), and JAX has no float64 by default.

All other Keras options come from ``keras.optimizers.Optimizer`` unchanged: a float or a
``LearningRateSchedule`` (or callable) ``learning_rate``, ``clipnorm``, ``clipvalue``,
``global_clipnorm``, ``use_ema``/``ema_momentum``/``ema_overwrite_frequency``,
``loss_scale_factor`` and ``gradient_accumulation_steps``.

State, per trained variable, in the variable's dtype (torch's names): ``exp_avg`` (m),
``exp_avg_sq`` (v) and, with ``amsgrad``, ``max_exp_avg_sq``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from adamkit.core.config import check_betas, check_eps, check_flag, check_lr, check_weight_decay

__all__ = ["Adam", "AdamW"]

LearningRate = float | keras.optimizers.schedules.LearningRateSchedule | Callable[[], Any]


def _check_learning_rate(learning_rate: Any) -> Any:
    # Schedules and callables are evaluated by the base class at every step; only a number can
    # be checked now.  check_lr also turns an int into the float the base class insists on.
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule) or callable(
        learning_rate
    ):
        return learning_rate
    return check_lr(learning_rate, "learning_rate")


def _check_not_yet_available(state: Any, guard: Any) -> None:
    if state is not None:
        raise NotImplementedError(
            f"state={state!r} is not available on the Keras front end yet; only state=None "
            "(moments stored in the variable's dtype) is"
        )
    if guard is not None and guard is not False:
        raise NotImplementedError(
            f"guard={guard!r} is not available on the Keras front end yet; only guard=None "
            "(or False) is"
        )


def _const(value: float, dtype: str) -> Any:
    # Keras's torch backend turns a bare Python float into a floatx (float32) tensor before it
    # meets a float64 one; converting with the dtype keeps the double's digits.
    return ops.convert_to_tensor(value, dtype=dtype)


def _bias_correction(beta: float, step: Any, dtype: str) -> Any:
    """``1 - beta**step`` as a ``dtype`` tensor (``step`` is one), or 1.0 when ``beta == 0``."""
    if beta == 0.0:
        return 1.0
    return ops.negative(ops.expm1(ops.multiply(step, _const(math.log(beta), dtype))))


@keras.saving.register_keras_serializable(package="adamkit")
class Adam(keras.optimizers.Optimizer):
    """Adam (Kingma & Ba) with adamkit's math on any Keras 3 backend; see the module docstring.

    Arguments keep Keras's names: ``learning_rate`` (float >= 0, a ``LearningRateSchedule`` or a
    callable), ``beta_1``/``beta_2`` (in [0, 1)), ``epsilon`` (>= 0, added to sqrt(v_hat)),
    ``amsgrad``, ``weight_decay`` (>= 0 or None; coupled L2 unless ``decoupled_weight_decay``).
    adamkit adds ``maximize`` (ascend instead of descend), ``decoupled_weight_decay`` and
    ``bias_correction`` (``False`` drops both corrections).
    ``state`` and ``guard`` are reserved for adamkit's state formats and stability guard; only
    their defaults are accepted on the Keras front end so far.  The remaining keywords are
    ``keras.optimizers.Optimizer``'s.

    Raises ``ValueError``/``TypeError`` (adamkit's shared messages, e.g. ``Invalid beta parameter
    at index 0: 1.0 (beta1 must be in [0, 1))``) for bad hyper-parameters, ``NotImplementedError``
    for a ``state`` or ``guard`` other than the default, and Keras's ``ValueError`` for bad base
    options or unknown keywords.
    """

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        amsgrad: bool = False,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        bias_correction: bool = True,
        state: Any = None,
        guard: Any = None,
        **kwargs: Any,
    ) -> None:
        # Everything is checked before the base class creates variables, so a bad value leaves
        # nothing half-built behind.
        learning_rate = _check_learning_rate(learning_rate)
        beta_1, beta_2 = check_betas((beta_1, beta_2))
        epsilon = check_eps(epsilon, "epsilon")
        if weight_decay is not None:
            weight_decay = check_weight_decay(weight_decay)
        amsgrad = check_flag(amsgrad, "amsgrad")
        maximize = check_flag(maximize, "maximize")
        decoupled_weight_decay = check_flag(decoupled_weight_decay, "decoupled_weight_decay")
        bias_correction = check_flag(bias_correction, "bias_correction")
        _check_not_yet_available(state, guard)
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = amsgrad
        self.maximize = maximize
        self.decoupled_weight_decay = decoupled_weight_decay
        self.bias_correction = bias_correction
        self.state = state
        self.guard = guard

    def build(self, var_list: list[Any]) -> None:
        """Create ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) for each variable."""
        if self.built:
            return
        super().build(var_list)
        self._exp_avgs, self._exp_avg_sqs = self.add_optimizer_variables(
            var_list, ["exp_avg", "exp_avg_sq"]
        )
        if self.amsgrad:
            self._max_exp_avg_sqs = self.add_optimizer_variables(var_list, "max_exp_avg_sq")

    def _decays(self, variable: Any) -> bool:
        return bool(self.weight_decay) and self._use_weight_decay(variable)

    def _apply_weight_decay(self, variables: list[Any]) -> None:
        # The base class calls this for decoupled decay, after clipping and before update_step;
        # the coupled form lives in update_step.  Written here rather than inherited so that
        # 1 - lr * lambda is formed in the variable's dtype (Keras's torch backend uses float32).
        if not self.decoupled_weight_decay:
            return
        for variable in variables:
            if self._decays(variable):
                dtype = variable.dtype
                lr = ops.cast(self.learning_rate, dtype)
                factor = ops.subtract(
                    _const(1.0, dtype), ops.multiply(lr, _const(self.weight_decay, dtype))
                )
                variable.assign(ops.multiply(variable, factor))

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Apply one Adam update to ``variable`` (called by the base class once per variable)."""
        dtype = variable.dtype
        scalar_dtype = "float64" if dtype == "float64" else "float32"
        index = self._get_variable_index(variable)
        grad = ops.cast(gradient, dtype)
        if self.maximize:
            grad = ops.negative(grad)
        if not self.decoupled_weight_decay and self._decays(variable):
            grad = ops.add(grad, ops.multiply(variable, _const(self.weight_decay, dtype)))

        lr = ops.cast(learning_rate, scalar_dtype)
        if self.bias_correction:
            step = ops.cast(self.iterations + 1, scalar_dtype)
            bc1 = _bias_correction(self.beta_1, step, scalar_dtype)
            step_size = ops.cast(ops.divide(lr, bc1), dtype)
            bc2 = _bias_correction(self.beta_2, step, scalar_dtype)
            bc2_sqrt = ops.cast(ops.sqrt(bc2), dtype)
        else:
            step_size, bc2_sqrt = ops.cast(lr, dtype), _const(1.0, dtype)

        exp_avg = self._exp_avgs[index]
        exp_avg_sq = self._exp_avg_sqs[index]
        self.assign_add(
            exp_avg, ops.multiply(ops.subtract(grad, exp_avg), _const(1.0 - self.beta_1, dtype))
        )
        self.assign(
            exp_avg_sq,
            ops.add(
                ops.multiply(exp_avg_sq, _const(self.beta_2, dtype)),
                ops.multiply(ops.multiply(grad, _const(1.0 - self.beta_2, dtype)), grad),
            ),
        )
        second = exp_avg_sq
        if self.amsgrad:
            second = self._max_exp_avg_sqs[index]
            # Not ops.maximum: Keras 3.10-3.15's torch backend computes it in float32 for float64
            # inputs.  A NaN in v still propagates (the comparison is False).  ``.value``
            # because jnp.where no longer accepts Keras variables.
            old, new = second.value, exp_avg_sq.value
            self.assign(second, ops.where(ops.greater_equal(old, new), old, new))
        denom = ops.add(ops.divide(ops.sqrt(second), bc2_sqrt), _const(self.epsilon, dtype))
        self.assign_sub(variable, ops.divide(ops.multiply(exp_avg, step_size), denom))

    def get_config(self) -> dict[str, Any]:
        """Keras config: the base options plus this optimizer's hyper-parameters."""
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "maximize": self.maximize,
                "decoupled_weight_decay": self.decoupled_weight_decay,
                "bias_correction": self.bias_correction,
                "state": self.state,
                "guard": self.guard,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="adamkit")
class AdamW(Adam):
    """AdamW (Loshchilov & Hutter): :class:`Adam` with decoupled decay ``θ ← θ − lr·λ·θ``.

    ``weight_decay`` defaults to ``0.01`` (torch's and adamkit's AdamW default; Keras's AdamW uses
    ``0.004``).  Same arguments and errors as :class:`Adam`, without ``decoupled_weight_decay``.
    """

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        weight_decay: float | None = 0.01,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        amsgrad: bool = False,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
        *,
        maximize: bool = False,
        bias_correction: bool = True,
        state: Any = None,
        guard: Any = None,
        **kwargs: Any,
    ) -> None:
        if "decoupled_weight_decay" in kwargs:
            raise TypeError("AdamW always decouples weight decay; use Adam for coupled L2 decay")
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
            maximize=maximize,
            decoupled_weight_decay=True,
            bias_correction=bias_correction,
            state=state,
            guard=guard,
            **kwargs,
        )

    def get_config(self) -> dict[str, Any]:
        """Keras config, without ``decoupled_weight_decay`` (always True here)."""
        config = super().get_config()
        del config["decoupled_weight_decay"]
        return config
