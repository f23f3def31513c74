r"""The fused Adam step of :mod:`adamkit.kernels.numba_cpu` over many tensors in one call.

Front ends that hold their tensors in another framework (``adamkit.torch``) would otherwise pay
for a NumPy view per tensor per step: ``tensor.numpy()`` costs 0.6-3 us, four of them per
parameter, which made 10,000 tiny tensors 2.5x slower than ``torch.optim.Adam(fused=True)``.
Here a step is described by a table of raw addresses (``tensor.data_ptr()``: 0.06 us) and sizes,
and one compiled call updates every tensor of a dtype:

- The work is cut into chunks of at most :data:`CHUNK` elements (a chunk never crosses a
  tensor), and the chunks run on numba's thread pool; the element arithmetic is
  :mod:`adamkit.kernels.numba_cpu`'s, inlined, so the results are bit-identical to
  :func:`adamkit.kernels.numba_cpu.adam_update_` (tested).  Below :data:`PARALLEL_MIN_SIZE`
  elements in all, one thread runs the chunks: waking the pool costs more than it saves.
- :func:`sum_squares` reads the gradients once (float64 accumulation, NaN/inf propagate): the
  stability guard's non-finite check and gradient norm, in one call for all tensors.
- Step counters are the caller's float32 scalars (``torch.optim.Adam``'s 0-d ``step``
  tensors), read and incremented here through their addresses.

Contract (not checked here: the caller validates, then builds the table): every address points
to a live, C-contiguous block of ``sizes[i]`` elements of ``dtype`` (float32 or float64) that
stays alive and unaliased for the call; step addresses point to one float32 each.  Passing
anything else is undefined behaviour, which is why only front ends that check their tensors
first (:mod:`adamkit.torch.functional`) call it.
"""

from __future__ import annotations

import dataclasses
import math
import types as pytypes
from collections.abc import Callable, Sequence

import numpy as np
from numba import carray, prange, types
from numba.extending import intrinsic

from adamkit.core.config import AdamHyperParams
from adamkit.kernels import numba_cpu
from adamkit.kernels.numba_cpu import (
    PARALLEL_MIN_SIZE,
    _jit,
    _max_nan,
    _moments,
    _step_amsgrad_serial,
    _step_serial,
    _unpack,
    coefficients,
)

__all__ = [
    "CHUNK",
    "PARALLEL_MIN_SIZE",
    "adam_update_arrays_",
    "adam_update_table_",
    "advance_steps",
    "any_overlap",
    "read_steps",
    "rms_lr_factors",
    "squares_parts",
    "sum_squares",
]

#: Elements per unit of parallel work: 64 KiB..512 KiB of traffic per chunk (float32), small
#: enough to balance two threads on uneven layouts, large enough that the per-chunk set-up
#: (a few address loads) is invisible.
CHUNK = 1 << 14

#: A read-only sum is about 5x cheaper per element than a step, so it pays for waking the
#: thread pool only on larger inputs (serial: about 15 us per 100k float32 elements).
SUM_PARALLEL_MIN_SIZE = 1 << 20

# Columns of the address table.
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ = range(5)


@intrinsic
def _pointer(typingctx, address, witness):
    """``address`` (int64) as a pointer to ``witness``'s dtype (``witness`` is only typed)."""
    if not isinstance(address, types.Integer) or not isinstance(witness, types.Array):
        return None
    pointer = types.CPointer(witness.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, witness), codegen


@_jit(inline="always")
def _view(address, size, witness):
    return carray(_pointer(address, witness), (size,))


@_jit()
def _chunks(sizes):
    # (tensor, start, stop) for every chunk, tensors in order.
    count = 0
    for n in sizes:
        count += (n + CHUNK - 1) // CHUNK
    out = np.empty((count, 3), dtype=np.int64)
    k = 0
    for i in range(sizes.size):
        n = sizes[i]
        for start in range(0, n, CHUNK):
            out[k, 0] = i
            out[k, 1] = start
            out[k, 2] = min(start + CHUNK, n)
            k += 1
    return out


