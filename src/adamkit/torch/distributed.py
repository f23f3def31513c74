"""Helpers for adamkit's torch optimizers under ``torch.distributed``.

The Adam step does no communication of its own (the stability guard does one small
``all_reduce`` per step so that every rank decides the same; see :mod:`adamkit.torch.guarded`).
DDP, ZeRO-1
(``torch.distributed.optim.ZeroRedundancyOptimizer(params, optimizer_class=adamkit.torch.Adam)``),
FSDP2 (``torch.distributed.fsdp.fully_shard``) and distributed checkpoints
(``torch.distributed.checkpoint`` with ``get_state_dict``/``set_state_dict``, nested or
``flatten_optimizer_state_dict=True``) drive :class:`adamkit.torch.Adam`/``AdamW`` as they drive
``torch.optim.Adam``, with every ``state=`` format.  The Adam step is elementwise, so on FSDP2's
DTensor parameters it updates each rank's shard and creates state for that shard only (int8 forms
its blocks over the shard; when the shards are block-aligned the run is the single-process run bit
for bit, see :mod:`adamkit.torch.formats`).  Under FSDP2 with int8 state ``state_dict()`` is a
collective (every rank must call it, as ``get_state_dict`` does).  This module adds what those
engines do not provide:

- :func:`state_nbytes`: bytes of optimizer state held by this process, to check what sharding saves;
- :func:`load_zero_state_dict`: ``ZeroRedundancyOptimizer.load_state_dict`` without the float32
  copy of this rank's state that torch leaves in the wrapper (4x the bytes of ``int8`` state);
- :func:`any_rank`: one ``all_reduce`` so that every rank takes the same decision (a step that one
  rank must skip is skipped by all of them, or the replicas drift apart);
- :func:`guard_checkpoint_state` / :func:`load_guard_checkpoint`: the guard's state in a
  distributed checkpoint.  ``get_state_dict`` rebuilds the optimizer's state dict from
  ``"state"`` and ``"param_groups"`` only (it renames parameters to their FQNs, and every other
  top-level key is dropped), and ``set_state_dict`` hands ``load_state_dict`` those two keys
  only, which starts the guard afresh.  So the guard travels as an application-level key::

      model_sd, optim_sd = get_state_dict(model, optimizer)
      dcp.save({"model": model_sd, "optim": optim_sd,
                "guard": guard_checkpoint_state(optimizer)}, checkpoint_id=path)
      ...
      model_sd, optim_sd = get_state_dict(model, optimizer)
      state = {"model": model_sd, "optim": optim_sd}
      dcp.load(state, checkpoint_id=path)
      set_state_dict(model, optimizer, model_state_dict=state["model"],
                     optim_state_dict=state["optim"])
      load_guard_checkpoint(optimizer, checkpoint_id=path)   # after set_state_dict

  The same entry carries the generator behind stochastic rounding (bf16 state,
  ``param_rounding="stochastic"``), which ``get_state_dict`` drops too, so a bf16 run resumes its
  random stream exactly.

Everything here works without an initialized process group (then it describes the one process).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GUARD_CHECKPOINT_FORMAT",
    "GUARD_CHECKPOINT_VERSION",
    "any_rank",
    "guard_checkpoint_state",
    "load_guard_checkpoint",
    "load_zero_state_dict",
    "reduce_device",
    "state_nbytes",
]

GUARD_CHECKPOINT_FORMAT = "adamkit.torch.guard.dcp"
GUARD_CHECKPOINT_VERSION = 1


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _local_tensors(value: Any, dtensor: type | None) -> list[Tensor]:
    if isinstance(value, Tensor):
        if dtensor is not None and isinstance(value, dtensor):
            return [value.to_local()]
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _local_tensors(v, dtensor)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _local_tensors(v, dtensor)]
    return []


def _held_states(optimizer: torch.optim.Optimizer) -> list[Any]:
    states: list[Any] = [optimizer.state]
    # Wrappers that hold the optimizer doing the work in `.optim` (torch's
    # ZeroRedundancyOptimizer keeps this rank's state there, its own `.state` is mostly empty).
    inner = getattr(optimizer, "optim", None)
    if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        states.extend(_held_states(inner))
    return states


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state that this process holds.

    Counts every tensor in ``optimizer.state`` (inside nested dicts, lists and tuples): a DTensor
    counts its local shard only, and a tensor reachable twice counts once.  For a wrapper that
    keeps the optimizer doing the work in ``.optim`` (``ZeroRedundancyOptimizer``) that
    optimizer's state is included.  Copies made for checkpoints (``consolidate_state_dict``) are
    not optimizer state and are not counted.  Raises ``TypeError`` unless ``optimizer`` is a
    ``torch.optim.Optimizer``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    dtensor = _dtensor_type()
    seen: set[tuple[int, int, torch.dtype, torch.device]] = set()
    total = 0
    for state in _held_states(optimizer):
        for tensor in _local_tensors(dict(state), dtensor):
            key = (tensor.data_ptr(), tensor.numel(), tensor.dtype, tensor.device)
            if key in seen:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def load_zero_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> int:
    """``optimizer.load_state_dict(state_dict)`` for a ``ZeroRedundancyOptimizer``, without the
    copy torch keeps in the wrapper; returns the bytes that copy held (not shared with
    ``.optim``'s state, counted as :func:`state_nbytes` does).

    torch's ``ZeroRedundancyOptimizer.load_state_dict`` hands this rank's entries to the
    optimizer doing the work (``.optim``), then also runs ``torch.optim.Optimizer.load_state_dict``
    on the wrapper itself, which keeps every entry of this rank in the wrapper's own ``.state``,
    cast to the parameter's dtype: ``int8`` codes become float32, four times the compressed state,
    held for nothing (the wrapper never reads its ``.state``).  This clears it, which is all there
    is to it (``zero.load_state_dict(sd); zero.state.clear()`` does the same), and puts the
    entries of an adamkit ``.optim`` back in its live form (format names, see
    :data:`adamkit.torch.formats.FORMAT_CODES`).  Raises ``TypeError`` for anything but a
    ``ZeroRedundancyOptimizer``.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from adamkit.torch.formats import FORMAT_KEY, format_name

    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        raise TypeError(
            f"optimizer must be a ZeroRedundancyOptimizer, got {type(optimizer).__name__}"
        )
    optimizer.load_state_dict(state_dict)
    held = state_nbytes(optimizer)
    optimizer.state.clear()
    for entry in optimizer.optim.state.values():
        if isinstance(entry, dict) and isinstance(entry.get(FORMAT_KEY), int):
            entry[FORMAT_KEY] = format_name(entry[FORMAT_KEY])
    return held - state_nbytes(optimizer)


def reduce_device(group: Any = None) -> torch.device:
    """The device small control tensors are reduced on for ``group`` (``None``: the default
    group, which must be initialized): the current CUDA device when the group's backend is NCCL
    (it reduces only CUDA tensors), else the CPU (gloo, mpi)."""
    backend = str(torch.distributed.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool | Tensor, *, group: Any = None) -> bool:
    """``True`` on every rank when ``flag`` is true on at least one rank of ``group``.

    One ``all_reduce`` (MAX) of a one-element tensor; a collective, so every rank of ``group``
    must call it, in the same order relative to other collectives.  ``flag`` is a ``bool`` or a
    one-element bool/integer tensor (reduced on its own device, so a flag computed on the GPU
    costs no extra copy); a ``bool`` is reduced on the CPU, or on the current CUDA device when
    the group's backend is NCCL.  ``group`` defaults to the default process group.  Without an
    initialized process group it returns ``bool(flag)``.  Raises ``TypeError`` for any other
    ``flag``.
    """
    if isinstance(flag, Tensor):
        if flag.numel() != 1 or flag.is_floating_point() or flag.is_complex():
            raise TypeError(
                "flag must be a bool or a one-element bool/integer tensor, got a "
                f"{flag.dtype} tensor of shape {tuple(flag.shape)}"
            )
        # A copy: all_reduce works in place and must not write into the caller's tensor.
        local = flag.reshape(1).to(torch.int32, copy=True)
    elif isinstance(flag, bool):
        local = None
    else:
        raise TypeError(f"flag must be a bool or a one-element tensor, got {type(flag).__name__}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(flag.item()) if local is not None else flag
    if local is None:
        local = torch.tensor([int(flag)], dtype=torch.int32, device=reduce_device(group))
    torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(local.item())


# -- the guard in distributed checkpoints --------------------------------------------------------


def _torch_guard(optimizer: Any) -> Any:
    # Imported here: adamkit.torch.guarded imports this module for its reductions.
    from adamkit.torch.guarded import TorchGuard

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    guard = getattr(optimizer, "_guard", None)
    if not isinstance(guard, TorchGuard):
        raise ValueError(
            f"{type(optimizer).__name__} has no adamkit guard (adamkit.torch.Adam/AdamW or "
            "GuardedOptimizer with guard on)"
        )
    return guard


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _snapshot_layout(state: dict[str, Any]) -> dict[str, Any]:
    # What load_guard_checkpoint needs to allocate the tensors before DCP fills them: global
    # shape and dtype of each tensor; other values travel in the JSON itself.
    layout: dict[str, Any] = {"params": len(state["params"]), "state": {}}
    for index, entry in state["state"].items():
        keys: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                keys[key] = {"shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
            else:
                keys[key] = {"value": value}
        layout["state"][str(index)] = keys
    return layout


def _rng_state(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    # The generator behind stochastic rounding (bf16 state, param_rounding="stochastic"), which
    # get_state_dict drops with every top-level key but "state" and "param_groups".  Its state is
    # the same on every rank (shards draw their rounding keys from it,
    # adamkit.torch.formats.shard_rng), so DCP may keep any rank's copy.
    from adamkit.torch.formats import uses_rng

    rng = getattr(optimizer, "_format_rng", None)
    if rng is None or not uses_rng(optimizer.param_groups):
        return None
    return copy.deepcopy(rng.bit_generator.state)


def _whole_tensor_snapshot(optimizer: Any, snapshot: dict[str, Any]) -> dict[str, Any]:
    # FSDP2 with block-quantized state: a rank's block scales are its own (a plain tensor), which
    # DCP would save from one rank only; save the whole tensor's, as state_dict() does (a
    # collective, in the same order on every rank).
    from adamkit.torch import formats as tf
    from adamkit.torch.guarded import _all_params

    params = _all_params(optimizer)
    state = {}
    for index, entry in sorted(snapshot["state"].items()):
        p = params[index]
        if tf.is_dtensor(p) and isinstance(entry.get(tf.FORMAT_KEY), str):
            entry = tf.whole_tensor_entry(dict(entry), p)
        state[index] = entry
    return {**snapshot, "state": state}


def _live_snapshot_entry(param: Tensor, entry: dict[str, Any], where: str) -> dict[str, Any]:
    from adamkit.torch import formats as tf

    if tf.is_dtensor(param) and isinstance(entry.get(tf.FORMAT_KEY), str):
        return tf.live_entry(entry, param, where)
    return entry


def guard_checkpoint_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The guard of an adamkit optimizer as an entry for ``torch.distributed.checkpoint.save``.

    ``optimizer``: ``adamkit.torch.Adam``/``AdamW`` or a :class:`~adamkit.torch.GuardedOptimizer`
    with its guard on (for ``ZeroRedundancyOptimizer`` pass its ``.optim``).  Returns
    ``{"meta": str, "snapshot": {...}}``: ``meta`` is JSON (format, version, the guard's numbers
    from :meth:`adamkit.guard.Guard.state_dict`, the snapshot's layout, and ``state_rng``: the
    state of the generator behind stochastic rounding, bf16 state or
    ``param_rounding="stochastic"``, so that such a run resumes its random stream exactly; the
    state dict's ``"state_rng"``, which ``get_state_dict`` drops); ``snapshot`` is present
    only while the guard holds a rollback snapshot, as ``{"params": {"<i>": tensor}, "state":
    {"<i>": {key: tensor}}}`` (``i`` numbers the parameters in ``param_groups`` order, like
    torch's state dicts), references to the live copies (DTensors under FSDP2, so each rank
    saves its shards).  Put it under a key of its own next to ``get_state_dict``'s (see the
    module docstring).  Raises ``TypeError`` for a non-optimizer, ``ValueError`` without a guard
    or for snapshot state that is neither a tensor nor JSON-serialisable.
    """
    from adamkit.torch.guarded import STATE_FORMAT, STATE_VERSION

    guard = _torch_guard(optimizer)
    full = guard.state_dict()
    snapshot = full["snapshot"]
    if snapshot is not None:
        snapshot = _whole_tensor_snapshot(optimizer, snapshot)
    meta = {
        "format": GUARD_CHECKPOINT_FORMAT,
        "version": GUARD_CHECKPOINT_VERSION,
        "guard_format": STATE_FORMAT,
        "guard_version": STATE_VERSION,
        "guard": full["guard"],
        "snapshot": None if snapshot is None else _snapshot_layout(snapshot),
        "state_rng": _rng_state(optimizer),
    }
    try:
        text = json.dumps(meta)
    except TypeError as error:
        raise ValueError(f"guard checkpoint: state that JSON cannot hold ({error})") from None
    out: dict[str, Any] = {"meta": text}
    if snapshot is not None:
        out["snapshot"] = {
            "params": {str(i): t for i, t in enumerate(snapshot["params"])},
            "state": {
                str(i): {k: v for k, v in entry.items() if isinstance(v, Tensor)}
                for i, entry in snapshot["state"].items()
            },
        }
    return out


def _placeholder(
    param: Tensor, template: Any, spec: dict[str, Any], where: str, plain: bool = False
) -> Tensor:
    # A tensor of the saved global shape and dtype, laid out like this run's state (DTensor
    # shards under FSDP2) so that DCP reshards into it; `plain`: a tensor equal on every rank
    # (the whole tensor's int8 block scales).
    shape = tuple(spec["shape"])
    dtype = getattr(torch, spec["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {spec['dtype']!r}")
    if plain:
        return torch.empty(shape, dtype=dtype)
    if isinstance(template, Tensor) and tuple(template.shape) == shape and template.dtype == dtype:
        return torch.empty_like(template)
    if shape == tuple(param.shape):
        return torch.empty_like(param, dtype=dtype)
    if shape == ():
        return torch.empty((), dtype=dtype)
    raise ValueError(
        f"{where} is {spec['dtype']} {shape}; this optimizer has no state of that shape for "
        f"a parameter of shape {tuple(param.shape)}"
    )


def load_guard_checkpoint(
    optimizer: torch.optim.Optimizer,
    checkpoint_id: Any = None,
    *,
    storage_reader: Any = None,
    key: str = "guard",
) -> None:
    """Load what :func:`guard_checkpoint_state` saved under ``key`` into ``optimizer``'s guard.

    Call it on every rank (it runs ``torch.distributed.checkpoint.load``, a collective, once for
    the numbers and, when a snapshot was saved, once more for its tensors, allocated like this
    run's parameters and state so that DCP reshards them to any number of ranks) and after
    ``set_state_dict``, whose ``load_state_dict`` starts the guard afresh.  ``checkpoint_id`` /
    ``storage_reader`` as for ``dcp.load``.  The live configuration is kept (see
    :meth:`adamkit.guard.Guard.load_state_dict`).  Raises ``TypeError``/``ValueError`` for an
    optimizer without a guard, an entry of another format, or a snapshot that does not fit the
    parameters, and whatever ``dcp.load`` raises for a checkpoint without ``key``; the guard is
    unchanged then.  The rounding generator's state, when saved (``state_rng``, see
    :func:`guard_checkpoint_state`), replaces the optimizer's.
    """
    import torch.distributed.checkpoint as dcp

    from adamkit.torch.formats import saved_rng
    from adamkit.torch.guarded import STATE_FORMAT, STATE_VERSION, _all_params

    guard = _torch_guard(optimizer)
    loaded: dict[str, Any] = {key: {"meta": ""}}
    dcp.load(loaded, checkpoint_id=checkpoint_id, storage_reader=storage_reader)
    text = loaded[key]["meta"]
    meta = json.loads(text) if isinstance(text, str) else None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != GUARD_CHECKPOINT_FORMAT
        or meta.get("version") != GUARD_CHECKPOINT_VERSION
    ):
        raise ValueError(
            f"checkpoint entry {key!r} is not a {GUARD_CHECKPOINT_FORMAT!r} version "
            f"{GUARD_CHECKPOINT_VERSION} guard state"
        )
    snapshot = None
    layout = meta["snapshot"]
    if layout is not None:
        params = _all_params(optimizer)
        if layout["params"] != len(params):
            raise ValueError(
                f"the guard snapshot in the checkpoint holds {layout['params']} parameters, "
                f"this optimizer has {len(params)}"
            )
        target: dict[str, Any] = {
            "params": {str(i): torch.empty_like(p) for i, p in enumerate(params)},
            "state": {},
        }
        for index, keys in layout["state"].items():
            param = params[int(index)]
            live = optimizer.state.get(param, {})
            target["state"][index] = {
                name: _placeholder(
                    param,
                    live.get(name),
                    spec,
                    f"guard snapshot state {index} {name!r}",
                    plain=name.endswith("_scale"),
                )
                for name, spec in keys.items()
                if "value" not in spec
            }
        dcp.load(
            {key: {"snapshot": target}}, checkpoint_id=checkpoint_id, storage_reader=storage_reader
        )
        snapshot = {
            "params": [target["params"][str(i)] for i in range(len(params))],
            "state": {
                int(index): _live_snapshot_entry(
                    params[int(index)],
                    {
                        name: spec["value"] if "value" in spec else target["state"][index][name]
                        for name, spec in keys.items()
                    },
                    f"guard snapshot state {index}",
                )
                for index, keys in layout["state"].items()
            },
        }
    entry = {
        "format": meta.get("guard_format"),
        "version": meta.get("guard_version"),
        "guard": meta.get("guard"),
        "snapshot": snapshot,
    }
    if entry["format"] != STATE_FORMAT or entry["version"] != STATE_VERSION:
        raise ValueError(
            f"checkpoint entry {key!r} holds guard state {entry['format']!r} version "
            f"{entry['version']!r}; this adamkit reads {STATE_FORMAT!r} version {STATE_VERSION}"
        )
    rng = None
    if meta.get("state_rng") is not None and hasattr(optimizer, "_format_rng"):
        rng = saved_rng(meta["state_rng"], optimizer._format_rng)
    guard.prepare_load(optimizer, entry)()
    if rng is not None:
        optimizer._format_rng = rng
