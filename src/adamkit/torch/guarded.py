r"""The stability guard (:mod:`adamkit.guard`) on torch optimizers: norms, snapshots, the wrapper.

:class:`TorchGuard` runs the guard's per-step protocol (:mod:`adamkit.guard.policy`) on a
``torch.optim.Optimizer``: it asks :class:`~adamkit.guard.Guard` for a plan, restores or takes a
:class:`TorchSnapshot`, lets the optimizer apply the update (or not), and reports the norms.
``adamkit.torch.Adam(..., guard=...)`` uses it inside its own ``step``; :class:`GuardedOptimizer`
puts it around any other torch optimizer.

Cost with nothing wrong.  The default guard (non-finite skip only) reads the gradients once more
per step: one L2 norm per (device, dtype) bucket (``torch._foreach_norm``), combined in float64,
and one device-to-host transfer per device to decide on the host (free on the CPU; on a GPU the
same one sync that ``GradScaler`` makes).  The norm doubles as the gradient-norm diagnostic.
``track_update_norm`` costs a copy of the parameters and two more reductions; update clipping
``"rms"`` one reduction and one sync per tensor; snapshots the memory stated on
:class:`TorchSnapshot`.

Under ``torch.distributed`` the guard is collective: every rank takes the same decision, so
replicas never drift apart and a sharded model never applies a step on some shards only.

- Which group.  ``process_group=None`` (the default of :class:`TorchGuard`, ``Adam``/``AdamW``
  and :class:`GuardedOptimizer`): the default process group when one is initialized and has more
  than one rank, else no communication at all.  A ``ProcessGroup``: that group.  ``False``: never
  communicate (an optimizer used on some ranks only, or replicas meant to decide on their own).
  Every rank of the group must call ``step()`` on its optimizer, as for any collective, and with
  the same guard configuration.  The check costs nothing when unused; no ``torch.distributed``
  submodule is imported for it.
- What is reduced, once per step: each rank contributes one row (its local sum of squared
  gradients, split into plain tensors and DTensor shards; its loss; whether it gave one; whether
  its loss was invalid), and one ``all_reduce`` (SUM) of a ``world_size x 5`` float64 table in
  which every other rank's row is zero gathers all rows exactly, on every rank.  Each rank then
  computes the same global norm and mean loss from the same table, in rank order, so the
  decisions agree bit for bit; one device-to-host transfer reads the table (the one sync the
  local guard makes anyway).  With ``track_update_norm`` the update and parameter norms take a
  second, equal-sized reduction after the update.  Neither happens when the configuration needs
  neither the gradient norm nor the loss (``skip_nonfinite=False``, no spike handling).
- Gradient norm.  DTensor gradients (FSDP2) count their local shard, divided by the number of
  replicas along ``Replicate`` mesh dimensions, and the shards are summed over the ranks.  Plain
  gradients are ambiguous: under DDP every rank holds the same all-reduced gradients, under
  ZeRO-1 (``ZeroRedundancyOptimizer``, whose inner optimizer holds only this rank's parameters)
  each holds different ones.  When every rank reports a bit-identical plain sum of squares (what
  DDP's identical gradients give) it is counted once, otherwise the ranks' sums are added; so the
  norm is exact in both cases, and the decision is the same on every rank in all cases.  A NaN or
  Inf on any rank, in any shard, makes the norm non-finite everywhere: every rank skips.
- Loss.  Each rank's loss is its own batch's; the guard judges the mean over the ranks that gave
  one (float64, rank order), so loss-spike skips, snapshots and rollbacks happen on all ranks
  together.  With loss-spike handling on, a loss that is not a real number on some rank raises
  on every rank (the original error there, ``ValueError`` naming the rank elsewhere) after the
  reduction and changes nothing, instead of leaving the other ranks waiting in the collective;
  without it the loss is only a diagnostic and an invalid one is left out.
- Per-rank parts.  Update clipping ``"rms"`` uses each tensor's mean over all of its elements:
  on a DTensor (FSDP2) the mean is reduced by DTensor inside the step (one small reduction per
  tensor, on the ``impl="torch"``/``"auto"`` path, which the NumPy-backed implementations fall
  back to for DTensors); under ZeRO-1 each tensor lives on one rank whole.  The counter
  ``n_update_clipped`` and the factors count this rank's tensors.
- Checkpoints.  :meth:`TorchGuard.state_dict` rides along in ``optimizer.state_dict()``, but
  ``torch.distributed.checkpoint.state_dict.get_state_dict`` keeps only ``"state"`` and
  ``"param_groups"`` (it rebuilds the dict around parameter names); save the guard next to it
  with :func:`adamkit.torch.distributed.guard_checkpoint_state` and load it with
  :func:`adamkit.torch.distributed.load_guard_checkpoint`.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adamkit.core.config import to_real
from adamkit.guard import Guard, GuardConfig, StepPlan, clipped_adam_update_, resolve_guard
from adamkit.kernels import numba_available
from adamkit.torch._addresses import (
    Table,
    add_parts,
    numba_threads,
    param_tables,
    rms_update_table_,
    split_blocks,
    squares_parts,
)
from adamkit.torch.distributed import reduce_device
from adamkit.torch.functional import adam_torch_, hyper_params

__all__ = [
    "GuardedOptimizer",
    "TorchGuard",
    "TorchSnapshot",
    "adam_numpy_clipped_",
    "check_process_group",
    "global_norm",
    "global_squares",
    "uses_collectives",
]

STATE_FORMAT = "adamkit.torch.guard"
STATE_VERSION = 1

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Frames in these folders are optimizer plumbing (torch's step wrappers, lr-scheduler patches,
# this package): the guard's warning points at the first frame outside them, the user's step().
_PLUMBING = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _user_stacklevel() -> int:
    # stacklevel for warnings.warn inside Guard.plan_step called by TorchGuard.run:
    # 1 = plan_step, 2 = run, 3 = run's caller, ... up to the first frame outside the plumbing.
    frame, level = sys._getframe(2), 3
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PLUMBING):
        frame, level = frame.f_back, level + 1
    return level


def global_norm(tensors: Iterable[Tensor]) -> float:
    """``sqrt(sum of squares)`` over every element of every tensor, as a Python float.

    One reduction per tensor (``torch._foreach_norm`` per (device, dtype) bucket; float16/bfloat16
    accumulate in float32, sparse tensors use their coalesced values), combined in float64, one
    ``.item()`` per device.  NaN if any element is NaN, ``inf`` if any is infinite or a tensor's
    sum of squares overflows its dtype (float32: a norm above about 1.8e19); 0.0 for no elements.
    Contiguous CPU float32/float64 tensors, when numba is installed, are summed by one kernel
    call in float64 (:mod:`adamkit.kernels.numba_tables`: no per-tensor dispatch, which
    dominated for thousands of small tensors); elsewhere each tensor's norm is accumulated in its
    own dtype (float32: relative error up to about 1e-3 for 1e7 elements), because float64
    accumulation costs ten times as much in torch on the CPU; that is ample for detecting
    non-finite values and for z-scores of the norm.
    """
    total = global_squares(list(tensors))
    return math.sqrt(total) if not math.isnan(total) else math.nan


def global_squares(tensors: Sequence[Tensor], parts: Sequence[np.ndarray] = ()) -> float:
    """The square of :func:`global_norm` of ``tensors``, plus the partial sums of squares
    ``parts`` (float64 arrays from :func:`adamkit.torch._addresses.squares_parts` or records of
    the same, see :mod:`adamkit.torch.backward_checks`).  The kernel-read tensors and ``parts``
    are added exactly (``math.fsum``), so the result does not depend on which of them came as
    parts."""
    # `tensors` is held until the kernel has read them: tables hold addresses only.
    tables, rest = split_blocks(tensors)
    total = add_parts([*parts, *squares_parts(tables)]) if tables or parts else 0.0
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in rest:
        if t.is_sparse:
            t = t.coalesce().values()
        buckets.setdefault((t.device, t.dtype), []).append(t.detach())
    squares: dict[torch.device, list[Tensor]] = {}
    for (device, dtype), group in buckets.items():
        if dtype in _LOW_PRECISION:
            norms = torch._foreach_norm(group, 2, dtype=torch.float32)
        else:
            norms = torch._foreach_norm(group)
        # float64 where the device has it (MPS does not)
        acc = torch.float32 if device.type == "mps" else torch.float64
        squares.setdefault(device, []).append(torch.stack(norms).to(acc).square().sum())
    for device_parts in squares.values():
        total += torch.stack(device_parts).sum().item()
    return total


# -- the collective part (see "Under torch.distributed" in the module docstring) ---------------


def _dtensor_type() -> type | None:
    # No DTensor can exist unless torch.distributed.tensor was imported; never import it here.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def check_process_group(process_group: Any) -> Any:
    """Validate the ``process_group=`` argument of a guard: ``None`` (the default group when one
    is initialized), ``False`` (never communicate) or a ``torch.distributed.ProcessGroup``.
    Returns it; raises ``TypeError`` for anything else (``True`` included)."""
    if process_group is None or process_group is False:
        return process_group
    group_type = getattr(torch.distributed, "ProcessGroup", None)
    if group_type is not None and isinstance(process_group, group_type):
        return process_group
    raise TypeError(
        "process_group must be None (the default process group, when initialized), False (no "
        f"communication) or a torch.distributed.ProcessGroup, got {type(process_group).__name__} "
        f"{process_group!r}"
    )


def _active_group(process_group: Any) -> tuple[bool, Any]:
    # (communicate?, group argument for torch.distributed); a group of one rank needs nothing.
    if process_group is False:
        return False, None
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is None:
            return False, None
        raise RuntimeError("the guard's process_group is set but no process group is initialized")
    return dist.get_world_size(process_group) > 1, process_group


def uses_collectives(process_group: Any) -> bool:
    """Whether a guard with this ``process_group`` argument would reduce across processes now
    (also ``True`` when it names a group but none is initialized: its step will raise)."""
    try:
        return _active_group(process_group)[0]
    except RuntimeError:
        return True


# Columns of the per-rank row: sums of squares of plain tensors and of DTensor shards (already
# divided by their replication), the loss, loss given (0/1), loss invalid (0/1).
_PLAIN, _SHARDED, _LOSS, _HAS_LOSS, _BAD_LOSS = range(5)
_ROW = 5


def _local_parts(tensors: Iterable[Tensor]) -> list[tuple[Tensor, int, float]]:
    """``(local tensor, column, weight)`` per tensor: a DTensor gives its local shard, in the
    sharded column, weighted by 1 / (replicas along its Replicate mesh dimensions)."""
    dtensor = _dtensor_type()
    parts = []
    for t in tensors:
        if dtensor is not None and isinstance(t, dtensor):
            replicas = 1
            for dim, placement in enumerate(t.placements):
                if placement.is_replicate():
                    replicas *= t.device_mesh.size(dim)
            parts.append((t.to_local(), _SHARDED, 1.0 / replicas))
        else:
            parts.append((t, _PLAIN, 1.0))
    return parts


def _sum_squares_into(
    row: Tensor, parts: Iterable[tuple[Tensor, int, float]], offset: int = 0
) -> None:
    """Add each part's weighted sum of squares to ``row[offset + column]`` (float64, on the
    row's device) without reading anything back to the host."""
    buckets: dict[tuple[torch.device, torch.dtype, int, float], list[Tensor]] = {}
    for t, column, weight in parts:
        if t.is_sparse:
            t = t.coalesce().values()
        buckets.setdefault((t.device, t.dtype, column, weight), []).append(t.detach())
    for (_, dtype, column, weight), group in buckets.items():
        if dtype in _LOW_PRECISION:
            norms = torch._foreach_norm(group, 2, dtype=torch.float32)
        else:
            norms = torch._foreach_norm(group)
        square = torch.stack(norms).to(row.device, torch.float64).square().sum()
        row[offset + column] += square * weight if weight != 1.0 else square


