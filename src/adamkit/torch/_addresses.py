"""Raw-address views of CPU tensors for :mod:`adamkit.kernels.numba_tables`.

A kernel call over an address table replaces one ``tensor.numpy()`` per tensor (0.6-3 us each)
with one ``data_ptr()`` (0.06 us); these helpers are the only place that decides which tensors
may be handed over that way: plain (not DTensor, not sparse) CPU tensors, C-contiguous, float32
or float64, without a lazy negation bit, every tensor of a parameter's row of the parameter's
size.  Anything else goes to the caller's general path.

An address is only a number: the caller must keep every tensor whose address is in a table
alive, unchanged in size and place, until the kernel call that uses the table has returned.
Kernel calls here follow ``torch.get_num_threads()`` as the NumPy-view path does
(:func:`numba_threads`), and restore torch's count afterwards.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from adamkit.core.config import AdamHyperParams
from adamkit.kernels import numba_available

__all__ = [
    "KERNEL_DTYPES",
    "Table",
    "add_parts",
    "grad_tables",
    "numba_threads",
    "numpy_dtype",
    "param_tables",
    "rms_update_table_",
    "rms_update_tables_",
    "split_blocks",
    "squares_parts",
    "sum_squares",
    "update_tables_",
]

KERNEL_DTYPES = (torch.float32, torch.float64)
#: One dtype's share of a step: int64 address rows ``(n, 5)`` (param, grad, exp_avg,
#: exp_avg_sq, max_exp_avg_sq; the last repeats exp_avg_sq without AMSGrad), sizes ``(n,)`` and
#: the addresses of the float32 step counts ``(n,)``; see :mod:`adamkit.kernels.numba_tables`.
Table = tuple[np.ndarray, np.ndarray, np.ndarray]
_NUMPY = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype of a :data:`KERNEL_DTYPES` torch dtype."""
    return _NUMPY[dtype]


@contextlib.contextmanager
def numba_threads() -> Iterator[None]:
    """Inside, numba's thread count follows ``torch.get_num_threads()`` (capped by
    ``NUMBA_NUM_THREADS``); torch's own count is restored on exit (starting numba's OpenMP pool
    resets the process-wide setting torch reads: seen 1 -> 2 threads)."""
    import numba

    torch_threads = torch.get_num_threads()
    wanted = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def _threads_for(elements: int, threshold: int) -> contextlib.AbstractContextManager[None]:
    # numba_threads() only where the kernel will run on the pool (at least `threshold`
    # elements): reading and setting thread counts costs several microseconds, a fifth of a
    # small model's whole step.
    return numba_threads() if elements >= threshold else contextlib.nullcontext()


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def split_blocks(
    tensors: Sequence[Tensor],
) -> tuple[dict[torch.dtype, tuple[np.ndarray, np.ndarray]], list[Tensor]]:
    """``({dtype: (addresses, sizes)}, rest)``: the tensors a table kernel can read, by dtype
    (int64 arrays), and the others in order.  Empty tables when numba is not installed.  The
    caller keeps ``tensors`` alive while the tables are used (see the module docstring)."""
    if not numba_available():
        return {}, list(tensors)
    dtensor = _dtensor_type()
    found: dict[torch.dtype, tuple[list[int], list[int]]] = {}
    rest: list[Tensor] = []
    for t in tensors:
        dtype = t.dtype
        if (
            (dtype is torch.float32 or dtype is torch.float64)
            and t.layout is torch.strided
            and (dtensor is None or not isinstance(t, dtensor))
            and _kernel_ready(t, dtype, t.numel())
        ):
            addresses, sizes = found.setdefault(dtype, ([], []))
            addresses.append(t.data_ptr())
            sizes.append(t.numel())
        else:
            rest.append(t)
    tables = {
        dtype: (np.array(a, dtype=np.int64), np.array(n, dtype=np.int64))
        for dtype, (a, n) in found.items()
    }
    return tables, rest


def squares_parts(
    tables: dict[torch.dtype, tuple[np.ndarray, np.ndarray]], parallel: bool | None = None
) -> list[np.ndarray]:
    """The per-chunk float64 sums of squares of every block in ``tables`` (from
    :func:`split_blocks`), one array per dtype (:func:`adamkit.kernels.numba_tables.squares_parts`:
    each block's parts depend on that block only; ``parallel`` as there)."""
    from adamkit.kernels import numba_tables

    if parallel is False:
        return [
            numba_tables.squares_parts(addresses, sizes, _NUMPY[dtype], parallel=False)
            for dtype, (addresses, sizes) in tables.items()
        ]
    total = max((int(sizes.sum()) for _, sizes in tables.values()), default=0)
    with _threads_for(total if parallel is None else 1, numba_tables.SUM_PARALLEL_MIN_SIZE):
        return [
            numba_tables.squares_parts(addresses, sizes, _NUMPY[dtype], parallel=parallel)
            for dtype, (addresses, sizes) in tables.items()
        ]


def add_parts(parts: Sequence[np.ndarray]) -> float:
    """The correctly rounded sum of all parts (``math.fsum``): the same float for the same
    parts in any grouping or order, so a sum of squares does not depend on which call took
    which block."""
    if not parts:
        return 0.0
    return math.fsum(np.concatenate(parts)) if len(parts) > 1 else math.fsum(parts[0])


def sum_squares(tables: dict[torch.dtype, tuple[np.ndarray, np.ndarray]]) -> float:
    """Sum of squares (float64) of every block in ``tables`` (from :func:`split_blocks`)."""
    return add_parts(squares_parts(tables))


