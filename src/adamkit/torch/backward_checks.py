"""The guard's gradient check folded into the backward pass (``GuardConfig.check_in_backward``).

The default guard needs one number per step: the global gradient norm (NaN/inf when some
gradient is not finite).  Taken in ``step()`` it is one more pass over every gradient: at 10M
parameters about 4 of the 32 bytes per parameter that the guarded step moves, +15-18% of the
step on the development VM.  :class:`BackwardSquares` takes each large gradient's sum of squares
in a ``register_post_accumulate_grad_hook`` instead, right after autograd wrote it (so it is read
from cache), and ``step()`` uses the recorded value instead of reading the gradient again.

A record is used only while it certainly describes the gradient the step is about to read: the
recorded tensor is alive (a weak reference), still at the same address, of the same size, and
its version counter (``tensor._version``, moved by every in-place torch op: accumulation,
``zero_()``, ``clip_grad_norm_``, ``GradScaler.unscale_``, ...) has not changed since.
Anything else makes ``step()`` read that gradient itself.  A record holds the gradient's
per-chunk partial sums, exactly those the step's own kernel would form, and the step adds all
parts with ``math.fsum``: the norm, and so every decision of the guard, is bit-identical with or
without the hooks (a resumed run, whose first step has no records yet, stays exact).

Writes that bypass the version counter after backward (``grad.data.mul_()``, a NumPy or
DLPack view, a ``torch.from_numpy`` alias of the same memory) are not seen: code that modifies
gradients that way turns the option off (``guard={"check_in_backward": False}``).

Hooked: parameters with at least :data:`HOOK_MIN_SIZE` elements whose gradients are plain
C-contiguous float32/float64 CPU tensors (the kernel of :mod:`adamkit.kernels.numba_tables`);
below that size the hook's own cost (a Python call and a kernel dispatch, 2-4 us) exceeds the
read it saves, and the step's one kernel call over all small gradients is cheaper.  With
gradient accumulation the hook runs after every backward, each time on the freshly accumulated
(cached) gradient.  Hooks are removed when their owner is garbage-collected; they are not part
of the parameters' pickles or deep copies (torch does not copy such hooks).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adamkit.torch._addresses import Table, grad_tables, split_blocks, squares_parts

__all__ = ["HOOK_MIN_SIZE", "BackwardSquares", "recorded_parts", "table_grad_parts"]

#: Parameters with fewer elements are not hooked (see the module docstring).
HOOK_MIN_SIZE = 1 << 16

# address -> (weak reference to the gradient, its version then, its size, its partial sums)
_Record = tuple["weakref.ReferenceType[Tensor]", int, int, np.ndarray]


def _record_hook(owner_ref: weakref.ReferenceType[BackwardSquares], p: Tensor) -> None:
    owner = owner_ref()
    grad = p.grad
    if owner is None or grad is None:
        return
    if not owner._pending:
        # One kernel call over every gradient of this backward, when it ends: per hook, waking
        # numba's pool next to torch's still-spinning intra-op threads cost 5x the read (1.3 ms
        # per 4 MB gradient on 2 cores), and one thread alone reads 3x slower than two.
        torch.autograd.Variable._execution_engine.queue_callback(owner._record_pending)
    owner._pending.append(grad)


def _remove(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _bind(owner: weakref.ReferenceType[BackwardSquares]) -> Any:
    # A closure over a weak reference: the hook, which the parameter keeps, must not keep the
    # optimizer alive.
    def hook(p: Tensor) -> None:
        _record_hook(owner, p)

    return hook


class BackwardSquares:
    """Partial sums of squares of gradients, recorded by post-accumulate-grad hooks.

    :meth:`attach` hooks the eligible parameters, once each; :meth:`lookup` returns a gradient's
    recorded parts, or ``None`` when the step must read it.  Holds only weak references to
    gradients; its hooks are removed when it is garbage-collected or :meth:`detach` is called.
    """

    def __init__(self) -> None:
        self._records: dict[int, _Record] = {}
        self._pending: list[Tensor] = []
        self._handles: list[Any] = []
        self._hooked: weakref.WeakSet[Tensor] = weakref.WeakSet()
        weakref.finalize(self, _remove, self._handles)

    def _record_pending(self) -> None:
        pending, self._pending = self._pending, []
        tables, rest = split_blocks(pending)  # `rest` is read by the step
        if not tables:
            return
        from adamkit.kernels.numba_tables import CHUNK  # numba is installed: tables exist

        skipped = {id(g) for g in rest}
        for dtype, parts in zip(tables, squares_parts(tables), strict=True):
            start = 0  # the parts of the blocks, in the blocks' order: ceil(n / CHUNK) each
            for g in pending:
                if g.dtype is not dtype or id(g) in skipped:
                    continue
                n = g.numel()
                stop = start + -(-n // CHUNK)
                self._records[g.data_ptr()] = (weakref.ref(g), g._version, n, parts[start:stop])
                start = stop

    def attach(self, params: Iterable[Tensor]) -> None:
        """Hook every CPU leaf parameter of ``params`` that requires grad, has at least
        :data:`HOOK_MIN_SIZE` elements and is not hooked yet; the others are left alone."""
        owner = weakref.ref(self)
        for p in params:
            if (
                isinstance(p, Tensor)
                and p.requires_grad
                and p.is_leaf
                and p.is_cpu
                and p.numel() >= HOOK_MIN_SIZE
                and p not in self._hooked
            ):
                self._handles.append(p.register_post_accumulate_grad_hook(_bind(owner)))
                self._hooked.add(p)

    def detach(self) -> None:
        """Remove every hook and record."""
        _remove(self._handles)
        self._hooked = weakref.WeakSet()
        self._records.clear()

    @property
    def active(self) -> bool:
        """Whether any record exists (without one, :meth:`lookup` always returns ``None``)."""
        return bool(self._records)

    def lookup(self, address: int, size: int) -> np.ndarray | None:
        """The recorded partial sums of the gradient at ``address`` with ``size`` elements, or
        ``None`` unless exactly that tensor was recorded and has not changed since (see the
        module docstring).  A record is used once: the next step needs a new backward."""
        record = self._records.pop(address, None)
        if record is None:
            return None
        grad = record[0]()
        if (
            grad is None
            or grad._version != record[1]
            or record[2] != size
            or grad.data_ptr() != address
        ):
            return None
        return record[3]


def recorded_parts(
    checks: BackwardSquares | None, grads: Iterable[Tensor]
) -> tuple[list[np.ndarray], list[Tensor]]:
    """``(recorded partial sums, gradients without a usable record)``."""
    grads = list(grads)
    if checks is None or not checks.active:
        return [], grads
    parts: list[np.ndarray] = []
    rest: list[Tensor] = []
    for g in grads:
        n = g.numel()
        found = checks.lookup(g.data_ptr(), n) if n >= HOOK_MIN_SIZE and g.is_cpu else None
        if found is None:
            rest.append(g)
        else:
            parts.append(found)
    return parts, rest


def table_grad_parts(
    checks: BackwardSquares | None, tables: dict[torch.dtype, Table]
) -> list[np.ndarray]:
    """The partial sums of squares of the gradients in ``tables`` (from
    :func:`adamkit.torch._addresses.param_tables`): recorded ones where usable, the others read
    by one kernel call per dtype."""
    if checks is None or not checks.active:
        return squares_parts(grad_tables(tables))
    parts: list[np.ndarray] = []
    keep: dict[torch.dtype, np.ndarray] = {}
    for dtype, (rows, sizes, _) in tables.items():
        big = np.flatnonzero(sizes >= HOOK_MIN_SIZE)
        if not len(big):
            continue
        mask = np.ones(len(sizes), dtype=bool)
        for j in big.tolist():
            found = checks.lookup(int(rows[j, 1]), int(sizes[j]))
            if found is not None:
                parts.append(found)
                mask[j] = False
        keep[dtype] = mask
    return parts + squares_parts(grad_tables(tables, keep))
