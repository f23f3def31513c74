"""Helpers for adamkit's torch optimizers under ``torch.distributed``.

adamkit does no communication of its own.  DDP, ZeRO-1
(``torch.distributed.optim.ZeroRedundancyOptimizer(params, optimizer_class=adamkit.torch.Adam)``),
FSDP2 (``torch.distributed.fsdp.fully_shard``) and distributed checkpoints
(``torch.distributed.checkpoint`` with ``get_state_dict``/``set_state_dict``) drive
:class:`adamkit.torch.Adam`/``AdamW`` exactly as they drive ``torch.optim.Adam``.  The Adam step is
elementwise, so on FSDP2's DTensor parameters it updates each rank's shard and creates state for
that shard only.  This module adds the two things those engines do not provide:

- :func:`state_nbytes`: bytes of optimizer state held by this process, to check what sharding saves;
- :func:`any_rank`: one ``all_reduce`` so that every rank takes the same decision (a step that one
  rank must skip is skipped by all of them, or the replicas drift apart).

Everything here works without an initialized process group (then it describes the one process).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["any_rank", "state_nbytes"]


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


def _default_device(group: Any) -> torch.device:
    # NCCL reduces only CUDA tensors; every other backend adamkit meets (gloo, mpi) takes CPU ones.
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
        local = torch.tensor([int(flag)], dtype=torch.int32, device=_default_device(group))
    torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(local.item())