def _kernel_ready(t: Tensor, dtype: torch.dtype, n: int) -> bool:
    # A tensor of a row: the row's dtype and size, on the CPU, C-contiguous, no negation bit.
    return t.dtype is dtype and t.is_cpu and t.is_contiguous() and not t.is_neg() and t.numel() == n


def param_tables(
    rows: Sequence[tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]],
) -> tuple[dict[torch.dtype, Table], list[int]]:
    """``({dtype: Table}, rejected)`` for rows ``(param, grad, exp_avg, exp_avg_sq,
    max_exp_avg_sq or None, step)``: the rows the table kernel can update (plain C-contiguous CPU
    tensors of one float dtype and one size per row, a one-element float32 CPU step count) and
    the positions of the others.  Only cheap attribute reads: this runs for every parameter of
    every step.  The caller keeps ``rows`` alive while the tables are used."""
    found: dict[torch.dtype, tuple[list[tuple[int, ...]], list[int], list[int]]] = {}
    rejected: list[int] = []
    f32, f64 = torch.float32, torch.float64
    dtensor = _dtensor_type()
    for i, (p, g, m, v, w, s) in enumerate(rows):
        dtype = p.dtype
        n = p.numel()
        # Written out rather than a loop over (g, m, v, w): a generator per parameter costs
        # about as much as all these reads together.
        if (
            (dtype is f32 or dtype is f64)
            and p.is_cpu
            and p.is_contiguous()
            and not p.is_neg()
            and (dtensor is None or not isinstance(p, dtensor))
            and s.dtype is f32
            and s.is_cpu
            and s.numel() == 1
            and _kernel_ready(g, dtype, n)
            and _kernel_ready(m, dtype, n)
            and _kernel_ready(v, dtype, n)
            and (w is None or _kernel_ready(w, dtype, n))
        ):
            if w is None:
                w = v
            entry = found.get(dtype)
            if entry is None:
                entry = found[dtype] = ([], [], [])
            entry[0].append((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), w.data_ptr()))
            entry[1].append(n)
            entry[2].append(s.data_ptr())
        else:
            rejected.append(i)
    tables = {
        dtype: (
            np.array(addresses, dtype=np.int64),
            np.array(sizes, dtype=np.int64),
            np.array(steps, dtype=np.int64),
        )
        for dtype, (addresses, sizes, steps) in found.items()
    }
    return tables, rejected


def grad_tables(
    tables: dict[torch.dtype, Table], keep: dict[torch.dtype, np.ndarray] | None = None
) -> dict[torch.dtype, tuple[np.ndarray, np.ndarray]]:
    """The gradients' blocks of ``tables`` (from :func:`param_tables`) in the form of
    :func:`split_blocks`; ``keep``: per dtype, a boolean mask of the rows to take (all rows of
    a dtype without an entry)."""
    found = {}
    for dtype, (rows, sizes, _) in tables.items():
        mask = None if keep is None else keep.get(dtype)
        if mask is None:
            found[dtype] = (np.ascontiguousarray(rows[:, 1]), sizes)
        elif mask.any():
            found[dtype] = (np.ascontiguousarray(rows[mask, 1]), sizes[mask])
    return found


def update_tables_(
    tables: dict[torch.dtype, Table], hp: AdamHyperParams, *, measure: bool = False
) -> tuple[float, float]:
    """One Adam step (step counts included) of every row in ``tables``.  Returns ``(sum of
    squared parameter changes, sum of squared old values)`` when ``measure``, else zeros."""
    from adamkit.kernels import numba_tables

    total = [0.0, 0.0]
    largest = max((int(sizes.sum()) for _, sizes, _ in tables.values()), default=0)
    with _threads_for(largest, numba_tables.PARALLEL_MIN_SIZE):
        for dtype, (rows, sizes, steps) in tables.items():
            counts = numba_tables.advance_steps(steps)
            sums = numba_tables.adam_update_table_(
                rows, sizes, counts, _NUMPY[dtype], hp, measure=measure
            )
            if sums is not None:
                total[0] += sums[0]
                total[1] += sums[1]
    return total[0], total[1]


def rms_update_table_(
    table: Table,
    dtype: torch.dtype,
    hp: AdamHyperParams,
    threshold: float,
    *,
    measure: bool = False,
) -> tuple[list[float], tuple[float, float]]:
    """Step counts, then StableAdamW's per-tensor lr factors
    (:func:`adamkit.kernels.numba_tables.rms_lr_factors`), then the step with each tensor's
    clipped lr.  Returns the factors in the table's order and, when ``measure``, the sums of
    :func:`update_tables_` (else zeros)."""
    from adamkit.kernels import numba_tables

    rows, sizes, steps = table
    np_dtype = _NUMPY[dtype]
    with _threads_for(int(sizes.sum()), numba_tables.PARALLEL_MIN_SIZE):
        counts = numba_tables.advance_steps(steps)
        factors = numba_tables.rms_lr_factors(rows, sizes, counts, np_dtype, hp, threshold)
        sums = numba_tables.adam_update_table_(
            rows, sizes, counts, np_dtype, hp, lr_factors=factors, measure=measure
        )
    return factors.tolist(), (sums if sums is not None else (0.0, 0.0))


def rms_update_tables_(
    tables: dict[torch.dtype, Table],
    hp: AdamHyperParams,
    threshold: float,
    *,
    measure: bool = False,
) -> tuple[list[float], tuple[float, float]]:
    """:func:`rms_update_table_` over every dtype's table; factors concatenated in the dict's
    order, sums added."""
    factors: list[float] = []
    total = [0.0, 0.0]
    for dtype, table in tables.items():
        scales, sums = rms_update_table_(table, dtype, hp, threshold, measure=measure)
        factors.extend(scales)
        total[0] += sums[0]
        total[1] += sums[1]
    return factors, (total[0], total[1])