@_jit()
def _update_chunk(table, sizes, rows, coefs, chunk, amsgrad, witness):
    # A function of its own, not inlined: the serial loop it calls vectorises as in
    # numba_cpu, which the same loop written inside a prange body does not (measured 3.7x).
    i, start, stop = chunk[0], chunk[1], chunk[2]
    n = sizes[i]
    p = _view(table[i, PARAM], n, witness)[start:stop]
    g = _view(table[i, GRAD], n, witness)[start:stop]
    m = _view(table[i, EXP_AVG], n, witness)[start:stop]
    v = _view(table[i, EXP_AVG_SQ], n, witness)[start:stop]
    c = coefs[rows[i]]
    if amsgrad:
        w = _view(table[i, MAX_EXP_AVG_SQ], n, witness)[start:stop]
        _step_amsgrad_serial(p, g, m, v, w, c)
    else:
        _step_serial(p, g, m, v, c)


@_jit(fastmath={"reassoc"})
def _change_squares(new, old):
    # (sum (new - old)^2, sum old^2) in float64; reassociation only here, where it lets the
    # sums vectorise, never in the step itself.
    d2 = 0.0
    p2 = 0.0
    for j in range(new.size):
        a = np.float64(old[j])
        d = np.float64(new[j]) - a
        d2 += d * d
        p2 += a * a
    return d2, p2


@_jit()
def _update_chunk_measured(table, sizes, rows, coefs, chunk, amsgrad, witness):
    # The chunk's step, and how far it moved the parameters: the old values are kept in a
    # chunk-sized copy (at most CHUNK elements, cache-resident) instead of a copy of the model.
    i, start, stop = chunk[0], chunk[1], chunk[2]
    old = _view(table[i, PARAM], sizes[i], witness)[start:stop].copy()
    _update_chunk(table, sizes, rows, coefs, chunk, amsgrad, witness)
    return _change_squares(_view(table[i, PARAM], sizes[i], witness)[start:stop], old)


@_jit()
def _overlapping(table, sizes, itemsize, amsgrad):
    # True when a row's written blocks (param, moments) overlap any other block of the table,
    # or its read-only gradient overlaps a written one: rows that share memory (a parameter
    # listed twice, tensors that are views of one storage) must then run in table order, as
    # the per-array path would, not on several threads at once.
    columns = 5 if amsgrad else 4  # without AMSGrad the last column repeats exp_avg_sq
    n = table.shape[0]
    starts = np.empty(n * columns, dtype=np.int64)
    ends = np.empty(n * columns, dtype=np.int64)
    written = np.empty(n * columns, dtype=np.bool_)
    k = 0
    for i in range(n):
        nbytes = sizes[i] * itemsize
        if nbytes == 0:
            continue
        for c in range(columns):
            starts[k] = table[i, c]
            ends[k] = table[i, c] + nbytes
            written[k] = c != GRAD
            k += 1
    return any_overlap(starts, ends, written, k)


@_jit()
def any_overlap(starts, ends, written, count):
    """Whether, among the first ``count`` byte ranges ``[starts[j], ends[j])``, one marked
    ``written`` overlaps any other, or a read-only one overlaps a written one (one sort and one
    sweep).  Shared by the table kernels of :mod:`adamkit.kernels.numba_formats`."""
    order = np.argsort(starts[:count])
    end_written = np.iinfo(np.int64).min
    end_any = np.iinfo(np.int64).min
    for j in order:
        start = starts[j]
        if start < end_written or (written[j] and start < end_any):
            return True
        end_any = max(end_any, ends[j])
        if written[j]:
            end_written = max(end_written, ends[j])
    return False


def _twins(fn):
    """``(serial, parallel)`` compilations of ``fn``, whose loop is a ``prange`` (a plain
    ``range`` in the serial one).  The parallel one compiles a renamed copy, so that the two
    keep separate entries in numba's on-disk cache."""
    twin = pytypes.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + "_parallel", fn.__defaults__, fn.__closure__
    )
    twin.__qualname__ = fn.__qualname__ + "_parallel"
    return _jit()(fn), _jit(parallel=True)(twin)


def _update_all(table, sizes, rows, coefs, chunks, amsgrad, witness):
    for c in prange(chunks.shape[0]):
        _update_chunk(table, sizes, rows, coefs, chunks[c], amsgrad, witness)


_update_serial, _update_parallel = _twins(_update_all)


def _update_all_measured(table, sizes, rows, coefs, chunks, amsgrad, witness):
    parts = np.empty((chunks.shape[0], 2), dtype=np.float64)
    for c in prange(chunks.shape[0]):
        d2, p2 = _update_chunk_measured(table, sizes, rows, coefs, chunks[c], amsgrad, witness)
        parts[c, 0] = d2
        parts[c, 1] = p2
    return parts  # added up by the caller, in chunk order (see _squares_all)


