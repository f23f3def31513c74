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
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from adamkit.core.config import AdamHyperParams
from adamkit.kernels import numba_available

__all__ = [
    "KERNEL_DTYPES",
    "StoredLayout",
    "Table",
    "add_parts",
    "advance_step_counts",
    "grad_tables",
    "numba_threads",
    "numpy_dtype",
    "param_tables",
    "rms_update_table_",
    "rms_update_tables_",
    "split_blocks",
    "squares_parts",
    "stored_layout",
    "stored_row",
    "sum_squares",
    "update_stored_tables_",
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


# -- compressed (stored-format) state ------------------------------------------------------------


class StoredLayout(NamedTuple):
    """What a table row of a stored format holds (see :func:`stored_row`): the torch dtypes of
    the ``m`` and the ``v``/``v_max`` tensors, and the block of their float32 scales (0: none,
    bf16 bits)."""

    m_dtype: torch.dtype
    v_dtype: torch.dtype
    block: int


_TORCH_CODES = {
    np.dtype(np.uint16): torch.bfloat16,  # bf16 bits live in bfloat16 tensors
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.float32): torch.float32,  # dense moments ("fp32")
}


def stored_layout(fmt: Any, impl: str) -> StoredLayout | None:
    """The :class:`StoredLayout` of ``fmt``'s table rows when ``impl`` (a group's resolved stored
    implementation) runs ``fmt`` through the fused kernels and they have a table kernel for it
    (:func:`adamkit.kernels.numba_formats.table_layout`), else ``None``."""
    if impl == "reference" or not numba_available():
        return None
    from adamkit.kernels import numba_formats
    from adamkit.kernels.stored import resolve_stored_impl

    if resolve_stored_impl(impl, fmt) != "numba":
        return None
    layout = numba_formats.table_layout(fmt)
    if layout is None:
        return None
    m_dtype, v_dtype = numba_formats.table_code_dtypes(fmt)
    block = 0 if layout[0] in ("bf16", "dense") else layout[1]
    return StoredLayout(_TORCH_CODES[m_dtype], _TORCH_CODES[v_dtype], block)


_ROLE_KEYS = (
    ("exp_avg", "exp_avg_scale"),
    ("exp_avg_sq", "exp_avg_sq_scale"),
    ("max_exp_avg_sq", "max_exp_avg_sq_scale"),
)


def stored_row(
    layout: StoredLayout, p: Tensor, g: Tensor, state: dict[str, Any], amsgrad: bool
) -> tuple[list[int], int, int] | None:
    """``(addresses, size, step address)`` of one parameter's row for
    :func:`update_stored_tables_` (columns of :data:`adamkit.kernels.numba_formats.TABLE_COLUMNS`),
    or ``None`` when the table kernel cannot take it: ``p`` and ``g`` plain C-contiguous CPU
    float32/float64 tensors of one dtype and size (not DTensors: the caller checks), ``state``'s
    moments of ``layout``'s dtypes and ``p``'s size, scales float32 of one per block, all
    contiguous, and a one-element float32 CPU ``step``.  Only cheap attribute reads."""
    dtype = p.dtype
    if not (dtype is torch.float32 or dtype is torch.float64):
        return None
    n = p.numel()
    if not (_kernel_ready(p, dtype, n) and _kernel_ready(g, dtype, n)):
        return None
    s = state.get("step")
    if s is None or not (s.dtype is torch.float32 and s.is_cpu and s.numel() == 1):
        return None
    block = layout.block
    blocks = -(-n // block) if block else 0
    cells = [p.data_ptr(), g.data_ptr()]
    for index in range(3 if amsgrad else 2):
        role, scale = _ROLE_KEYS[index]
        t = state.get(role)
        if t is None or not _kernel_ready(t, layout.m_dtype if index == 0 else layout.v_dtype, n):
            return None
        cells.append(t.data_ptr())
        if block:
            sc = state.get(scale)
            if sc is None or not _kernel_ready(sc, torch.float32, blocks):
                return None
            cells.append(sc.data_ptr())
        else:
            cells.append(0)
    if not amsgrad:
        cells += cells[4:6]  # the v_max columns repeat v's, unread
    return cells, n, s.data_ptr()


def advance_step_counts(step_addresses: np.ndarray) -> None:
    """Add one to each float32 step count at ``step_addresses`` (from
    :func:`update_stored_tables_`), as ``state["step"] += 1`` would."""
    from adamkit.kernels import numba_tables

    numba_tables.advance_steps(step_addresses)


def update_stored_tables_(
    fmt: Any,
    rows: Sequence[tuple[list[int], int, int]],
    dtypes: Sequence[torch.dtype],
    hp: AdamHyperParams,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One Adam step of every row (from :func:`stored_row`, parameters of ``dtypes``) with
    moments in ``fmt``, one kernel call per dtype; the step counts are read, not advanced (the
    caller advances them with :func:`adamkit.kernels.numba_tables.advance_steps` once every
    update of the step has succeeded).  With stochastic rounding one word per row (two with
    AMSGrad) is drawn from ``rng`` in row order, as
    :func:`adamkit.kernels.numba_formats.adam_update_stored_` draws them for the same rows.
    Returns the step addresses (int64) and, per row, the number of 8-bit blocks left unchanged
    for non-finite moments, as ``(steps, bad)``; the caller keeps the tensors alive."""
    from adamkit.kernels import numba_formats, numba_tables

    n = len(rows)
    table = np.array([r[0] for r in rows], dtype=np.int64).reshape(n, numba_formats.TABLE_COLUMNS)
    sizes = np.array([r[1] for r in rows], dtype=np.int64)
    step_addresses = np.array([r[2] for r in rows], dtype=np.int64)
    counts = numba_tables.read_steps(step_addresses).astype(np.int64) + 1
    keys = None
    if fmt.needs_rng:
        if hp.amsgrad:
            keys = rng.bit_generator.random_raw(2 * n).reshape(n, 2)  # type: ignore[union-attr]
        else:
            raw = rng.bit_generator.random_raw(n)  # type: ignore[union-attr]
            keys = np.stack([raw, raw], axis=1)
    bad = np.zeros(n, dtype=np.int64)
    kinds = set(dtypes)
    with _threads_for(int(sizes.sum()), numba_tables.PARALLEL_MIN_SIZE):
        for dtype in kinds:
            if len(kinds) == 1:
                bad = numba_formats.adam_update_stored_table_(
                    fmt, table, sizes, counts, _NUMPY[dtype], hp, keys
                )
                continue
            mask = np.array([d is dtype for d in dtypes])
            bad[mask] = numba_formats.adam_update_stored_table_(
                fmt,
                np.ascontiguousarray(table[mask]),
                sizes[mask],
                counts[mask],
                _NUMPY[dtype],
                hp,
                None if keys is None else np.ascontiguousarray(keys[mask]),
            )
    return step_addresses, bad
