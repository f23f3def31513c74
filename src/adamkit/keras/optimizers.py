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

State, per trained variable (torch's names): ``exp_avg`` (m), ``exp_avg_sq`` (v) and, with
``amsgrad``, ``max_exp_avg_sq``.  Their dtype is chosen by ``state=`` (the names of
:mod:`adamkit.formats`; "compute in fp32, store compressed")::

    state=None     the variable's dtype; the step is computed in that dtype (Keras's behaviour)
    state="fp32"   float32 variables; the step is computed in float32 (float64 for float64
                   variables) and the result rounded to nearest into the variable's dtype, so
                   bfloat16/float16 models keep full-precision moments
    state="bf16"   bfloat16 variables (half of fp32's memory); the step is computed in float32
                   (float64 for float64 variables: rounded to float32 first) and m, v, v_max are
                   rounded stochastically when stored, as in adamkit.numpy and adamkit.torch:
                   unbiased, so small EMA increments (v's (1 - beta_2) = 1e-3 relative is below
                   half a bf16 ulp, 2**-9) still count on average, where nearest rounding would
                   freeze v.  The random bits come from a keras.random.SeedGenerator whose state
                   is an optimizer variable (saved, traceable; keras.utils.set_random_seed makes
                   runs repeatable)
    state="int8"   (and "int8-companded") NotImplementedError: block-wise quantization needs
                   per-block scales that adamkit.torch and adamkit.numpy provide

**Stability guard** (``guard=``, the names of :func:`adamkit.guard.resolve_guard`).  Only the
non-finite skip is offered here (``guard=True``, ``"default"``, or a dict/``GuardConfig`` equal to
the default): when any gradient of a step holds NaN or Inf, the step changes nothing — model
variables, moments, ``iterations`` (so bias correction and learning-rate schedules do not advance),
EMA and gradient accumulators — and ``skipped_steps`` (an integer optimizer variable, saved with
the model) grows by one.  It is traceable: one ``all_finite`` flag, reduced over all gradients, and
every variable the step touched is reset with ``ops.where(all_finite, new, old)``; nothing
branches in Python on a tensor.  Cost: one copy of the trained variables and the optimizer state
per step (on eager backends; under ``jit`` the old values are just kept alive).  The default is
``guard=None`` (off), unlike ``adamkit.torch``: off, the step is exactly ``keras.optimizers``-style
with no extra work, and on it is not free (see the cost).  Update clipping, gradient-spike
clipping and loss-spike handling (``guard="all"`` and such options) raise ``NotImplementedError``;
they are in ``adamkit.torch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from adamkit.core.config import check_betas, check_eps, check_flag, check_lr, check_weight_decay
from adamkit.formats import get_format
from adamkit.guard.config import GuardConfig, resolve_guard

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


#: ``state=`` values this front end implements, and the moments' dtype for each (None: the
#: variable's).
STATE_DTYPES: dict[str | None, str | None] = {None: None, "fp32": "float32", "bf16": "bfloat16"}


def _check_state(state: Any) -> str | None:
    """Validate ``state=`` with the words of :func:`adamkit.formats.get_format`; return it with
    ``"native"`` as ``None``.  Raises ``ValueError``/``TypeError`` for values no front end knows
    and ``NotImplementedError`` for formats that only adamkit.torch and adamkit.numpy offer."""
    if state is not None and not isinstance(state, str):
        raise TypeError(
            f"state must be None or a format name ('fp32', 'bf16'), got {type(state).__name__} "
            f"{state!r}"
        )
    get_format(state)  # ValueError listing the registered names for an unknown one
    state = None if state == "native" else state
    if state not in STATE_DTYPES:
        raise NotImplementedError(
            f"state={state!r} is available in adamkit.torch and adamkit.numpy; not on the Keras "
            "front end yet (it offers state=None, 'fp32' and 'bf16')"
        )
    return state


def _check_guard(guard: Any) -> bool:
    """Whether ``guard=`` asks for the non-finite skip.  Raises ``ValueError``/``TypeError``
    like :func:`adamkit.guard.resolve_guard`, and ``NotImplementedError`` for any other guard
    behaviour (update or spike clipping, loss spikes, diagnostics)."""
    config = resolve_guard(guard)
    if config is None or config == GuardConfig(skip_nonfinite=False):
        return False
    if config != GuardConfig():
        raise NotImplementedError(
            f"guard={guard!r} is not available on the Keras front end yet: it offers only the "
            "non-finite skip (guard=True or 'default'); update clipping, gradient-spike clipping "
            "and loss-spike handling are in adamkit.torch"
        )
    return True


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
    ``state`` (``None``, ``"fp32"``, ``"bf16"``) picks the moments' dtype and ``guard``
    (``None``/``False`` or ``True``/``"default"``) the non-finite skip, counted in
    :attr:`skipped_steps`; see the module docstring.  The remaining keywords are
    ``keras.optimizers.Optimizer``'s.

    Raises ``ValueError``/``TypeError`` (adamkit's shared messages, e.g. ``Invalid beta parameter
    at index 0: 1.0 (beta1 must be in [0, 1))``) for bad hyper-parameters and unknown
    ``state``/``guard`` values, ``NotImplementedError`` for ``state="int8"`` and guard options
    other than the non-finite skip, and Keras's ``ValueError`` for bad base options or unknown
    keywords.
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
        state = _check_state(state)
        skip_nonfinite = _check_guard(guard)
        if skip_nonfinite and not isinstance(guard, (bool, str)):
            guard = True  # a default dict/GuardConfig: keep the config JSON-serializable
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
        self._skipped_steps = None
        if skip_nonfinite:
            with keras.name_scope(self.name, caller=self):
                self._skipped_steps = self.add_variable(
                    (), dtype="int", aggregation="only_first_replica", name="skipped_steps"
                )

    @property
    def skipped_steps(self) -> Any:
        """The number of steps the non-finite guard skipped (an integer Keras variable), or
        ``None`` without ``guard``."""
        return self._skipped_steps

    def build(self, var_list: list[Any]) -> None:
        """Create ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) for each variable, in the
        dtype ``state`` asks for."""
        if self.built:
            return
        super().build(var_list)
        # The variables' order is the saved checkpoint's layout (Keras saves them by position):
        # m and v interleaved per variable, then v_max, as keras.optimizers.Adam does.
        if self.state is None:
            self._exp_avgs, self._exp_avg_sqs = self.add_optimizer_variables(
                var_list, ["exp_avg", "exp_avg_sq"]
            )
            if self.amsgrad:
                self._max_exp_avg_sqs = self.add_optimizer_variables(var_list, "max_exp_avg_sq")
            return
        pairs = [
            (self._add_moment(v, "exp_avg"), self._add_moment(v, "exp_avg_sq")) for v in var_list
        ]
        self._exp_avgs = [m for m, _ in pairs]
        self._exp_avg_sqs = [v for _, v in pairs]
        if self.amsgrad:
            self._max_exp_avg_sqs = [self._add_moment(v, "max_exp_avg_sq") for v in var_list]
        if self.state == "bf16":
            # Its state is an optimizer variable: saved with the model, threaded through JAX's
            # stateless apply, and reset with everything else on a skipped step.
            self._rounding_seed = keras.random.SeedGenerator(name="bf16_rounding")
            self._track_variable(self._rounding_seed.state)

    def _add_moment(self, variable: Any, key: str) -> Any:
        # add_optimizer_variables, with the state's dtype instead of the variable's (same names).
        if self._overwrite_variable_with_gradient(variable):
            return None
        return self.add_variable(
            variable.shape,
            dtype=STATE_DTYPES[self.state],
            name=f"{variable.path.replace('/', '_')}_{key}",
            layout=getattr(variable, "_layout", None),
        )

    def apply(self, grads: Any, trainable_variables: Any = None) -> None:
        """Keras's ``apply``; with the guard, a step with a NaN/Inf gradient changes nothing but
        :attr:`skipped_steps` (see the module docstring)."""
        if self._skipped_steps is None or len(grads) == 0:
            return super().apply(grads, trainable_variables)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if not self.built:  # as the base class does, so the old state can be read first
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
                self.built = True
        finite = ops.convert_to_tensor(True)
        for grad in grads:
            if grad is not None:
                finite = ops.logical_and(finite, ops.all(ops.isfinite(grad)))
        touched = [
            v
            for v in [*(trainable_variables or self._trainable_variables), *self.variables]
            if v is not self._skipped_steps
        ]
        # A copy: the torch backend assigns in place, so .value alone would see the new value.
        old = [ops.copy(v.value) for v in touched]
        super().apply(grads, trainable_variables)
        for variable, value in zip(touched, old, strict=True):
            variable.assign(ops.where(finite, variable.value, value))
        self._skipped_steps.assign_add(ops.cast(ops.logical_not(finite), self._skipped_steps.dtype))

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

    def _step_factors(self, learning_rate: Any, dtype: str) -> tuple[Any, Any]:
        """``(lr / (1 - beta_1^t), sqrt(1 - beta_2^t))`` as ``dtype`` tensors."""
        scalar_dtype = "float64" if dtype == "float64" else "float32"
        lr = ops.cast(learning_rate, scalar_dtype)
        if not self.bias_correction:
            return ops.cast(lr, dtype), _const(1.0, dtype)
        step = ops.cast(self.iterations + 1, scalar_dtype)
        bc1 = _bias_correction(self.beta_1, step, scalar_dtype)
        bc2 = _bias_correction(self.beta_2, step, scalar_dtype)
        return ops.cast(ops.divide(lr, bc1), dtype), ops.cast(ops.sqrt(bc2), dtype)

    def _direction(self, gradient: Any, variable: Any, dtype: str) -> Any:
        """The gradient in ``dtype``, negated for ``maximize``, plus coupled L2 decay."""
        grad = ops.cast(gradient, dtype)
        if self.maximize:
            grad = ops.negative(grad)
        if not self.decoupled_weight_decay and self._decays(variable):
            value = variable if dtype == variable.dtype else ops.cast(variable.value, dtype)
            grad = ops.add(grad, ops.multiply(value, _const(self.weight_decay, dtype)))
        return grad

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Apply one Adam update to ``variable`` (called by the base class once per variable)."""
        if self.state is not None:
            self._stored_update_step(gradient, variable, learning_rate)
            return
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        grad = self._direction(gradient, variable, dtype)
        step_size, bc2_sqrt = self._step_factors(learning_rate, dtype)

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

    def _stored_update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        # state="fp32"/"bf16": load the moments into the compute dtype, do the step there, store
        # them in their dtype (_round) and the variable, rounded to nearest, in its own.  The
        # update uses the unrounded moments, as adamkit.formats' step does.
        dtype = "float64" if variable.dtype == "float64" else "float32"
        index = self._get_variable_index(variable)
        grad = self._direction(gradient, variable, dtype)
        step_size, bc2_sqrt = self._step_factors(learning_rate, dtype)
        exp_avg_var, exp_avg_sq_var = self._exp_avgs[index], self._exp_avg_sqs[index]
        exp_avg = ops.cast(exp_avg_var.value, dtype)
        exp_avg_sq = ops.cast(exp_avg_sq_var.value, dtype)
        exp_avg = ops.add(
            exp_avg, ops.multiply(ops.subtract(grad, exp_avg), _const(1.0 - self.beta_1, dtype))
        )
        exp_avg_sq = ops.add(
            ops.multiply(exp_avg_sq, _const(self.beta_2, dtype)),
            ops.multiply(ops.multiply(grad, _const(1.0 - self.beta_2, dtype)), grad),
        )
        self.assign(exp_avg_var, self._round(exp_avg))
        self.assign(exp_avg_sq_var, self._round(exp_avg_sq))
        second = exp_avg_sq
        if self.amsgrad:
            max_var = self._max_exp_avg_sqs[index]
            old = ops.cast(max_var.value, dtype)
            second = ops.where(ops.greater_equal(old, exp_avg_sq), old, exp_avg_sq)
            self.assign(max_var, self._round(second))
        denom = ops.add(ops.divide(ops.sqrt(second), bc2_sqrt), _const(self.epsilon, dtype))
        update = ops.divide(ops.multiply(exp_avg, step_size), denom)
        new = ops.subtract(ops.cast(variable.value, dtype), update)
        self.assign(variable, ops.cast(new, variable.dtype))

    def _round(self, x: Any) -> Any:
        """``x`` in the state's dtype: float32 as is, bfloat16 rounded stochastically."""
        if self.state != "bf16":
            return ops.cast(x, STATE_DTYPES[self.state])
        # Stochastic rounding (as adamkit.formats.bf16.encode_stochastic): add 16 random bits
        # below bfloat16's last mantissa bit of the float32 pattern, then truncate.  Integer
        # arithmetic on the bit pattern carries into the exponent correctly for both signs;
        # NaN and inf are passed through (their patterns would change).
        x = ops.cast(x, "float32")
        bits = ops.view(x, "int32")
        noise = keras.random.randint(
            ops.shape(x), 0, 1 << 16, dtype="int32", seed=self._rounding_seed
        )
        rounded = ops.view(ops.bitwise_and(ops.add(bits, noise), -(1 << 16)), "float32")
        return ops.cast(ops.where(ops.isfinite(x), rounded, x), "bfloat16")

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