_measured_serial, _measured_parallel = _twins(_update_all_measured)


@_jit(fastmath={"reassoc"})
def _sum_of_squares(a):
    # Reassociation lets the sum vectorise (6x); NaN and inf still propagate (no "nnan"/"ninf").
    # A function of its own: fastmath flags do not reach a loop inlined into a prange body.
    total = 0.0
    for j in range(a.size):
        x = np.float64(a[j])
        total += x * x
    return total


@_jit()
def _chunk_squares(addresses, sizes, chunk, witness):
    i = chunk[0]
    return _sum_of_squares(_view(addresses[i], sizes[i], witness)[chunk[1] : chunk[2]])


def _squares_all(addresses, sizes, chunks, witness):
    # Per-chunk sums, added up by the caller outside the parallel region: a sum inside it
    # would be a parallel reduction, whose order depends on the number of threads.
    parts = np.empty(chunks.shape[0], dtype=np.float64)
    for c in prange(chunks.shape[0]):
        parts[c] = _chunk_squares(addresses, sizes, chunks[c], witness)
    return parts


_squares_serial, _squares_parallel = _twins(_squares_all)


@_jit()
def _rms_sum(p, g, v, w, c, bc2, eps2, amsgrad):
    # sum(g^2 / max(v_hat, eps^2)) over one chunk, g and v exactly as the step forms them
    # (_moments), v_hat = max(v_max, v) / bc2 in float64, 0/0 elements counted as 0: the
    # StableAdamW sum of adamkit.guard.update.rms_ratio.
    k = _unpack(c)
    gsign, wd, coupled = k[0], k[1], k[2]
    total = 0.0
    for j in range(p.size):
        gj = g[j] * gsign
        if coupled:
            gj = gj + wd * p[j]
        _, _, vj = _moments(p[j], g[j], v[j], v[j], k)
        second = _max_nan(w[j], vj) if amsgrad else vj
        g2 = np.float64(gj) * np.float64(gj)
        if g2 != 0.0:
            total += g2 / max(np.float64(second) / bc2, eps2)
    return total


@_jit()
def _rms_chunk(table, sizes, rows, coefs, bc2s, eps2, chunk, amsgrad, witness):
    i, start, stop = chunk[0], chunk[1], chunk[2]
    n = sizes[i]
    p = _view(table[i, PARAM], n, witness)[start:stop]
    g = _view(table[i, GRAD], n, witness)[start:stop]
    v = _view(table[i, EXP_AVG_SQ], n, witness)[start:stop]
    w = _view(table[i, MAX_EXP_AVG_SQ], n, witness)[start:stop]
    return _rms_sum(p, g, v, w, coefs[rows[i]], bc2s[rows[i]], eps2, amsgrad)


def _rms_all(table, sizes, rows, coefs, bc2s, eps2, chunks, amsgrad, witness):
    parts = np.empty(chunks.shape[0], dtype=np.float64)
    for c in prange(chunks.shape[0]):
        parts[c] = _rms_chunk(table, sizes, rows, coefs, bc2s, eps2, chunks[c], amsgrad, witness)
    return parts


_rms_serial, _rms_parallel = _twins(_rms_all)


_F32_STEP = np.empty(0, dtype=np.float32)


@_jit()
def _read_steps(addresses, witness):
    out = np.empty(addresses.size, dtype=np.float64)
    for i in range(addresses.size):
        out[i] = _view(addresses[i], 1, witness)[0]
    return out


@_jit()
def _increment_steps(addresses, witness):
    for i in range(addresses.size):
        s = _view(addresses[i], 1, witness)
        s[0] = s[0] + np.float32(1.0)


def _witness(dtype: np.dtype) -> np.ndarray:
    return np.empty(0, dtype=dtype)


def read_steps(step_addresses: np.ndarray) -> np.ndarray:
    """The float32 counters at ``step_addresses`` (int64, 1-d) as a float64 array."""
    return _read_steps(step_addresses, _F32_STEP)


def advance_steps(step_addresses: np.ndarray) -> np.ndarray:
    """Add one to each float32 counter at ``step_addresses``; return the new counts (int64)."""
    _increment_steps(step_addresses, _F32_STEP)
    return _read_steps(step_addresses, _F32_STEP).astype(np.int64)