def _combine(values: Sequence[float]) -> float:
    # Plain tensors: bit-identical sums on every rank are one replicated set (DDP), counted once;
    # otherwise the ranks hold different tensors (ZeRO-1) and the sums add.  NaN != NaN, so a
    # NaN anywhere goes to the sum and stays NaN.
    first = values[0]
    return first if all(v == first for v in values) else sum(values)


def _norm_from(rows: Sequence[Sequence[float]], offset: int = 0) -> float:
    plain = _combine([row[offset + _PLAIN] for row in rows])
    sharded = sum(row[offset + _SHARDED] for row in rows)
    total = plain + sharded
    return math.nan if math.isnan(total) else math.sqrt(total)


def _gather_rows(row: Tensor, group: Any) -> list[list[float]]:
    """Every rank's ``row`` (1-d float64 on :func:`~adamkit.torch.distributed.reduce_device`), in
    rank order: one ``all_reduce`` (SUM) of a table that is zero outside this rank's row, which
    adds only exact zeros to each entry, then one read to the host."""
    dist = torch.distributed
    table = row.new_zeros((dist.get_world_size(group), row.numel()))
    table[dist.get_rank(group)] = row
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    return table.tolist()


def _loss_entry(row: Tensor, loss: Any, strict: bool) -> BaseException | None:
    # Write the loss into the row without reading it to the host.  An invalid loss is an error
    # only when loss-spike handling needs it (``strict``; else, as in _guard_loss, it is no
    # reason to fail and is left out): it is recorded in the row and returned, to be raised
    # after the collective so that no rank is left waiting.
    if loss is None:
        return None
    try:
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"loss must be a single number, got an array/tensor of {loss.numel()} elements"
                )
            if loss.is_complex() or loss.dtype == torch.bool:
                raise TypeError(f"loss must be a real number, got a {loss.dtype} tensor")
            row[_LOSS] = loss.detach().reshape(()).to(row.device, torch.float64)
        else:
            row[_LOSS] = to_real(loss, "loss")
    except (TypeError, ValueError) as error:
        row[_LOSS] = 0.0
        if not strict:
            return None
        row[_BAD_LOSS] = 1.0
        return error
    row[_HAS_LOSS] = 1.0
    return None


