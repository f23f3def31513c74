"""Checks that a state_dict fits an optimizer before anything is loaded, and the state layout.

State per parameter, with torch's key names so checkpoints are interchangeable with
``torch.optim.Adam``/``AdamW`` in both directions:

=================  ===========================================  ==============================
key                meaning                                       dtype / shape / device
=================  ===========================================  ==============================
``step``           number of updates applied (t)                 float32 0-d tensor on the CPU
                                                                 (float64 when torch's default
                                                                 dtype is float64, like torch)
``exp_avg``        first moment m                                the parameter's
``exp_avg_sq``     second moment v                               the parameter's
``max_exp_avg_sq`` running max of v (only with ``amsgrad``)       the parameter's
=================  ===========================================  ==============================

That is the layout of ``state=None`` (the default).  With a state format (``state="fp32"``,
``"bf16"``, ``"int8"``) an entry also holds ``state_format`` and the moments in that format's
compact form, codes and ``<key>_scale`` tensors for ``int8`` (the table is in
:mod:`adamkit.torch.formats`); the state dict then has a top-level ``"state_rng"``, the state of
the generator behind stochastic rounding, so that resuming is exact.  ``state_format`` is the
format's name in the live state and its number (:data:`adamkit.torch.formats.FORMAT_CODES`: 1
``fp32``, 2 ``bf16``, 3 ``int8``, 4 ``int8-companded``) in ``state_dict()``, because the flattened
state dicts of ``torch.distributed.checkpoint`` hold no strings; loading takes either.  Under
FSDP2 (DTensor parameters) the state dict holds the single-process layout whatever the number of
ranks (moments as DTensors, ``int8`` block scales of the whole tensor), see
:mod:`adamkit.torch.formats`.  Loading converts every
entry to the format this optimizer gives its parameter (from torch's layout, from another
format, or back), whatever the checkpoint's groups say: ``state`` and ``param_rounding`` are
settings of the optimizer (:data:`OPTIMIZER_KEYS`).  :func:`adamkit.torch.formats.dense_state_dict`
turns a compressed state dict into torch's layout for ``torch.optim.Adam``.

With a stability guard (``guard=``, on by default) the state dict has a third top-level entry,
``"guard"``: the guard's counters and running statistics as plain Python values and, when
loss-spike handling keeps one, the rollback snapshot's tensors (parameters and their state, about
3x the parameters' memory; 4x with AMSGrad), so that resuming after or before a rollback is
exact (see :meth:`adamkit.torch.guarded.TorchGuard.state_dict`).  ``torch.optim.Adam`` ignores
the entry; a checkpoint without it starts the guard afresh.

``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype and does
not compare anything but group sizes, so :func:`check_state_dict` compares everything first (group
count and sizes, parameter names when both sides have them, hyper-parameters, state keys, shapes
and dtypes) and raises ``ValueError``/``TypeError`` before the optimizer is touched.  Names are
compared without the segments that wrappers add (DDP's leading ``module.``, ``_orig_mod.`` of
``torch.compile``, FSDP1's and activation checkpointing's wrappers), as
``torch.distributed.checkpoint`` does, so a checkpoint of ``DDP(model)`` loads into ``model``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from adamkit.torch._groups import check_group
from adamkit.torch.formats import (
    ParsedEntry,
    check_state_options,
    is_dtensor,
    local_saved_entry,
    parse_entry,
)

__all__ = [
    "ADAMKIT_GROUP_KEYS",
    "OPTIMIZER_KEYS",
    "LoadedEntry",
    "check_state_dict",
    "scalar_dtype",
    "step_tensor",
]

# Group settings that torch.optim.Adam does not have; a torch checkpoint lacks them, and loading
# one keeps this optimizer's values for them.
ADAMKIT_GROUP_KEYS: tuple[str, ...] = ("impl", "decay_mode", "construction_lr")

OPTIMIZER_KEYS: tuple[str, ...] = ("state", "param_rounding")
"""Group settings that describe this optimizer's storage, not the run: loading a state dict keeps
the optimizer's values (and converts the moments to its state format)."""


class LoadedEntry(NamedTuple):
    """One validated per-parameter entry of a state dict, matched to the optimizer's parameter
    ``param`` (position ``position`` of group ``group``)."""

    param: torch.Tensor
    group: int
    position: int
    entry: ParsedEntry


