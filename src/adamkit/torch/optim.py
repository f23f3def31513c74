r"""``Adam`` and ``AdamW`` as ``torch.optim.Optimizer`` subclasses (drop-ins for torch's).

The classes only keep books: validate settings (through :mod:`adamkit.core.config`), create state
lazily, check state dicts, and hand each group to the step function that
:func:`adamkit.torch.functional.select_impl` picks.  The math is in :mod:`adamkit.torch.functional`;
the stability guard (``guard=``) is run by :class:`adamkit.torch.guarded.TorchGuard`.  A group
with a state format (``state="int8"``, ...) runs its fused kernels through one address-table
call per format and dtype for plain CPU tensors (:mod:`adamkit.torch._addresses`), and through
:mod:`adamkit.kernels.stored` on NumPy views for the rest (:mod:`adamkit.torch.formats` keeps
the layout).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adamkit.core.config import AdamHyperParams
from adamkit.formats import QuantizedFormat, StateFormat, get_format
from adamkit.guard import Guard, GuardConfig, StepPlan, clipped_adam_update_, resolve_guard
from adamkit.kernels import numba_available
from adamkit.kernels.stored import (
    adam_update_stored_,
    holds_non_finite,
    param_format,
    update_through_,
)
from adamkit.torch import formats as tf
from adamkit.torch._addresses import (
    StoredLayout,
    Table,
    add_parts,
    advance_step_counts,
    param_tables,
    rms_update_tables_,
    stored_layout,
    stored_row,
    update_stored_tables_,
    update_tables_,
)
from adamkit.torch._groups import (
    EXTRA_KEYS,
    TORCH_SWITCHES,
    check_group,
    effective_weight_decay,
)
from adamkit.torch.backward_checks import BackwardSquares, recorded_parts, table_grad_parts
from adamkit.torch.functional import (
    StepFn,
    adam_numba_,
    adam_torch_,
    hyper_params,
    select_impl,
)
from adamkit.torch.guarded import (
    TorchGuard,
    adam_numpy_clipped_,
    check_process_group,
    global_norm,
    global_squares,
    uses_collectives,
)
from adamkit.torch.sharded_blocks import update_spans_
from adamkit.torch.state_dict import (
    ADAMKIT_GROUP_KEYS,
    OPTIMIZER_KEYS,
    check_state_dict,
    step_tensor,
)

__all__ = ["Adam", "AdamW"]

_SPARSE_MESSAGE = "Adam does not support sparse gradients, please consider SparseAdam instead"
_WORK_DTYPES = (torch.float32, torch.float64)  # NumPy views the step can update in place
_Plan = tuple[StepFn | None, list[Tensor], float]
# A group's share for the address-table kernel: (tables, positions of the other parameters in
# the plan's list, the rows of tensors whose addresses the tables hold, kept here so that they
# stay alive until the kernel has run).
_Prepared = tuple[dict[torch.dtype, Table], list[int], list[tuple[Any, ...]]]
# Everything in a group that its checks read (see Adam._checked_settings).
_SETTING_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "decoupled_weight_decay",
    "decay_mode",
    "impl",
    "state",
    "param_rounding",
    "initial_lr",
    "construction_lr",
    *TORCH_SWITCHES,
)


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
        impl: ``"auto"``, ``"torch"``, ``"reference"`` or ``"numba"``; see
            :mod:`adamkit.torch.functional`.  With a state format, ``"auto"`` is the fused numba
            kernel where it applies, ``"numba"`` forces it, ``"reference"`` is the plain decode /
            reference step / encode path (the oracle) and ``"torch"`` raises ``ValueError``.
        state: how the moments are stored (a group may override it with its own ``"state"``):
            ``None`` (default) keeps torch's behaviour, moments in the parameter's dtype;
            ``"fp32"``, ``"bf16"`` (stochastic rounding) and ``"int8"`` (block-wise dynamic
            quantization, blocks of 256, one float32 absmax per block) are independent of the
            parameter's dtype: the step is computed in float32 between decode and encode
            (:mod:`adamkit.kernels.stored`, which also states the sensitive-tensor rule:
            under ``"int8"`` tensors below 4096 elements or 2 dimensions, and parameters named
            like embeddings or norms, keep float32 moments; and AMSGrad's maximum is taken
            over the decoded stored values).  CPU tensors only for now
            (``NotImplementedError`` otherwise).  Layout: :mod:`adamkit.torch.formats`.
        param_rounding: ``"nearest"`` (torch's) or ``"stochastic"``: bfloat16 parameters take
            the update computed in float32, rounded stochastically, so that updates below half a
            bf16 spacing are not lost on average (CPU).  No effect on float32/float64 parameters.
        guard: the stability guard (:class:`adamkit.guard.GuardConfig` lists every behaviour).
            ``True`` (default) or ``"default"``: skip steps whose gradients hold NaN/Inf (the
            only difference from ``torch.optim.Adam``, which would poison its state; costs one
            norm over the gradients per step); ``"all"``: every behaviour with its defaults; a
            dict of options (optionally with ``"preset": "all"``) or a ``GuardConfig``;
            ``False``/``None``/``"off"``: no guard, exactly ``torch.optim.Adam``.
        process_group: under ``torch.distributed`` the guard decides on every rank together
            (one small ``all_reduce`` per step): ``None`` (default) in the default process group
            when one is initialized, a ``ProcessGroup``, or ``False`` to decide per rank; see
            :mod:`adamkit.torch.guarded`.

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
        process_group: Any = None,
        state: str | None = None,
        param_rounding: str = "nearest",
    ) -> None:
        config = resolve_guard(guard)
        check_process_group(process_group)
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
            "state": state,
            "param_rounding": param_rounding,
            **TORCH_SWITCHES,
        }
        defaults.update(check_group(defaults))
        defaults.update(tf.check_state_options(defaults))
        self._format_rng = tf.new_rng()
        # Optimizer-wide settings that wrappers copy into every group (ZeroRedundancyOptimizer
        # passes all its keywords as group defaults); add_param_group drops matching copies.
        self._optimizer_wide = {"guard": guard, "process_group": process_group}
        super().__init__(params, defaults)
        if tf.uses_rng(self.param_groups):
            # Data-parallel replicas must draw the same rounding bits: agree on one seed.
            self._format_rng = tf.new_rng(process_group)
        self._guard: TorchGuard | None = (
            None if config is None else TorchGuard(config, process_group)
        )
        self.last_step_applied = True
        self._checks: BackwardSquares | None = None

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
        state["_format_rng"] = self._format_rng
        state.pop("_checked", None)  # keyed by id(group): meaningless in a copy
        # Hooks belong to the original's parameters; a copy hooks its own at its next step.
        state.pop("_checks", None)
        state.pop("_attach_pending", None)
        return state

    def state_nbytes(self) -> int:
        """Bytes of memory held by the optimizer's per-parameter state, measured from the
        tensors' storages (see :func:`adamkit.torch.formats.state_nbytes`)."""
        return tf.state_nbytes(self)

    def _without_optimizer_wide_keys(self, param_group: dict[str, Any]) -> dict[str, Any]:
        # `guard` and `process_group` apply to the whole optimizer: a group may repeat the
        # optimizer's own value (ZeRO does), never set another one.
        wide = getattr(self, "_optimizer_wide", {})
        repeated = [key for key in wide if key in param_group]
        for key in repeated:
            value, own = param_group[key], wide[key]
            same = value is own
            if not same:
                try:
                    same = bool(value == own)
                except Exception:  # e.g. objects whose == raises or is elementwise
                    same = False
            if not same:
                raise TypeError(
                    f"{key} is an optimizer-wide setting and cannot differ per param group "
                    f"(the optimizer has {own!r}, the group {value!r})"
                )
        if not repeated:
            return param_group
        return {k: v for k, v in param_group.items() if k not in repeated}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch's semantics), after validating its settings.

        Raises ``TypeError`` for keys that are neither settings nor ``params``,
        ``param_names``, ``name`` or ``initial_lr``, and ``ValueError``/``TypeError`` for invalid
        values or (with ``impl="reference"``) parameters that implementation cannot update.  The
        optimizer is unchanged when it raises.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        param_group = self._without_optimizer_wide_keys(param_group)
        unknown = sorted(set(param_group) - set(self.defaults) - EXTRA_KEYS)
        if unknown:
            allowed = sorted(set(self.defaults) | EXTRA_KEYS)
            raise TypeError(f"unknown param group keys {unknown}; allowed: {allowed}")
        candidate = {**self.defaults, **param_group}
        checked = check_group(candidate)
        options = tf.check_state_options(candidate)
        params = candidate["params"]
        tensors = [params] if isinstance(params, Tensor) else list(params)
        if not isinstance(params, Tensor):
            param_group["params"] = tensors  # a generator can be read once only
        plain = [p[1] if isinstance(p, tuple) else p for p in tensors]
        if options["state"] is None:
            select_impl(candidate["impl"], plain)
        else:
            tf.check_stored_params(options["state"], candidate["impl"], plain)
        if options["param_rounding"] == "stochastic":
            tf.check_rounding_params(plain)
        param_group.update(checked)
        param_group.update(options)
        lr = checked["lr"]
        param_group.setdefault(
            "construction_lr", float(lr.item() if isinstance(lr, Tensor) else lr)
        )
        super().add_param_group(param_group)
        self._attach_pending = True  # the new parameters' gradient hooks, at the next step

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch calls this from load_state_dict with only state and param_groups: keep the guard.
        # An object pickled before adamkit had a guard gets the default one.
        if "_guard" not in self.__dict__ and "_guard" not in state:
            state = {**state, "_guard": TorchGuard(GuardConfig())}
        super().__setstate__(state)
        self.__dict__.setdefault("last_step_applied", True)
        self.__dict__.setdefault("_checks", None)
        self._attach_pending = True
        if "_format_rng" not in self.__dict__:
            self._format_rng = tf.new_rng()
        for group in self.param_groups:
            for key, value in TORCH_SWITCHES.items():
                group.setdefault(key, value)
            group.setdefault("state", None)
            group.setdefault("param_rounding", "nearest")
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = step_tensor(float(p_state["step"]))

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (``state``, ``param_groups``) plus, with a guard, ``"guard"``: its
        counters and statistics and the rollback snapshot's tensors (see
        :meth:`adamkit.torch.guarded.TorchGuard.state_dict`); with a state format or stochastic
        parameter rounding, ``"state_rng"`` (the generator's state).  Compressed moments are
        saved in their compact form (see :mod:`adamkit.torch.state_dict`)."""
        state_dict = super().state_dict()
        if isinstance(state_dict, dict):
            # state_format as a number, DTensor block scales over the whole tensor (a collective
            # under FSDP2 with block-quantized state): see adamkit.torch.formats.
            state_dict = tf.export_state_dict(self, state_dict)
        if self._guard is not None and isinstance(state_dict, dict):
            state_dict["guard"] = self._guard.state_dict()
        if self._uses_rng() and isinstance(state_dict, dict):
            state_dict["state_rng"] = copy.deepcopy(self._format_rng.bit_generator.state)
        return state_dict

    def _uses_rng(self) -> bool:
        return any(
            g.get("state") is not None or g.get("param_rounding") == "stochastic"
            for g in self.param_groups
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from adamkit or ``torch.optim.Adam``/``AdamW``.

        Everything is checked first (see :func:`adamkit.torch.state_dict.check_state_dict`, and
        the ``"guard"`` entry); ``ValueError``/``TypeError`` leave the optimizer unchanged.
        adamkit's own group settings (``impl``, ``decay_mode``, ``construction_lr``) missing from
        a torch checkpoint keep this optimizer's values; a checkpoint without ``"guard"`` starts
        the guard afresh (this optimizer's config, counters at 0, no snapshot).  The check runs
        after any user load-state-dict pre-hooks.

        State formats: ``state`` and ``param_rounding`` stay this optimizer's, and every moment
        is converted to the format this optimizer gives its parameter (torch's layout, ``fp32``,
        ``bf16`` and ``int8`` in any direction; the same format is taken exactly, bypassing
        torch's cast of floating state to the parameter's dtype).  An entry with a wrong shape,
        code length, dtype or an unknown format, or values the target format cannot hold
        (non-finite into ``int8``), raises ``ValueError``/``TypeError`` with nothing changed.
        """
        kept = [{k: g[k] for k in ADAMKIT_GROUP_KEYS if k in g} for g in self.param_groups]
        own = [{k: g.get(k) for k in OPTIMIZER_KEYS} for g in self.param_groups]
        commits = []
        prepared: dict[Tensor, dict[str, Any]] = {}
        rngs: list[np.random.Generator] = []

        def validate(optimizer: torch.optim.Optimizer, loaded: dict[str, Any]) -> None:
            entries = check_state_dict(optimizer, loaded)
            rng = tf.saved_rng(loaded.get("state_rng"), self._format_rng)
            for item in entries:
                group = optimizer.param_groups[item.group]
                target = self._target_format(group, item.param, item.position)
                if item.entry.format is None and target is None:
                    continue  # torch's layout on both sides: torch's own loading
                try:
                    prepared[item.param] = tf.convert_entry(
                        item.entry, item.param, target, step_tensor(float(item.entry.step)), rng
                    )
                except ValueError as error:
                    raise ValueError(
                        f"param group {item.group}, parameter {item.position}: {error}"
                    ) from None
            rngs.append(rng)
            if self._guard is not None:
                commits.append(self._guard.prepare_load(optimizer, loaded.get("guard")))

        def restore(optimizer: torch.optim.Optimizer) -> None:
            for group, old, settings in zip(optimizer.param_groups, kept, own, strict=True):
                for key, value in old.items():
                    group.setdefault(key, value)
                group.update(settings)
            for param, entry in prepared.items():
                optimizer.state[param] = entry
            if rngs:
                self._format_rng = rngs[-1]

        pre = self.register_load_state_dict_pre_hook(validate)
        post = self.register_load_state_dict_post_hook(restore, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()
        for commit in commits:
            commit()

    def _checked_settings(self, index: int, group: dict[str, Any]) -> tuple[dict[str, Any], float]:
        # (state options, effective weight decay) of a group whose settings pass the checks.
        # They are checked again only when a setting changed since the last check of this
        # group: the key holds each value with its type (True == 1 == 1.0 for ==), and groups
        # holding anything but plain immutable values (an lr tensor, betas as a list) are
        # checked every step, since those can change in place.  One entry per group position.
        key = _settings_key(group)
        checked = self.__dict__.setdefault("_checked", {})
        cached = checked.get(index)
        if key is not None and cached is not None and cached[0] is group and cached[1] == key:
            return cached[2], cached[3]
        try:
            check_group(group)
            options = tf.check_state_options(group)
            weight_decay = effective_weight_decay(group)
        except (TypeError, ValueError) as error:
            raise type(error)(f"param group {index}: {error}") from None
        if key is None:
            checked.pop(index, None)
        else:
            checked[index] = (group, key, options, weight_decay)
        return options, weight_decay

    def _plan(self, index: int, group: dict[str, Any]) -> _Plan:
        # Checks only; raising here leaves everything untouched.  A group with a state format
        # gets no step function: _update_stored runs it.
        options, weight_decay = self._checked_settings(index, group)
        params = []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(_SPARSE_MESSAGE)
            params.append(p)
        if options["param_rounding"] == "stochastic":
            tf.check_rounding_params(params)
        state = options["state"]
        if state is None:
            return select_impl(group["impl"], params), params, weight_decay
        tf.check_stored_params(state, group["impl"], params)
        guard = self._guard
        if guard is not None and guard.config.update_clip is not None:
            self._refuse_clipped_spans(index, group, params)
        if not holds_non_finite(get_format(state)) and (
            guard is None or not guard.config.skip_nonfinite
        ):
            # int8 codes cannot hold NaN/inf: refuse before anything changes (the guard's
            # non-finite skip makes this check redundant when it is on).  One reduction for the
            # whole group (global_norm: NaN/inf iff some element is).
            grads = [p.grad for p in params]
            # The norm can overflow float32 for huge finite gradients: confirm per tensor.
            if (
                params
                and not math.isfinite(global_norm(grads))
                and not all(bool(torch.isfinite(g).all()) for g in grads)
            ):
                raise ValueError(
                    f"param group {index}: a gradient holds NaN or inf, which state={state!r} "
                    "cannot store; nothing was changed (guard=True skips such steps)"
                )
        return None, params, weight_decay

    def _refuse_clipped_spans(
        self, index: int, group: dict[str, Any], params: list[Tensor]
    ) -> None:
        # Update clipping is not implemented for 8-bit blocks that straddle FSDP2 shards
        # (adamkit.torch.sharded_blocks): refuse here, before any state or parameter changes.
        position = {id(p): i for i, p in enumerate(group["params"])}
        for p in params:
            if not tf.is_dtensor(p):
                continue
            fmt = self._target_format(group, p, position[id(p)])
            fmt = None if fmt is None else tf.shard_format(fmt, tuple(p.shape))
            if isinstance(fmt, QuantizedFormat) and tf.straddling_of(p, fmt.block):
                raise NotImplementedError(
                    f"param group {index}: update clipping (guard update_clip="
                    f"{self._guard.config.update_clip!r}) with state={group['state']!r} on "
                    "FSDP2 shards whose 8-bit blocks straddle ranks is not supported; nothing "
                    "was changed"
                )

    @staticmethod
    def _target_format(group: dict[str, Any], p: Tensor, position: int) -> StateFormat | None:
        """The format of ``p``'s moments (``None``: torch's layout), by the rule of
        :func:`adamkit.kernels.stored.param_format` with the parameter's name if the group has
        names."""
        state = tf.check_state_options(group)["state"]
        if state is None:
            return None
        names = group.get("param_names")
        name = names[position] if names and position < len(names) else None
        return param_format(state, tuple(p.shape), name)

    def _convert_state(self, p: Tensor, target: StateFormat | None) -> None:
        # The entry exists in another format (the group's state was changed, or a snapshot of
        # another format was restored): re-encode it in place.
        state = self.state[p]
        parsed = tf.parse_live_entry(state, p, "optimizer state")
        new = tf.convert_entry(parsed, p, target, state["step"], self._format_rng)
        state.clear()
        state.update(new)

    def _stored_state_for(self, p: Tensor, fmt: StateFormat, amsgrad: bool) -> dict[str, Any]:
        # A DTensor parameter (FSDP2) gets state laid out like it (see adamkit.torch.formats).
        state = self.state[p]
        if len(state) == 0:
            state.update(tf.new_entry(fmt, p, step_tensor(0.0), amsgrad))
        elif state.get(tf.FORMAT_KEY) != fmt.name:
            self._convert_state(p, fmt)
        if amsgrad and "max_exp_avg_sq" not in state:
            tf.add_moment(fmt, state, "max_exp_avg_sq", p)
        return state

    def _state_for(self, p: Tensor, amsgrad: bool) -> dict[str, Tensor]:
        state = self.state[p]
        if tf.FORMAT_KEY in state:
            self._convert_state(p, None)
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
            self._update(plans, None, self._tables(plans))
            self.last_step_applied = True
            return result
        params = [p for _, group_params, _ in plans for p in group_params]
        tables = self._tables(plans)
        checks = self._backward_checks()

        def grad_norm() -> float:
            # global_norm of the gradients: recorded during backward where possible (see
            # adamkit.torch.backward_checks), the tables' others by one kernel call per dtype,
            # the rest as global_norm; added exactly, so the result is the same either way.
            parts: list[np.ndarray] = []
            others: list[Tensor] = []
            for (_, group_params, _), prepared in zip(plans, tables, strict=True):
                if prepared is None:
                    others.extend(p.grad for p in group_params)
                    continue
                parts.extend(table_grad_parts(checks, prepared[0]))
                others.extend(group_params[i].grad for i in prepared[1])
            if others:
                recorded, rest = recorded_parts(checks, others)
                total = global_squares(rest, parts + recorded)
            else:
                total = add_parts(parts)
            return math.nan if math.isnan(total) else math.sqrt(total)

        def apply(plan: StepPlan, measure: bool = False) -> Any:
            if measure:
                return self._apply_measured(plans, plan, tables)
            return self._update(plans, plan, tables)

        self.last_step_applied = self._guard.run(
            self, params, apply, loss=loss, grad_norm=grad_norm, measures_update=True
        )
        return result

    def _backward_checks(self) -> BackwardSquares | None:
        # The hooks of GuardConfig.check_in_backward, attached to parameters added since the
        # last step; none when the guard needs no gradient norm or reduces it across processes
        # (its collective computes the norm of the reduced gradients itself).
        guard = self._guard
        config = None if guard is None else guard.config
        if config is None or not (config.check_in_backward and config.needs_grad_norm):
            return None
        if self.__dict__.get("_attach_pending", True):
            self._attach_pending = False
            if not numba_available() or uses_collectives(guard.process_group):
                return None
            if self._checks is None:
                self._checks = BackwardSquares()
            self._checks.attach(p for group in self.param_groups for p in group["params"])
        return self._checks

    def _tables(self, plans: list[_Plan]) -> list[_Prepared | None]:
        # Per group, the address tables of the parameters whose state exists and that the
        # numba table kernel can take (and the positions of the rest),
        # built once per step and shared by the guard's gradient norm and the update.
        prepared: list[_Prepared | None] = []
        state = self.state
        for group, (step_fn, params, _) in zip(self.param_groups, plans, strict=True):
            if step_fn is not adam_numba_ or not params:
                prepared.append(None)
                continue
            amsgrad = group["amsgrad"]
            rows = []
            ready = []
            rest = []
            format_key = tf.FORMAT_KEY
            for i, p in enumerate(params):
                entry = state.get(p)
                if (
                    entry
                    and "exp_avg" in entry
                    and (not amsgrad or "max_exp_avg_sq" in entry)
                    and format_key not in entry
                ):
                    rows.append(
                        (
                            p,
                            p.grad,
                            entry["exp_avg"],
                            entry["exp_avg_sq"],
                            entry["max_exp_avg_sq"] if amsgrad else None,
                            entry["step"],
                        )
                    )
                    ready.append(i)
                else:
                    rest.append(i)
            tables, rejected = param_tables(rows)
            if not tables:
                prepared.append(None)
                continue
            if rejected:
                rest = sorted(rest + [ready[j] for j in rejected])
            prepared.append((tables, rest, rows))
        return prepared

    def _apply_measured(
        self, plans: list[_Plan], plan: StepPlan, tables: list[_Prepared | None]
    ) -> tuple[list[float], dict[str, float]]:
        # The guard's apply with the update-norm diagnostic measured here (TorchGuard.run's
        # measures_update): the table kernel sums the changes while it writes them; only the
        # parameters updated another way are copied before their update.
        sums = [0.0, 0.0]
        factors = self._update(plans, plan, tables, sums)
        return factors, {"update_norm": math.sqrt(sums[0]), "param_norm": math.sqrt(sums[1])}

    def _update(
        self,
        plans: list[_Plan],
        plan: StepPlan | None,
        tables: list[_Prepared | None],
        sums: list[float] | None = None,
    ) -> list[float]:
        # The update of every group, as the guard's plan says (None: plain Adam).  Returns the
        # per-tensor factors of update_clip="rms".  With ``sums``, adds the squared norms of the
        # parameters' change and of their old values to sums[0] and sums[1].
        factors: list[float] = []
        unscaled = plan is None or plan.grad_scale == 1.0
        clip = None if plan is None else plan.update_clip
        for group, (step_fn, params, weight_decay), prepared in zip(
            self.param_groups, plans, tables, strict=True
        ):
            if not params:
                continue
            amsgrad = group["amsgrad"]
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            if plan is not None and plan.lr_scale != 1.0:
                lr = lr * plan.lr_scale  # for this step only: group["lr"] stays the caller's
            if (
                prepared is not None
                and unscaled
                and clip in (None, "rms")
                and group["param_rounding"] == "nearest"
            ):
                # The prepared tables hold the gradients' addresses: only unscaled gradients
                # can be used as they are.
                hp = hyper_params(
                    float(lr),
                    beta1,
                    beta2,
                    group["eps"],
                    weight_decay,
                    group["decoupled_weight_decay"],
                    amsgrad,
                    group["maximize"],
                )
                measure = sums is not None
                if clip is None:
                    measured = update_tables_(prepared[0], hp, measure=measure)
                else:
                    scales, measured = rms_update_tables_(
                        prepared[0], hp, plan.rms_threshold, measure=measure
                    )
                    factors.extend(scales)
                if sums is not None:
                    sums[0] += measured[0]
                    sums[1] += measured[1]
                params = [params[i] for i in prepared[1]]
                if not params:
                    continue
            before = [p.detach().clone() for p in params] if sums is not None else []
            factors.extend(self._update_group(group, step_fn, params, weight_decay, lr, plan))
            if before:
                after = [p.detach() for p in params]
                change = global_norm(torch._foreach_sub(after, before))
                sums[0] += change * change
                sums[1] += global_norm(before) ** 2
        return factors

    def _update_group(
        self,
        group: dict[str, Any],
        step_fn: StepFn | None,
        params: list[Tensor],
        weight_decay: float,
        lr: float | Tensor,
        plan: StepPlan | None,
    ) -> list[float]:
        # One group's parameters through the general path: the step function the plan chose
        # (or the stored-format path), gradients scaled and updates clipped as the plan says.
        amsgrad = group["amsgrad"]
        beta1, beta2 = group["betas"]
        factors: list[float] = []
        grads = [p.grad for p in params]
        if plan is not None and plan.grad_scale != 1.0:
            # Out of place and for this step only: p.grad stays the caller's.
            grads = torch._foreach_mul(grads, plan.grad_scale)
        if step_fn is None:
            return self._update_stored(group, params, grads, lr, weight_decay, plan)
        states = [self._state_for(p, amsgrad) for p in params]
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
        low = []
        if group["param_rounding"] == "stochastic":
            low = [i for i, p in enumerate(params) if p.dtype == torch.bfloat16]
        finish = None
        if low:
            args, finish = tf.widened(args, low, amsgrad)
        if plan is None or plan.update_clip is None:
            step_fn(*args, **kwargs)
        else:
            # Update clipping needs the moments mid-step: torch ops, or the NumPy reference
            # for the NumPy-backed implementations (reference, numba), which take CPU float
            # tensors.
            numpy_backed = step_fn is not adam_torch_ and all(
                p.device.type == "cpu" and p.dtype in _WORK_DTYPES for p in args[0]
            )
            clipped_step = adam_numpy_clipped_ if numpy_backed else adam_torch_
            factors.extend(clipped_step(*args, **kwargs, **_clip_options(plan)))
        if finish is not None:
            finish(self._format_rng)
        return factors

    def _update_stored(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        lr: float | Tensor,
        weight_decay: float,
        plan: StepPlan | None,
    ) -> list[float]:
        # A group with a state format: per (format, dtype), one address-table kernel call for
        # the parameters it can take (_addresses.stored_row; off with _STORED_TABLES); NumPy
        # views of the others' CPU tensors (float32 copies for low-precision parameters), one
        # dispatcher call per format; step counts last, once every update has succeeded.
        amsgrad = group["amsgrad"]
        beta1, beta2 = group["betas"]
        hp = AdamHyperParams(
            lr=float(lr),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=weight_decay,
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=amsgrad,
            maximize=group["maximize"],
        )
        position = {id(p): i for i, p in enumerate(group["params"])}
        stochastic = group["param_rounding"] == "stochastic"
        impl = tf.stored_impl(group["impl"], group["state"])
        # Tables only without update clipping (it needs the moments mid-step).
        tables = _STORED_TABLES and (plan is None or plan.update_clip is None)
        layouts: dict[int, StoredLayout | None] = {}
        dense = get_format(_DENSE_STATE)
        dense_layout = stored_layout(dense, impl) if tables else None
        # Rows by format and generator: the local shard of a DTensor parameter (FSDP2) rounds
        # through tf.shard_rng (the optimizer's generator and the shard's global offset, one
        # bucket per shard), which draws one key per parameter in parameter order as one
        # process does: self._format_rng advances alike on every rank, and shards round with
        # the single-process bits.  Each entry: (p, g, state, view, whole, table row or None,
        # format of the table kernel).
        buckets: dict[tuple[int, int], tuple[StateFormat, Any, list[tuple[Any, ...]]]] = {}
        # _target_format's rule, evaluated once per distinct (shape, name): with many small
        # tensors its per-parameter checks cost as much as the update.
        state_name = tf.check_state_options(group)["state"]
        names = group.get("param_names") or ()
        formats: dict[tuple[Any, ...], StateFormat] = {}
        for p, g in zip(params, grads, strict=True):
            index = position[id(p)]
            shape = tuple(p.shape)
            which = (shape, names[index] if index < len(names) else None)
            fmt = formats.get(which)
            if fmt is None:
                fmt = formats[which] = param_format(state_name, *which)
            state = self._stored_state_for(p, fmt, amsgrad)
            view, rng, whole, row, table_fmt = state, self._format_rng, p, None, fmt
            if tf.is_dtensor(p):
                # Chosen on the whole shape above, stored over the local shard.
                fmt = tf.shard_format(fmt, tuple(p.shape))
                if fmt.needs_rng or (stochastic and p.dtype == torch.bfloat16):
                    rng = tf.shard_rng(self._format_rng, p)
                p, g, view = p.to_local(), g.to_local(), tf.local_tensors(state)
            elif tables:
                key = id(fmt)
                layout = (
                    layouts[key]
                    if key in layouts
                    else layouts.setdefault(key, stored_layout(fmt, impl))
                )
                if layout is not None:
                    row = stored_row(layout, p, g, state, amsgrad)
                    if row is None and layout.block and dense_layout is not None:
                        # The 8-bit formats keep a small tensor's moments in float32: a row of
                        # the fp32 layout (the same per-element kernel as the per-parameter path).
                        row = stored_row(dense_layout, p, g, state, amsgrad)
                        table_fmt = dense if row is not None else fmt
            entry = (p, g, state, view, whole, row, table_fmt)
            buckets.setdefault((id(fmt), id(rng)), (fmt, rng, []))[2].append(entry)
        finished = []
        spans = []  # int8 shards whose blocks straddle ranks (FSDP2): one reduce for them all
        numpy_buckets = []
        table_buckets = []
        for fmt, rng, entries in buckets.values():
            ready = [e for e in entries if e[5] is not None]
            if ready and fmt.needs_rng and len(ready) != len(entries):
                # The keys of stochastic rounding are drawn for a whole bucket in one go, in
                # parameter order: the bucket stays together on the per-parameter path.
                ready = []
            if ready:
                # By the format of the table kernel (the fp32 rows of an 8-bit format apart).
                by_format: dict[int, tuple[StateFormat, list[tuple[Any, ...]]]] = {}
                for e in ready:
                    by_format.setdefault(id(e[6]), (e[6], []))[1].append(e)
                for table_fmt, chosen in by_format.values():
                    table_buckets.append((table_fmt, rng, chosen))
            if len(ready) == len(entries):
                continue
            rows = []
            for p, g, state, view, whole, row, _ in entries:
                if row is not None and ready:
                    continue
                shape = tuple(p.shape)
                if p.dtype in _WORK_DTYPES:
                    work, grad, wide = tf.numpy_view(p), tf.numpy_view(g), None
                else:
                    wide = p.detach().float()
                    work, grad = tf.numpy_view(wide), tf.numpy_view(g.float())
                step = int(state["step"].item()) + 1
                finished.append((p, wide, state, rng))
                span = tf.span_row(fmt, whole, view, work, grad, step, amsgrad)
                if span is not None:
                    spans.append(span)
                    continue
                moments = [tf.storage_of(fmt, view, role, shape) for role in tf.ROLES[:2]]
                moments.append(tf.storage_of(fmt, view, tf.ROLES[2], shape) if amsgrad else None)
                rows.append((work, grad, *moments, step))
            if rows:
                numpy_buckets.append((fmt, rng, rows))
        factors: list[float] = []
        if spans:
            if plan is not None and plan.update_clip is not None:
                raise NotImplementedError(
                    "update clipping with int8 state on FSDP2 shards whose blocks straddle "
                    "ranks is not supported"
                )
            # First: a collective, which every rank must reach whatever fails afterwards.
            update_spans_(spans, hp, impl=impl)
        for fmt, rng, rows in numpy_buckets:
            columns = [list(column) for column in zip(*rows, strict=True)]
            if plan is None or plan.update_clip is None:
                adam_update_stored_(fmt, *columns, hp, rng=rng, impl=impl)
                continue
            factors.extend(
                update_through_(
                    fmt,
                    clipped_adam_update_,
                    *columns,
                    hp,
                    rng=rng,
                    **_clip_options(plan),
                )
            )
        step_addresses = []
        for fmt, rng, entries in table_buckets:
            # `entries` keeps every tensor whose address is in the table alive.
            steps, bad = update_stored_tables_(
                fmt, [e[5] for e in entries], [e[0].dtype for e in entries], hp, rng
            )
            step_addresses.append(steps)
            if bad.any():
                index = int(np.flatnonzero(bad)[0])
                p = entries[index][0]
                raise ValueError(
                    f"parameter {position[id(p)]} of the group: {int(bad[index])} block(s) of "
                    f"{fmt.block} got non-finite moments, which {fmt.name} state cannot hold; "
                    "those blocks (parameter and state) were left unchanged, the rest of the "
                    "group's parameters in this format were updated (skip non-finite steps "
                    "before the update: the guard's non-finite check)"
                )
        for steps in step_addresses:
            advance_step_counts(steps)
        for p, wide, state, rng in finished:
            state["step"] += 1
            if wide is None:
                continue
            if stochastic and p.dtype == torch.bfloat16:
                tf.round_to_bf16_(p, tf.numpy_view(wide), rng)
            else:
                p.copy_(wide)
        return factors


#: Whether ``Adam._update_stored`` takes the parameters it can through the address-table kernels
#: (one call per format and dtype); ``False`` forces the per-parameter path (same results, bit
#: for bit: the tests compare the two).
_STORED_TABLES = True
_DENSE_STATE = "fp32"  # the format whose table rows hold the 8-bit formats' float32 moments


_PLAIN = (float, int, bool, str, type(None))


def _settings_key(group: dict[str, Any]) -> tuple[Any, ...] | None:
    # Every setting with its type, or None when one is not a plain immutable value.
    key = []
    for name in _SETTING_KEYS:
        value = group.get(name)
        if isinstance(value, tuple):
            if not all(type(item) in _PLAIN for item in value):
                return None
            key.append((tuple, tuple((type(item), item) for item in value)))
        elif type(value) in _PLAIN:
            key.append((type(value), value))
        else:
            return None
    return tuple(key)


def _clip_options(plan: StepPlan) -> dict[str, Any]:
    return {
        "update_clip": plan.update_clip,
        "rms_threshold": plan.rms_threshold,
        "atan2_a": plan.atan2_a,
        "atan2_b": plan.atan2_b,
    }


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
        process_group: Any = None,
        state: str | None = None,
        param_rounding: str = "nearest",
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
            process_group=process_group,
            state=state,
            param_rounding=param_rounding,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Like torch.optim.AdamW: whatever is loaded, this stays AdamW.
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