def _collective_inputs(
    grads: Sequence[Tensor], loss: Any, group: Any, config: GuardConfig
) -> tuple[float | None, float | None]:
    """(global gradient norm, or None when ``config`` does not need it; mean loss over the ranks
    that gave one, or None), the same on every rank of ``group``; one collective."""
    row = torch.zeros(_ROW, dtype=torch.float64, device=reduce_device(group))
    if config.needs_grad_norm:
        _sum_squares_into(row, _local_parts(grads))
    error = _loss_entry(row, loss, strict=config.loss_spike)
    rows = _gather_rows(row, group)
    bad = [rank for rank, r in enumerate(rows) if r[_BAD_LOSS]]
    if bad:
        if error is not None:
            raise error
        raise ValueError(
            f"the loss given to step() on rank(s) {bad} is not a real number; no rank updated"
        )
    losses = [r[_LOSS] for r in rows if r[_HAS_LOSS]]
    mean = sum(losses) / len(losses) if losses else None
    return (_norm_from(rows) if config.needs_grad_norm else None), mean


def _all_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _clone_value(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else copy.deepcopy(value)


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, Tensor) else 0


class TorchSnapshot:
    """A rollback target: copies of every parameter of an optimizer and of its per-parameter state.

    ``params[i]`` and ``states[i]`` belong to the ``i``-th parameter in ``param_groups`` order
    (torch's state-dict numbering); ``states[i]`` is ``None`` for a parameter without state then
    (restoring removes any state it has gained since).  Memory (:attr:`nbytes`) sits on the
    parameters' devices: parameter + whatever the optimizer keeps, i.e. 3x the parameters for
    Adam, 4x with AMSGrad.  Restoring copies; the snapshot stays reusable and is never modified.
    """

    __slots__ = ("params", "states")

    def __init__(self, params: list[Tensor], states: list[dict[str, Any] | None]) -> None:
        if len(params) != len(states):
            raise ValueError(f"got {len(params)} parameters but {len(states)} states")
        self.params = params
        self.states = states

    @classmethod
    def take(cls, optimizer: torch.optim.Optimizer) -> TorchSnapshot:
        """Copy the parameters and per-parameter state of ``optimizer`` as they are now."""
        params, states = [], []
        for p in _all_params(optimizer):
            params.append(p.detach().clone())
            state = optimizer.state.get(p)
            states.append({k: _clone_value(v) for k, v in state.items()} if state else None)
        return cls(params, states)

    def matches(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the snapshot still describes ``optimizer``'s parameters (count and shapes)."""
        params = _all_params(optimizer)
        return len(params) == len(self.params) and all(
            p.shape == q.shape for p, q in zip(params, self.params, strict=True)
        )

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Write the saved values back into ``optimizer``'s parameters and state (in place where
        the live tensor fits, so references to them stay valid).  ``ValueError`` if the
        parameters no longer match (see :meth:`matches`); nothing is changed then."""
        if not self.matches(optimizer):
            raise ValueError("the snapshot does not match the optimizer's parameters any more")
        for p, saved, state in zip(_all_params(optimizer), self.params, self.states, strict=True):
            p.copy_(saved)
            if state is None:
                optimizer.state.pop(p, None)
                continue
            live = optimizer.state.get(p) or {}
            restored = {}
            for key, value in state.items():
                current = live.get(key)
                if (
                    isinstance(value, Tensor)
                    and isinstance(current, Tensor)
                    and current.shape == value.shape
                    and current.dtype == value.dtype
                ):
                    restored[key] = current.copy_(value)
                else:
                    restored[key] = _clone_value(value)
            optimizer.state[p] = restored

    @property
    def nbytes(self) -> int:
        """Bytes held by the copied tensors."""
        total = sum(_nbytes(p) for p in self.params)
        for state in self.states:
            total += sum(_nbytes(v) for v in (state or {}).values())
        return total

    def to_state(self) -> dict[str, Any]:
        """``{"params": [tensor per parameter], "state": {index: {key: value}}}`` (references, like
        ``Optimizer.state_dict``; parameters without state are left out of ``"state"``)."""
        return {
            "params": list(self.params),
            "state": {i: dict(s) for i, s in enumerate(self.states) if s is not None},
        }

    @classmethod
    def from_state(
        cls, optimizer: torch.optim.Optimizer, data: Any, where: str = "guard snapshot"
    ) -> TorchSnapshot:
        """Rebuild from :meth:`to_state` for ``optimizer`` (tensors copied to each parameter's
        device, dtypes kept).  Raises ``TypeError``/``ValueError`` naming the entry when ``data``
        does not fit the parameters (count, shape, dtype); modifies nothing."""
        if not isinstance(data, Mapping) or set(data) != {"params", "state"}:
            raise TypeError(f"{where} must be a dict with exactly 'params' and 'state'")
        targets = _all_params(optimizer)
        saved = data["params"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(targets):
            count = len(saved) if isinstance(saved, (list, tuple)) else type(saved).__name__
            raise ValueError(f"{where} holds {count} parameters, this optimizer has {len(targets)}")
        params = []
        for i, (value, p) in enumerate(zip(saved, targets, strict=True)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{where} parameter {i} must be a tensor, got {type(value)}")
            if value.shape != p.shape or value.dtype != p.dtype:
                raise ValueError(
                    f"{where} parameter {i} is {value.dtype} {tuple(value.shape)}, the parameter "
                    f"is {p.dtype} {tuple(p.shape)}"
                )
            params.append(value.detach().to(p.device, copy=True))
        raw_states = data["state"]
        if not isinstance(raw_states, Mapping):
            raise TypeError(f"{where} 'state' must be a dict, got {type(raw_states).__name__}")
        states: list[dict[str, Any] | None] = [None] * len(targets)
        for index, state in raw_states.items():
            if (
                isinstance(index, bool)
                or not isinstance(index, int)
                or not 0 <= index < len(targets)
            ):
                raise ValueError(f"{where} has state for an unknown parameter index {index!r}")
            if not isinstance(state, Mapping):
                raise TypeError(f"{where} state {index} must be a dict, got {type(state)}")
            device = targets[index].device
            # "step" stays where it was saved (torch keeps it on the CPU unless fused/capturable).
            states[index] = {
                k: v.detach().to(device, copy=True)
                if isinstance(v, Tensor) and k != "step"
                else _clone_value(v)
                for k, v in state.items()
            }
        return cls(params, states)


def _guard_loss(loss: Any, config: GuardConfig) -> Any:
    # The loss judged by loss-spike handling must reach the guard (one sync on a GPU).  Without it
    # the loss is only a diagnostic: passed when reading it is free, never a reason to fail.
    if loss is None or config.loss_spike:
        return loss
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return loss
    if isinstance(loss, Tensor) and loss.numel() == 1 and loss.device.type == "cpu":
        return None if loss.is_complex() else loss
    return None


class TorchGuard:
    """A :class:`~adamkit.guard.Guard` and its snapshot tensors, for one torch optimizer.

    ``config``: anything :func:`~adamkit.guard.resolve_guard` accepts except "off".
    ``process_group``: where the decisions are taken together (see "Under torch.distributed" in
    the module docstring; :func:`check_process_group` says what is accepted).  The owner calls
    :meth:`run` once per ``step()``; :meth:`state_dict` / :meth:`prepare_load` carry the guard's
    numbers *and* the snapshot tensors, so a resumed run rolls back exactly like an
    uninterrupted one.  A copy (``copy.deepcopy``) shares the process group; pickling needs
    ``process_group`` ``None`` or ``False`` (a group object does not pickle).
    """

    def __init__(self, config: Any, process_group: Any = None) -> None:
        self.process_group = check_process_group(process_group)
        self.guard = Guard(config)
        self.snapshot: TorchSnapshot | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Objects pickled before the guard became collective have no process_group.
        self.__dict__.update({"process_group": None, **state})

    def __deepcopy__(self, memo: dict[int, Any]) -> TorchGuard:
        # Process groups cannot be copied; the copy decides with the same ranks.
        copied = TorchGuard.__new__(TorchGuard)
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            setattr(copied, key, value if key == "process_group" else copy.deepcopy(value, memo))
        return copied

    @property
    def config(self) -> GuardConfig:
        """The guard's configuration."""
        return self.guard.config

    def run(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[Tensor],
        apply: Callable[[StepPlan], Sequence[float]],
        *,
        loss: Any = None,
        grad_norm: Callable[[], float] | None = None,
        measures_update: bool = False,
    ) -> bool:
        """One guarded step; returns whether the update was applied.

        ``params``: the parameters about to be updated (those with a gradient); their gradients
        give the global norm.  ``apply(plan)`` must apply the update as the plan says
        (``grad_scale``, ``lr_scale``, ``update_clip``) and return the per-tensor "rms" factors
        (or an empty sequence).  ``loss``: the step's loss or ``None``.  ``grad_norm``: a
        function returning :func:`global_norm` of those gradients, for an owner that can compute
        it faster (used without a process group only; called at most once).
        ``measures_update``: the owner can measure the update-norm diagnostic itself; then,
        when it is tracked and there is no process group, ``apply(plan, measure=True)`` is
        called instead and returns ``(factors, {"update_norm": ..., "param_norm": ...})``, and
        no copy of the parameters is taken here.  Errors raised before
        ``apply`` (a bad loss) leave the guard, the optimizer and the parameters unchanged.  The
        one-time :class:`~adamkit.guard.GuardWarning` points at the caller's ``step()`` line.
        """
        guard = self.guard
        if self.snapshot is not None and len(self.snapshot.params) != sum(
            len(group["params"]) for group in optimizer.param_groups
        ):
            self.snapshot = None  # parameters were added since: a rollback could not be exact
        if self.snapshot is None and guard.has_snapshot:
            guard.invalidate_snapshot()
        config = guard.config
        collective, group = _active_group(self.process_group)
        # With nothing to decide from the norm or the loss, the ranks cannot disagree.
        collective = collective and (config.needs_grad_norm or config.loss_spike)
        if collective:
            grads = [p.grad for p in params]
            norm, step_loss = _collective_inputs(grads, loss, group, config)
        else:
            norm = grad_norm
            if norm is None:
                grads = [p.grad for p in params]
                norm = lambda: global_norm(grads)  # noqa: E731 - read at most once, if needed
            step_loss = _guard_loss(loss, config)
        plan = guard.plan_step(
            loss=step_loss,
            grad_norm=norm,
            # Only the first non-finite skip warns, so the frame walk (a few microseconds) stops
            # once it has happened.
            stacklevel=_user_stacklevel() if guard.counters["n_skipped_nonfinite"] == 0 else 2,
        )
        if plan.restore_snapshot:
            self.snapshot.restore(optimizer)
            return False
        if plan.take_snapshot:
            self.snapshot = None  # free the old copies first: one snapshot in memory at a time
            self.snapshot = TorchSnapshot.take(optimizer)
        if not plan.apply:
            return False
        track = config.track_update_norm
        if track and measures_update and not collective:
            factors, norms = apply(plan, measure=True)  # type: ignore[call-arg]
            guard.record_update(update_scales=list(factors), **norms)
            return True
        if collective and track:
            parts = _local_parts([p.detach() for p in params])
            before = [t.clone() for t, _, _ in parts]
        else:
            before = [p.detach().clone() for p in params] if track else []
        factors = list(apply(plan))
        norms: dict[str, float] = {}
        if collective and track:
            norms = self._collective_update_norms(parts, before, group)
        elif track and before:
            deltas = torch._foreach_sub([p.detach() for p in params], before)
            norms = {"update_norm": global_norm(deltas), "param_norm": global_norm(before)}
        elif track:
            norms = {"update_norm": 0.0, "param_norm": 0.0}
        if factors or norms:
            guard.record_update(update_scales=factors, **norms)
        return True

    @staticmethod
    def _collective_update_norms(
        parts: list[tuple[Tensor, int, float]], before: list[Tensor], group: Any
    ) -> dict[str, float]:
        # Local shards after and before the update, reduced like the gradients (one collective).
        row = torch.zeros(2 * _ROW, dtype=torch.float64, device=reduce_device(group))
        deltas = torch._foreach_sub([t for t, _, _ in parts], before) if parts else []
        weights = [(column, weight) for _, column, weight in parts]
        _sum_squares_into(row, [(d, c, w) for d, (c, w) in zip(deltas, weights, strict=True)])
        _sum_squares_into(
            row, [(b, c, w) for b, (c, w) in zip(before, weights, strict=True)], offset=_ROW
        )
        rows = _gather_rows(row, group)
        return {"update_norm": _norm_from(rows), "param_norm": _norm_from(rows, offset=_ROW)}

    @property
    def snapshot_nbytes(self) -> int:
        """Bytes held by the current snapshot (0 without one)."""
        return 0 if self.snapshot is None else self.snapshot.nbytes

    def state_dict(self) -> dict[str, Any]:
        """``{"format", "version", "guard": Guard.state_dict(), "snapshot": TorchSnapshot.to_state()
        or None}``; the snapshot's tensors are included so that resuming is exact."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "guard": self.guard.state_dict(),
            "snapshot": None if self.snapshot is None else self.snapshot.to_state(),
        }

    def prepare_load(self, optimizer: torch.optim.Optimizer, entry: Any) -> Callable[[], None]:
        """Validate ``entry`` (from :meth:`state_dict`, or ``None`` for a checkpoint without one)
        against ``optimizer`` and return the function that commits it.

        Validation raises ``TypeError``/``ValueError`` and changes nothing; the returned commit
        cannot fail.  ``None`` commits a fresh guard (same config, counters at 0, no snapshot).
        The live config is kept (see :meth:`adamkit.guard.Guard.load_state_dict`).
        """
        guard = Guard(self.guard.config)
        snapshot = None
        if entry is not None:
            keys = {"format", "version", "guard", "snapshot"}
            if not isinstance(entry, Mapping) or set(entry) != keys:
                raise TypeError(f"state_dict['guard'] must be a dict with keys {sorted(keys)}")
            if entry["format"] != STATE_FORMAT or entry["version"] != STATE_VERSION:
                raise ValueError(
                    f"state_dict['guard'] is {entry['format']!r} version {entry['version']!r}; "
                    f"this adamkit reads {STATE_FORMAT!r} version {STATE_VERSION}"
                )
            guard.load_state_dict(entry["guard"])
            if entry["snapshot"] is not None and guard.has_snapshot:
                snapshot = TorchSnapshot.from_state(optimizer, entry["snapshot"])
        if snapshot is None:
            guard.invalidate_snapshot()

        def commit() -> None:
            self.guard = guard
            self.snapshot = snapshot

        return commit


def _view(tensor: Tensor) -> np.ndarray:
    # Shares memory (strides included) with the tensor, so writes land in it.
    return tensor.detach().numpy()


def adam_numpy_clipped_(
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
    """The guard's clipped Adam step (:func:`adamkit.guard.clipped_adam_update_`, the NumPy
    reference) on zero-copy NumPy views: what the NumPy-backed implementations (``impl=
    "reference"``, the numba kernel) run when update clipping is on.  With numba installed,
    ``"rms"`` runs on the tensors the table kernel takes as one read-only pass for the factors
    plus the fused step (:func:`adamkit.kernels.numba_tables.rms_lr_factors`), and ``"atan2"``
    by :func:`adamkit.kernels.numba_clipped.atan2_update_` when every tensor qualifies, both
    within float rounding of the reference (tested); everything else runs the reference.

    Same arguments as :func:`adamkit.torch.functional.adam_torch_`; CPU float32/float64 tensors
    only.  Returns the per-tensor "rms" factors (empty list otherwise).  DTensor parameters
    (FSDP2) go to ``adam_torch_`` instead, whose "rms" mean covers the whole tensor, not only
    this rank's shard.
    """
    if not params:
        return []
    dtensor = _dtensor_type()
    if dtensor is not None and any(isinstance(p, dtensor) for p in params):
        return adam_torch_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            state_steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            update_clip=update_clip,
            rms_threshold=rms_threshold,
            atan2_a=atan2_a,
            atan2_b=atan2_b,
        )
    hp = hyper_params(
        float(lr), beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize
    )
    rows = list(
        zip(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs if amsgrad else [None] * len(params),
            state_steps,
            strict=True,
        )
    )
    tables: dict[torch.dtype, Table] = {}
    rest = list(range(len(rows)))
    if update_clip == "rms" and numba_available():
        # The numba path: one read-only pass for the factors, then the fused step with each
        # tensor's clipped lr (the reference below re-runs the whole NumPy step instead).
        tables, rest = param_tables(rows)
    factors: dict[int, float] = {}
    if tables:
        left = set(rest)
        done = [i for i in range(len(rows)) if i not in left]
        for dtype, table in tables.items():
            positions = [i for i in done if rows[i][0].dtype is dtype]  # param_tables' order
            scales, _ = rms_update_table_(table, dtype, hp, rms_threshold)
            factors.update(zip(positions, scales, strict=True))
        if not rest:
            return [factors[i] for i in range(len(rows))]
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = (
        [rows[i][k] for i in rest] for k in range(6)
    )
    arrays = (
        [_view(p) for p in params],
        [_view(g) for g in grads],
        [_view(m) for m in exp_avgs],
        [_view(v) for v in exp_avg_sqs],
        [_view(v) for v in max_exp_avg_sqs] if amsgrad else [None] * len(params),
    )
    fused_atan2 = False
    if update_clip == "atan2" and numba_available():
        from adamkit.kernels import numba_clipped, numba_cpu

        fused_atan2 = all(numba_cpu.qualifies(*row) for row in zip(*arrays, strict=True))
    steps = []
    for step_t in state_steps:
        step_t += 1
        steps.append(int(step_t.item()))
    if fused_atan2:
        with numba_threads():
            numba_clipped.atan2_update_(*arrays, steps, hp, atan2_a=atan2_a, atan2_b=atan2_b)
        reference: list[float] = []
    else:
        reference = clipped_adam_update_(
            *arrays,
            steps,
            hp,
            update_clip=update_clip,
            rms_threshold=rms_threshold,
            atan2_a=atan2_a,
            atan2_b=atan2_b,
        )
    if not factors:
        return reference
    factors.update(zip(rest, reference, strict=True))
    return [factors[i] for i in range(len(rows))]


def _wrapper_config(guard: Any) -> GuardConfig | None:
    """Read ``guard=`` for :class:`GuardedOptimizer`: as :func:`~adamkit.guard.resolve_guard`,
    except that the preset ``"all"`` leaves update clipping off (a foreign step cannot be
    clipped); asking for ``update_clip`` explicitly raises ``ValueError``."""
    if isinstance(guard, str) and guard == "all":
        guard = {"preset": "all", "update_clip": None}
    elif isinstance(guard, dict) and guard.get("preset") == "all" and "update_clip" not in guard:
        guard = {**guard, "update_clip": None}
    config = resolve_guard(guard)
    if config is not None and config.update_clip is not None:
        raise ValueError(
            f"Invalid update_clip: {config.update_clip!r} (GuardedOptimizer cannot clip the "
            "update of another optimizer's step; use adamkit.torch.Adam/AdamW(guard=...) or "
            "update_clip=None)"
        )
    return config


_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class GuardedOptimizer(torch.optim.Optimizer):
    """The stability guard around any ``torch.optim.Optimizer`` (``SGD``, ``torch.optim.Adam``...).

    ``GuardedOptimizer(optimizer, guard="all")`` is an optimizer itself: lr schedulers,
    ``GradScaler`` and hooks accept it, and ``param_groups``/``state``/``defaults`` are the
    wrapped optimizer's own objects.  ``guard`` is read like ``adamkit.torch.Adam``'s (``"all"``,
    ``True``/``"default"``, a dict of options, a :class:`~adamkit.guard.GuardConfig`, or
    ``False``/``None``/``"off"`` for a plain pass-through).

    What applies to a foreign optimizer:

    - non-finite skip, gradient-spike clipping (the gradients are scaled out of place: ``p.grad``
      points to a scaled copy during the wrapped step and back to the caller's tensor after),
      loss-spike skips, snapshots and rollbacks (of the parameters and everything in
      ``optimizer.state``), the lr factor after a rollback (``group["lr"]`` is multiplied during
      the wrapped step only and restored to the very same object after, so schedulers do not
      drift), diagnostics.
    - **not** update clipping (it lives inside Adam's step): the preset ``"all"`` leaves it off,
      and asking for it raises ``ValueError``; use ``adamkit.torch.Adam/AdamW(guard=...)``.

    ``process_group``: where the guard decides collectively under ``torch.distributed`` (see the
    module docstring): ``None`` the default group when initialized, ``False`` never, or a group.

    ``step(closure=None, *, loss=None)``: the closure (if any) runs here, once, with gradients
    enabled, and the wrapped optimizer's ``step()`` is called without it, so optimizers that
    re-evaluate the closure (``LBFGS``) are refused (``TypeError``), as are adamkit optimizers
    that already have their own guard (``ValueError``: configure that one instead).  Returns
    the closure's value like torch; :attr:`last_step_applied` and :attr:`guard_diagnostics` say
    what happened.  ``state_dict()`` is the wrapped one plus ``"guard"`` (see
    :meth:`TorchGuard.state_dict`), which torch optimizers ignore on load.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, guard: Any = "all", *, process_group: Any = None
    ) -> None:
        check_process_group(process_group)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("LBFGS re-evaluates its closure inside step(); it cannot be guarded")
        if isinstance(optimizer, GuardedOptimizer) or getattr(optimizer, "guard", None) is not None:
            raise ValueError(
                f"{type(optimizer).__name__} is already guarded; configure its own guard instead "
                "(adamkit optimizers: guard=...), or build it with guard=False"
            )
        config = _wrapper_config(guard)
        self.optimizer = optimizer
        self._guard = None if config is None else TorchGuard(config, process_group)
        self.last_step_applied = True
        self._init_torch_bookkeeping()

    def _init_torch_bookkeeping(self) -> None:
        # What Optimizer.__init__ would set up, without adding the groups a second time.
        for name in _HOOK_DICTS:
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    # The wrapped optimizer's own objects, also after its load_state_dict replaces them.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def guard(self) -> Guard | None:
        """The :class:`~adamkit.guard.Guard` (config, counters), or ``None`` when off."""
        return None if self._guard is None else self._guard.guard

    @property
    def guard_diagnostics(self) -> dict[str, Any] | None:
        """What the last step did, as a plain dict (see :attr:`adamkit.guard.Guard.diagnostics`);
        ``None`` when the guard is off."""
        return None if self._guard is None else self._guard.guard.diagnostics

    def __getstate__(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "_guard": self._guard,
            "last_step_applied": self.last_step_applied,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_torch_bookkeeping()

    def __repr__(self) -> str:
        config = None if self._guard is None else self._guard.config
        return f"GuardedOptimizer({self.optimizer!r}, guard={config!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (its rules)."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """Run ``closure`` (if given), then the guarded step of the wrapped optimizer.

        ``loss``: the step's loss when there is no closure (for loss-spike handling); giving
        both raises ``ValueError``.  Returns ``closure()``'s value (``None`` without one).
        """
        if closure is not None and loss is not None:
            raise ValueError("pass the step's loss either through closure or as loss=, not both")
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = loss = closure()
        if self._guard is None:
            self.optimizer.step()
            self.last_step_applied = True
            return result
        params = [p for p in _all_params(self) if p.grad is not None]
        self.last_step_applied = self._guard.run(self, params, self._apply, loss=loss)
        if not self.last_step_applied:
            # An lr scheduler attached to the wrapped optimizer watches its step(); a skipped
            # step is still a step for the schedule, so do not let it warn about the order.
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
        return result

    def _apply(self, plan: StepPlan) -> list[float]:
        grads: list[tuple[Tensor, Tensor]] = []
        lrs: list[tuple[dict[str, Any], Any]] = []
        try:
            if plan.grad_scale != 1.0:
                for p in _all_params(self):
                    if p.grad is not None:
                        grads.append((p, p.grad))
                        p.grad = p.grad * plan.grad_scale
            if plan.lr_scale != 1.0:
                for group in self.param_groups:
                    lrs.append((group, group["lr"]))
                    group["lr"] = group["lr"] * plan.lr_scale
            self.optimizer.step()
        finally:
            for p, grad in grads:
                p.grad = grad
            for group, lr in lrs:
                group["lr"] = lr
        return []

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"guard"`` (numbers and snapshot tensors)."""
        state_dict = self.optimizer.state_dict()
        if self._guard is not None:
            state_dict["guard"] = self._guard.state_dict()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of the wrapped optimizer, with or without ``"guard"`` (without: the
        guard starts afresh).  The guard part is checked first; ``TypeError``/``ValueError``
        from it or from the wrapped optimizer leave the guard unchanged."""
        commit = None
        if self._guard is not None:
            if not isinstance(state_dict, Mapping):
                raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
            commit = self._guard.prepare_load(self, state_dict.get("guard"))
        self.optimizer.load_state_dict(state_dict)
        if commit is not None:
            commit()