def scalar_dtype() -> torch.dtype:
    """dtype of ``state["step"]``: float64 if torch's default dtype is float64, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def step_tensor(value: float) -> torch.Tensor:
    """A CPU 0-d ``step`` tensor holding ``value`` (torch keeps it on the CPU unless capturable)."""
    return torch.tensor(float(value), dtype=scalar_dtype())


def _step_number(value: Any, where: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}: step must be a single number, got shape {value.shape}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: step must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0 and float(value).is_integer()):
        raise ValueError(f"{where}: step must be a whole number >= 0, got {value!r}")
    return float(value)


def _check_param_state(
    param: torch.Tensor, state: Any, amsgrad: bool, where: str
) -> ParsedEntry | None:
    if is_dtensor(param):
        # FSDP2: validated and converted on this rank's shard (see adamkit.torch.formats).
        local = local_saved_entry(state, param, where)
        shape = tuple(param.to_local().shape)
        parsed = parse_entry(local, shape, param.dtype, amsgrad, where, tuple(param.shape))
    else:
        parsed = parse_entry(state, tuple(param.shape), param.dtype, amsgrad, where)
    if parsed is not None:
        _step_number(parsed.step, where)
    return parsed


# Path segments that wrappers add to parameter names: torch.compile's `_orig_mod`, FSDP1's and
# activation checkpointing's wrapper modules, and (leading only) DDP's/DataParallel's `module`.
# torch.distributed.checkpoint's state dicts drop them, so a checkpoint saved from a wrapped
# model loads into the bare model and back; names are compared without them.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def _bare_name(name: Any) -> Any:
    if not isinstance(name, str):
        return name
    parts = [part for part in name.split(".") if part not in _WRAPPER_SEGMENTS]
    if len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _check_names(index: int, ours: dict[str, Any], saved: dict[str, Any]) -> None:
    if "param_names" not in ours or "param_names" not in saved:
        return
    for position, (mine, theirs) in enumerate(
        zip(ours["param_names"], saved["param_names"], strict=True)
    ):
        if _bare_name(mine) != _bare_name(theirs):
            raise ValueError(
                f"param group {index}, parameter {position}: the state dict is for {theirs!r}, "
                f"this optimizer has {mine!r} (was the checkpoint written for another model?)"
            )


def check_state_dict(optimizer: torch.optim.Optimizer, state_dict: Any) -> list[LoadedEntry]:
    """Raise ``ValueError``/``TypeError`` unless ``state_dict`` fits ``optimizer`` exactly.

    Checks, in order: the two top-level entries; the number of groups and of parameters per
    group; parameter names (where both sides have them); each group's hyper-parameters (keys
    missing from the state dict, like adamkit's own in a torch checkpoint, count with the
    optimizer's current values; a saved ``state`` must name a known format); every state entry
    (known parameter, keys, step, shapes; torch's layout: dtypes equal to the parameter's;
    compressed entries: see :func:`adamkit.torch.formats.parse_entry`).  Modifies nothing.
    Returns the non-empty entries, validated and matched to their parameters.
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
        raise TypeError("state_dict must be a dict with entries 'state' and 'param_groups'")
    groups = optimizer.param_groups
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} parameter groups, this optimizer has "
            f"{len(groups)}"
        )
    id_to_param: dict[Any, tuple[torch.Tensor, bool, str, int, int]] = {}
    for index, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise TypeError(f"param group {index} in the state dict must be a dict with 'params'")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {index} has {len(saved['params'])} parameters in the state dict, "
                f"{len(group['params'])} in this optimizer"
            )
        _check_names(index, group, saved)
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        try:
            check_group(merged)
            check_state_options(merged)
        except (TypeError, ValueError) as error:
            raise type(error)(f"param group {index} in the state dict: {error}") from None
        names = group.get("param_names") or saved.get("param_names")
        for position, (param_id, param) in enumerate(
            zip(saved["params"], group["params"], strict=True)
        ):
            label = f"param group {index}, parameter {position}"
            if names:
                label += f" ({names[position]!r})"
            id_to_param[param_id] = (param, bool(merged["amsgrad"]), label, index, position)
    loaded = []
    for param_id, state in state_dict["state"].items():
        if param_id not in id_to_param:
            raise ValueError(f"the state dict has state for an unknown parameter id {param_id!r}")
        param, amsgrad, label, index, position = id_to_param[param_id]
        parsed = _check_param_state(param, state, amsgrad, label)
        if parsed is not None:
            loaded.append(LoadedEntry(param, index, position, parsed))
    return loaded