def sum_squares(addresses: np.ndarray, sizes: np.ndarray, dtype: np.dtype) -> float:
    """Sum of squares (float64 accumulation) of every element of every block.

    ``addresses``/``sizes``: int64 1-d arrays, one entry per block of ``dtype`` elements.
    NaN when any element is NaN, ``inf`` when any is infinite.  The result does not depend on
    the number of threads (per-chunk sums, added exactly by ``math.fsum``); within a chunk the
    additions are vectorised, so the last bits may differ between CPUs of other vector widths.
    """
    return math.fsum(squares_parts(addresses, sizes, dtype))


def squares_parts(
    addresses: np.ndarray, sizes: np.ndarray, dtype: np.dtype, parallel: bool | None = None
) -> np.ndarray:
    """The float64 sums of squares of the chunks :func:`sum_squares` adds up, tensors in order.

    A tensor's chunks, and so its parts, depend only on its own size and contents, never on
    the other blocks of the call or the thread count: ``math.fsum`` over the parts of several
    calls equals :func:`sum_squares` of one call over all their blocks, bit for bit.
    ``parallel``: run the chunks on numba's thread pool (``None``: from
    :data:`SUM_PARALLEL_MIN_SIZE` elements on); the parts are the same either way.
    """
    chunks = _chunks(sizes)
    if not len(chunks):
        return np.zeros(0, dtype=np.float64)
    witness = _witness(np.dtype(dtype))
    if parallel is None:
        parallel = int(sizes.sum()) >= SUM_PARALLEL_MIN_SIZE
    kernel = _squares_parallel if parallel else _squares_serial
    return kernel(addresses, sizes, chunks, witness)


def adam_update_table_(
    table: np.ndarray,
    sizes: np.ndarray,
    steps: np.ndarray,
    dtype: np.dtype,
    hp: AdamHyperParams,
    lr_factors: np.ndarray | None = None,
    measure: bool = False,
) -> tuple[float, float] | None:
    """One Adam step of every tensor in ``table``.

    ``table``: int64 ``(n, 5)`` addresses of param, grad, exp_avg, exp_avg_sq and max_exp_avg_sq
    (the last column is ignored unless ``hp.amsgrad``); ``sizes``: int64 ``(n,)`` elements per
    tensor; ``steps``: int64 ``(n,)``, the 1-based number of the update each tensor receives
    (the caller advances its counters first, e.g. with :func:`advance_steps`).  ``dtype``:
    float32 or float64, of every tensor.  ``lr_factors``: a float per tensor multiplying
    ``hp.lr`` for this step (update clipping).  ``measure``: return ``(sum of squared
    parameter changes, sum of squared old parameter values)`` (float64) over all tensors, for
    the guard's update-norm diagnostic, at the cost of a cache-resident copy per chunk rather
    than a copy of the parameters; else ``None``.  Same results as
    :func:`adamkit.kernels.numba_cpu.adam_update_`; see the module docstring for what must hold.
    """
    if not len(sizes):
        return (0.0, 0.0) if measure else None
    dtype = np.dtype(dtype)
    if lr_factors is None:
        rows, coefs, _ = _coefficient_rows(steps, hp, dtype)
    else:
        # One row per tensor: each has its own learning rate.
        rows = np.arange(len(steps), dtype=np.int64)
        coefs = np.stack(
            [
                coefficients(dataclasses.replace(hp, lr=hp.lr * float(f)), int(t), dtype)
                for t, f in zip(steps, lr_factors, strict=True)
            ]
        )
    chunks = _chunks(sizes)
    witness = _witness(dtype)
    parallel = int(sizes.sum()) >= PARALLEL_MIN_SIZE and not _overlapping(
        table, sizes, dtype.itemsize, hp.amsgrad
    )
    if measure:
        kernel = _measured_parallel if parallel else _measured_serial
        parts = kernel(table, sizes, rows, coefs, chunks, hp.amsgrad, witness)
        return math.fsum(parts[:, 0]), math.fsum(parts[:, 1])
    kernel = _update_parallel if parallel else _update_serial
    kernel(table, sizes, rows, coefs, chunks, hp.amsgrad, witness)
    return None


