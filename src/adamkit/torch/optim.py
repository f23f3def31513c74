r"""``Adam`` and ``AdamW`` as ``torch.optim.Optimizer`` subclasses (drop-ins for torch's).

The classes only keep books: validate settings (through :mod:`adamkit.core.config`), create state
lazily, check state dicts, and hand each group to the step function that
:func:`adamkit.torch.functional.select_impl` picks.  The math is in :mod:`adamkit.torch.functional`;
the stability guard (``guard=``) is run by :class:`adamkit.torch.guarded.TorchGuard`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from adamkit.guard import Guard, GuardConfig, StepPlan, resolve_guard
from adamkit.torch._groups import (
    EXTRA_KEYS,
    TORCH_SWITCHES,
    check_group,
    effective_weight_decay,
)
from adamkit.torch.functional import StepFn, adam_torch_, select_impl
from adamkit.torch.guarded import TorchGuard, adam_numpy_clipped_
from adamkit.torch.state_dict import ADAMKIT_GROUP_KEYS, check_state_dict, step_tensor

__all__ = ["Adam", "AdamW"]

_SPARSE_MESSAGE = "Adam does not support sparse gradients, please consider SparseAdam instead"


class Adam(torch.optim.Optimizer):
    r"""Adam (Kingma & Ba, 2015) with torch's semantics; AdamW is this class with other defaults.

    For each parameter :math:`\theta` with gradient :math:`g` at step :math:`t = 1, 2, \dots`::

        g  <- -g                               if maximize
        g  <- g + lambda * theta               coupled L2 decay (decoupled_weight_decay=False)
        theta <- theta * (1 - c * lambda)      decoupled decay  (decoupled_weight_decay=True)
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g^2
        v_max <- max(v_max, v)                 if amsgrad (v_max then replaces v)
        theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    ``eps`` is added to :math:`\sqrt{\hat v}` (as in the paper, torch and optax).  The decoupled
    decay factor ``c`` depends on ``decay_mode``:

    ===================  ======================================  ==============================
    ``decay_mode``       decay per step                          meaning of ``weight_decay``
    ===================  ======================================  ==============================
    ``"lr_scaled"``      ``theta <- theta * (1 - lr * lambda)``   torch.optim.AdamW's: decay per
    (default)                                                    unit of learning rate
    ``"independent"``    ``theta <- theta * (1 - (lr / lr0)      Loshchilov & Hutter's: decay per
                         * lambda)``                             step, scaled only by the
                                                                 schedule multiplier lr / lr0
    ===================  ======================================  ==============================

    ``lr0`` is the group's ``initial_lr`` (set by every ``torch.optim.lr_scheduler``) or, without a
    scheduler, the group's lr when it was added (kept as ``group["construction_lr"]``).  With
    ``"independent"``, ``weight_decay=1e-4`` shrinks weights by the factor ``1 - 1e-4`` per step
    whenever ``lr == lr0``, whatever ``lr0`` is, so lr and decay can be tuned separately.  (Note
    that ``OneCycleLR`` sets ``initial_lr = max_lr / div_factor``, so there the multiplier peaks
    at ``div_factor``.)

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``; names are saved
            in the state dict and checked on load) or group dicts (optional key ``name``).
        lr: learning rate, a float or a one-element tensor (kept as given, like torch).
        betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.Adam``.
        decoupled_weight_decay: AdamW's decay instead of L2 in the gradient.
        decay_mode: ``"lr_scaled"`` or ``"independent"`` (the latter needs decoupled decay).
        impl: ``"auto"``, ``"torch"`` or ``"reference"``; see :mod:`adamkit.torch.functional`.
        guard: the stability guard (:class:`adamkit.guard.GuardConfig` lists every behaviour).
            ``True`` (default) or ``"default"``: skip steps whose gradients hold NaN/Inf (the
            only difference from ``torch.optim.Adam``, which would poison its state; costs one
            norm over the gradients per step); ``"all"``: every behaviour with its defaults; a
            dict of options (optionally with ``"preset": "all"``) or a ``GuardConfig``;
            ``False``/``None``/``"off"``: no guard, exactly ``torch.optim.Adam``.

    Guarded steps: ``step(closure=None, *, loss=None)`` gives the guard the step's loss (the
    closure's value, or ``loss=``) for loss-spike handling.  A skipped step changes nothing:
    parameters, moments and ``step`` counts stay bit-identical.  ``step()`` returns the closure's
    value like torch; :attr:`last_step_applied` says whether the update was applied and
    :attr:`guard_diagnostics` what happened (norms, counters).  ``param_groups`` are never
    changed by the guard (an lr factor or a gradient scale applies to one step only), so lr
    schedulers stepped after a skipped step neither warn nor drift.  The guard's state, and the
    rollback snapshot's tensors when there is one, are saved under ``state_dict()["guard"]``
    (``torch.optim.Adam`` ignores the entry), so resuming is exact.  While ``torch.compile``
    traces ``step`` (``torch.compile(opt.step, fullgraph=True)``) the guard is bypassed, since
    its decisions are Python branches on tensor values: a compiled step is an unguarded step, and
    the counters do not move.  Compile the model, not the optimizer step, to keep the guard.

    State per parameter: see :mod:`adamkit.torch.state_dict` (torch's keys and dtypes, so state
    dicts load into ``torch.optim.Adam``/``AdamW`` and back).  Raises ``ValueError``/``TypeError``
    for invalid settings (same words as every adamkit front end), unknown keyword arguments and
    unknown group keys; ``RuntimeError`` with torch's message for sparse gradients.  A failing
    ``step`` or ``load_state_dict`` leaves the optimizer and the parameters unchanged.  Never
    writes into ``p.grad``.  Parameters whose ``grad`` is ``None`` are skipped.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        decay_mode: str = "lr_scaled",
        impl: str = "auto",
        guard: Any = True,
    ) -> None:
        config = resolve_guard(guard)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "decoupled_weight_decay": decoupled_weight_decay,
            "decay_mode": decay_mode,
            "impl": impl,
            **TORCH_SWITCHES,
        }
        defaults.update(check_group(defaults))
        super().__init__(params, defaults)
        self._guard: TorchGuard | None = None if config is None else TorchGuard(config)
        self.last_step_applied = True

    @property
    def guard(self) -> Guard | None:
        """The :class:`~adamkit.guard.Guard` (config, counters), or ``None`` without a guard."""
        return None if self._guard is None else self._guard.guard

    @property
    def guard_diagnostics(self) -> dict[str, Any] | None:
        """What the last step did, as a plain dict of Python scalars (``action``, ``applied``,
        ``skipped``, ``grad_norm``, ``update_norm``, ``update_ratio``, ..., and the cumulative
        ``n_*`` counters; see :attr:`adamkit.guard.Guard.diagnostics`); ``None`` without a
        guard."""
        return None if self._guard is None else self._guard.guard.diagnostics

    @property
    def guard_snapshot_nbytes(self) -> int:
        """Bytes held by the guard's rollback snapshot (0 without one)."""
        return 0 if self._guard is None else self._guard.snapshot_nbytes

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_guard"] = self._guard
        state["last_step_applied"] = self.last_step_applied
        return state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch's semantics), after validating its settings.

        Raises ``TypeError`` for keys that are neither settings nor ``params``,
        ``param_names``, ``name`` or ``initial_lr``, and ``ValueError``/``TypeError`` for invalid
        values or (with ``impl="reference"``) parameters that implementation cannot update.  The
        optimizer is unchanged when it raises.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        unknown = sorted(set(param_group) - set(self.defaults) - EXTRA_KEYS)
        if unknown:
            allowed = sorted(set(self.defaults) | EXTRA_KEYS)
            raise TypeError(f"unknown param group keys {unknown}; allowed: {allowed}")
        candidate = {**self.defaults, **param_group}
        checked = check_group(candidate)
        params = candidate["params"]
        tensors = [params] if isinstance(params, Tensor) else list(params)
        select_impl(candidate["impl"], [p[1] if isinstance(p, tuple) else p for p in tensors])
        param_group.update(checked)
        lr = checked["lr"]
        param_group.setdefault(
            "construction_lr", float(lr.item() if isinstance(lr, Tensor) else lr)
        )
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch calls this from load_state_dict with only state and param_groups: keep the guard.
        # An object pickled before adamkit had a guard gets the default one.
        if "_guard" not in self.__dict__ and "_guard" not in state:
            state = {**state, "_guard": TorchGuard(GuardConfig())}
        super().__setstate__(state)
        self.__dict__.setdefault("last_step_applied", True)
        for group in self.param_groups:
            for key, value in TORCH_SWITCHES.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = step_tensor(float(p_state["step"]))

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (``state``, ``param_groups``) plus, with a guard, ``"guard"``: its
        counters and statistics and the rollback snapshot's tensors (see
        :meth:`adamkit.torch.guarded.TorchGuard.state_dict`)."""
        state_dict = super().state_dict()
        if self._guard is not None and isinstance(state_dict, dict):
            state_dict["guard"] = self._guard.state_dict()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from adamkit or ``torch.optim.Adam``/``AdamW``.

        Everything is checked first (see :func:`adamkit.torch.state_dict.check_state_dict`, and
        the ``"guard"`` entry); ``ValueError``/``TypeError`` leave the optimizer unchanged.
        adamkit's own group settings (``impl``, ``decay_mode``, ``construction_lr``) missing from
        a torch checkpoint keep this optimizer's values; a checkpoint without ``"guard"`` starts
        the guard afresh (this optimizer's config, counters at 0, no snapshot).  The check runs
        after any user load-state-dict pre-hooks.
        """
        kept = [{k: g[k] for k in ADAMKIT_GROUP_KEYS if k in g} for g in self.param_groups]
        commits = []

        def validate(optimizer: torch.optim.Optimizer, loaded: dict[str, Any]) -> None:
            check_state_dict(optimizer, loaded)
            if self._guard is not None:
                commits.append(self._guard.prepare_load(optimizer, loaded.get("guard")))

        def restore(optimizer: torch.optim.Optimizer) -> None:
            for group, old in zip(optimizer.param_groups, kept, strict=True):
                for key, value in old.items():
                    group.setdefault(key, value)

        pre = self.register_load_state_dict_pre_hook(validate)
        post = self.register_load_state_dict_post_hook(restore, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()
        for commit in commits:
            commit()

    def _plan(self, index: int, group: dict[str, Any]) -> tuple[StepFn, list[Tensor], float]:
        # Checks only; raising here leaves everything untouched.
        try:
            check_group(group)
            weight_decay = effective_weight_decay(group)
        except (TypeError, ValueError) as error:
            raise type(error)(f"param group {index}: {error}") from None
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(_SPARSE_MESSAGE)
            params.append(p)
        return select_impl(group["impl"], params), params, weight_decay

    def _state_for(self, p: Tensor, amsgrad: bool) -> dict[str, Tensor]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = step_tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            # Also covers amsgrad switched on mid-run: max(0, v) = v on the next step.
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One update of every parameter that has a gradient, unless the guard skips it.

        ``closure`` (re-evaluates the model, returns the loss) runs first, with gradients
        enabled; its value is the step's loss for the guard.  ``loss``: the step's loss when
        there is no closure (a number or a one-element tensor; ignored without a guard).  Giving
        both raises ``ValueError``.  All groups are checked before any state, parameter or guard
        counter changes.

        Returns ``closure()``'s value (``None`` without a closure), like torch; whether the
        update was applied is :attr:`last_step_applied`, the details :attr:`guard_diagnostics`.
        """
        if closure is not None and loss is not None:
            raise ValueError("pass the step's loss either through closure or as loss=, not both")
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = loss = closure()
        plans = [self._plan(i, group) for i, group in enumerate(self.param_groups)]
        # The guard decides in Python on values read from tensors, which torch.compile cannot
        # trace without a graph break: a traced step is an unguarded one (documented above).
        if self._guard is None or torch.compiler.is_compiling():
            self._update(plans, None)
            self.last_step_applied = True
            return result
        params = [p for _, group_params, _ in plans for p in group_params]
        self.last_step_applied = self._guard.run(
            self, params, lambda plan: self._update(plans, plan), loss=loss
        )
        return result

    def _update(
        self, plans: list[tuple[StepFn, list[Tensor], float]], plan: StepPlan | None
    ) -> list[float]:
        # The update of every group, as the guard's plan says (None: plain Adam).  Returns the
        # per-tensor factors of update_clip="rms".
        factors: list[float] = []
        for group, (step_fn, params, weight_decay) in zip(self.param_groups, plans, strict=True):
            if not params:
                continue
            amsgrad = group["amsgrad"]
            states = [self._state_for(p, amsgrad) for p in params]
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            lr = group["lr"]
            if plan is not None:
                # Out of place and for this step only: p.grad and group["lr"] stay the caller's.
                if plan.grad_scale != 1.0:
                    grads = torch._foreach_mul(grads, plan.grad_scale)
                if plan.lr_scale != 1.0:
                    lr = lr * plan.lr_scale
            args = (
                params,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                [s["step"] for s in states],
            )
            kwargs = {
                "lr": lr,
                "beta1": beta1,
                "beta2": beta2,
                "eps": group["eps"],
                "weight_decay": weight_decay,
                "decoupled_weight_decay": group["decoupled_weight_decay"],
                "amsgrad": amsgrad,
                "maximize": group["maximize"],
            }
            if plan is None or plan.update_clip is None:
                step_fn(*args, **kwargs)
                continue
            clip = {
                "update_clip": plan.update_clip,
                "rms_threshold": plan.rms_threshold,
                "atan2_a": plan.atan2_a,
                "atan2_b": plan.atan2_b,
            }
            # Update clipping needs the moments mid-step: torch ops, or the NumPy reference for
            # the NumPy-backed implementations (reference, numba), which take CPU float tensors.
            numpy_backed = step_fn is not adam_torch_ and all(
                p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params
            )
            clipped_step = adam_numpy_clipped_ if numpy_backed else adam_torch_
            factors.extend(clipped_step(*args, **kwargs, **clip))
        return factors


class AdamW(Adam):
    """:class:`Adam` with decoupled weight decay and ``weight_decay=1e-2`` (torch.optim.AdamW's
    defaults); see :class:`Adam` for the math, ``decay_mode`` and everything else."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decay_mode: str = "lr_scaled",
        impl: str = "auto",
        guard: Any = True,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            decoupled_weight_decay=True,
            decay_mode=decay_mode,
            impl=impl,
            guard=guard,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Like torch.optim.AdamW: whatever is loaded, this stays AdamW.
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