def _coefficient_rows(
    steps: np.ndarray, hp: AdamHyperParams, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # (row of each tensor, coefficient rows, the step count of each row): one row per distinct
    # step count.
    first = steps[0]
    if (steps == first).all():  # the usual case: one count for the whole group
        coefs = coefficients(hp, int(first), dtype)[None, :]
        return np.zeros(len(steps), dtype=np.int64), coefs, np.array([first])
    unique, rows = np.unique(steps, return_inverse=True)
    coefs = np.stack([coefficients(hp, int(t), dtype) for t in unique])
    return rows.astype(np.int64, copy=False), coefs, unique


def rms_lr_factors(
    table: np.ndarray,
    sizes: np.ndarray,
    steps: np.ndarray,
    dtype: np.dtype,
    hp: AdamHyperParams,
    threshold: float,
) -> np.ndarray:
    """StableAdamW's learning-rate factor of each tensor for the coming step (float64, in [0, 1]).

    ``1 / max(1, RMS / threshold)`` with ``RMS = sqrt(mean(g^2 / max(v_hat, eps^2)))`` over the
    tensor, ``g`` the gradient that enters the second moment (sign of ``maximize`` and coupled
    decay applied) and ``v_hat`` the bias-corrected second moment after this step (the running
    max with AMSGrad), exactly as :func:`adamkit.guard.update.stable_adamw_scale`.  Reads the
    tensors of ``table`` (as :func:`adam_update_table_`, before it runs), writes nothing.  An
    empty tensor gets 1.0.
    """
    n = len(sizes)
    if not n:
        return np.ones(0)
    dtype = np.dtype(dtype)
    rows, coefs, counts = _coefficient_rows(steps, hp, dtype)
    # As adamkit.guard.reference: 1 - beta2**t in double precision.
    bc2s = np.array([1.0 - hp.beta2 ** int(t) if hp.bias_correction else 1.0 for t in counts])
    chunks = _chunks(sizes)
    witness = _witness(dtype)
    kernel = _rms_parallel if int(sizes.sum()) >= PARALLEL_MIN_SIZE else _rms_serial
    parts = kernel(table, sizes, rows, coefs, bc2s, float(hp.eps) ** 2, chunks, hp.amsgrad, witness)
    sums = np.zeros(n)
    np.add.at(sums, chunks[:, 0], parts)
    with np.errstate(divide="ignore", invalid="ignore"):
        rms = np.sqrt(sums / np.maximum(sizes, 1)) / float(threshold)
        factors = np.where(rms > 1.0, 1.0 / rms, 1.0)
    return np.where(np.isnan(rms), 1.0, factors)


def adam_update_arrays_(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
    max_exp_avg_sqs: Sequence[np.ndarray | None],
    steps: Sequence[int],
    hp: AdamHyperParams,
    *,
    fallback: Callable[..., None] | None = None,
) -> None:
    """:func:`adamkit.kernels.numba_cpu.adam_update_` (same contract, same results) with one
    kernel call per dtype for the large arrays instead of one per array: a single parallel
    region per step rather than one per large tensor, each of which costs a thread wake-up.
    Arrays below :data:`PARALLEL_MIN_SIZE` elements keep numba_cpu's serial call, which costs
    less than reading a NumPy array's address (``ndarray.ctypes.data``, about a microsecond)."""
    amsgrad = hp.amsgrad
    rows = numba_cpu.check_rows(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad
    )
    large = sum(1 for p in params if getattr(p, "size", 0) >= PARALLEL_MIN_SIZE)
    if large < 2:
        numba_cpu.adam_update_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp, fallback=fallback
        )
        return
    found: dict[np.dtype, tuple[list[tuple[int, ...]], list[int], list[int]]] = {}
    others = []
    small = []
    for index, row in enumerate(rows):
        flat = numba_cpu._flat_views(*row[:5])
        if flat is None:
            if fallback is None:
                raise numba_cpu.not_qualifying(index, row)
            others.append(row)
            continue
        if flat[0].size < PARALLEL_MIN_SIZE:
            small.append(row)
            continue
        entry = found.setdefault(flat[0].dtype, ([], [], []))
        last = flat[4] if amsgrad else flat[3]
        entry[0].append((*(a.ctypes.data for a in flat[:4]), last.ctypes.data))
        entry[1].append(flat[0].size)
        entry[2].append(row[5])
    for row in others:
        fallback(*row, hp)  # type: ignore[misc]
    if small:
        numba_cpu.adam_update_(*(list(column) for column in zip(*small, strict=True)), hp)
    for dtype, (addresses, sizes, counts) in found.items():
        adam_update_table_(
            np.array(addresses, dtype=np.int64),
            np.array(sizes, dtype=np.int64),
            np.array(counts, dtype=np.int64),
            dtype,
            hp,
        )
