"""The address-table kernel (``adamkit.kernels.numba_tables``) against the per-array kernel.

The table kernel runs :mod:`adamkit.kernels.numba_cpu`'s element code on raw addresses, so every
result must be bit-identical to ``numba_cpu.adam_update_`` on the same arrays (which is itself
tested against the reference in test_numba_kernel.py), whatever the chunking, the thread count
or the mix of step counts.  ``sum_squares`` is compared with NumPy's float64 sum (rel 1e-12:
only the order of additions differs) and must propagate NaN/inf.
"""

from __future__ import annotations

import numpy as np
import pytest

from adamkit.testing import cases_for, seeded_rng

numba = pytest.importorskip("numba", reason="the table kernel needs numba (adamkit[fast])")

from adamkit.kernels import _reference_one_ as _reference_one  # noqa: E402
from adamkit.kernels import numba_cpu, numba_tables  # noqa: E402

CASES = cases_for("numba")
# Tiny, empty, one chunk exactly, across chunk boundaries, and multi-dimensional.
SHAPES = [(1,), (0,), (37,), (numba_tables.CHUNK,), (numba_tables.CHUNK * 2 + 3,), (9, 5, 2)]


def _arrays(rng, dtype, amsgrad, shapes=SHAPES):
    out = []
    for shape in shapes:
        p = rng.standard_normal(shape).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        m = (0.1 * rng.standard_normal(shape)).astype(dtype)
        v = (0.1 * rng.random(shape)).astype(dtype)
        w = (v + 0.05 * rng.random(shape)).astype(dtype) if amsgrad else None
        out.append([p, g, m, v, w])
    return out


def _copy(rows):
    return [[None if a is None else a.copy(order="K") for a in row] for row in rows]


def _table(rows):
    table = np.array(
        [
            [a.ctypes.data for a in row[:4]]
            + [(row[4] if row[4] is not None else row[3]).ctypes.data]
            for row in rows
        ],
        dtype=np.int64,
    )
    sizes = np.array([row[0].size for row in rows], dtype=np.int64)
    return table, sizes


def _steps(values):
    counts = np.array(values, dtype=np.float32)
    return counts, counts.ctypes.data + counts.itemsize * np.arange(len(values), dtype=np.int64)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_table_step_is_bit_identical_to_the_array_kernel(case, dtype):
    rng = seeded_rng("tables", case.id, dtype)
    hp = case.hyperparams()
    rows = _arrays(rng, dtype, hp.amsgrad)
    expected = _copy(rows)
    # Different counts per tensor: each must get its own bias correction.
    counts = [int(c) for c in rng.integers(0, 50, len(rows))]
    held, addresses = _steps(counts)
    table, sizes = _table(rows)
    for step in range(3):
        advanced = numba_tables.advance_steps(addresses)
        assert advanced.tolist() == [c + step + 1 for c in counts]
        numba_tables.adam_update_table_(table, sizes, advanced, np.dtype(dtype), hp)
        numba_cpu.adam_update_(
            *(list(column) for column in zip(*expected, strict=True)),
            [c + step + 1 for c in counts],
            hp,
        )
    assert held.tolist() == [c + 3 for c in counts]
    for actual_row, expected_row in zip(rows, expected, strict=True):
        for a, b in zip(actual_row, expected_row, strict=True):
            if b is None:
                continue
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_table_step_does_not_depend_on_threads_or_path(monkeypatch, threads):
    # Serial and parallel paths, and any thread count, give the same bits.
    rng = seeded_rng("tables-threads", threads)
    case = CASES[0]
    hp = case.hyperparams()
    rows = _arrays(rng, np.float32, hp.amsgrad)
    serial = _copy(rows)
    table, sizes = _table(rows)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        numba_tables.adam_update_table_(table, sizes, np.full(len(rows), 4), np.float32, hp)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    monkeypatch.setattr(numba_tables, "PARALLEL_MIN_SIZE", 1 << 62)
    table, sizes = _table(serial)
    numba_tables.adam_update_table_(table, sizes, np.full(len(rows), 4), np.float32, hp)
    for a_row, b_row in zip(rows, serial, strict=True):
        for a, b in zip(a_row, b_row, strict=True):
            if b is not None:
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_squares_matches_numpy(dtype):
    rng = seeded_rng("tables-squares", dtype)
    blocks = [(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 4)).astype(dtype) for s in SHAPES]
    addresses = np.array([b.ctypes.data for b in blocks], dtype=np.int64)
    sizes = np.array([b.size for b in blocks], dtype=np.int64)
    expected = sum(float(np.sum(b.astype(np.float64) ** 2)) for b in blocks)
    assert numba_tables.sum_squares(addresses, sizes, np.dtype(dtype)) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "both"])
@pytest.mark.parametrize("where", [0, 5, -1])
def test_sum_squares_propagates_non_finite_values(bad, where):
    rng = seeded_rng("tables-bad", bad, where)
    blocks = [rng.standard_normal(s).astype(np.float32) for s in SHAPES if s != (0,)]
    flat = blocks[-1].reshape(-1)
    if bad == "both":
        flat[where] = np.inf
        blocks[0].reshape(-1)[0] = np.nan
    else:
        flat[where] = bad
    addresses = np.array([b.ctypes.data for b in blocks], dtype=np.int64)
    sizes = np.array([b.size for b in blocks], dtype=np.int64)
    total = numba_tables.sum_squares(addresses, sizes, np.dtype(np.float32))
    if bad in ("both",) or (isinstance(bad, float) and np.isnan(bad)):
        assert np.isnan(total)
    else:
        assert total == np.inf


def test_sum_squares_of_nothing_is_zero():
    empty = np.zeros(0, dtype=np.int64)
    assert numba_tables.sum_squares(empty, empty, np.dtype(np.float32)) == 0.0
    block = np.zeros(0, dtype=np.float64)
    one = np.array([block.ctypes.data], dtype=np.int64)
    assert numba_tables.sum_squares(one, np.zeros(1, np.int64), np.dtype(np.float64)) == 0.0


def test_read_steps():
    _held, addresses = _steps([0, 3, 16777216])  # _held keeps the counts alive
    np.testing.assert_array_equal(numba_tables.read_steps(addresses), [0.0, 3.0, 16777216.0])


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c.id)
def test_arrays_entry_point_matches_the_per_array_kernel(case, monkeypatch):
    # adam_update_arrays_ (what adam_update_(impl="numba") runs): tables for the arrays that
    # qualify, the fallback for the rest (a non-contiguous one here), same bits as numba_cpu.
    rng = seeded_rng("tables-arrays", case.id)
    hp = case.hyperparams()
    # Two arrays above the threading threshold: those go through one table call.
    rows = _arrays(rng, np.float32, hp.amsgrad, [*SHAPES, (40_000,)])
    rows.append(
        [
            a if a is None else np.asfortranarray(a.reshape(6, 4))
            for a in _arrays(rng, np.float32, hp.amsgrad, [(24,)])[0]
        ]
    )
    expected = _copy(rows)
    fell_back = []

    def fallback(*args):
        fell_back.append(args[0].shape)
        numba_cpu.adam_update_(*([a] for a in args[:6]), args[6], fallback=_reference_one)

    tabled = []
    original = numba_tables.adam_update_table_

    def counting(table, *args):
        tabled.append(len(table))
        original(table, *args)

    steps = [int(s) for s in rng.integers(1, 9, len(rows))]
    monkeypatch.setattr(numba_tables, "adam_update_table_", counting)
    numba_tables.adam_update_arrays_(
        *(list(c) for c in zip(*rows, strict=True)), steps, hp, fallback=fallback
    )
    numba_cpu.adam_update_(
        *(list(c) for c in zip(*expected, strict=True)), steps, hp, fallback=_reference_one
    )
    assert fell_back == [(6, 4)]
    assert tabled == [2]
    for a_row, b_row in zip(rows, expected, strict=True):
        for a, b in zip(a_row, b_row, strict=True):
            if b is not None:
                np.testing.assert_array_equal(a, b)


def test_arrays_entry_point_refuses_before_changing_anything():
    rng = seeded_rng("tables-refuse")
    hp = CASES[0].hyperparams()
    rows = _arrays(rng, np.float32, hp.amsgrad, [(5,), (7,), (3,)])
    rows[2][2] = rows[2][2].astype(np.float64)  # a moment of another dtype
    before = _copy(rows)
    with pytest.raises(TypeError, match="parameter 2 does not qualify"):
        numba_tables.adam_update_arrays_(*(list(c) for c in zip(*rows, strict=True)), [1, 1, 1], hp)
    for a_row, b_row in zip(rows, before, strict=True):
        for a, b in zip(a_row, b_row, strict=True):
            if b is not None:
                np.testing.assert_array_equal(a, b)


def test_sum_squares_does_not_depend_on_the_thread_count():
    rng = seeded_rng("tables-sum-threads")
    blocks = [rng.standard_normal(s).astype(np.float32) for s in [(1_000_000,), (70_001,)]]
    addresses = np.array([b.ctypes.data for b in blocks], dtype=np.int64)
    sizes = np.array([b.size for b in blocks], dtype=np.int64)
    totals = []
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            totals.append(numba_tables.sum_squares(addresses, sizes, np.dtype(np.float32)))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert totals[0] == totals[1]


def test_overlapping_rows_are_detected():
    a = np.zeros(100, dtype=np.float32)
    b = np.zeros(100, dtype=np.float32)
    base = [x.ctypes.data for x in (a, b)]
    sizes = np.array([50, 50], dtype=np.int64)

    def table(*rows):
        return np.array(rows, dtype=np.int64)

    g = np.zeros(100, dtype=np.float32).ctypes.data
    m = np.zeros(400, dtype=np.float32).ctypes.data
    apart = table([base[0], g, m, m + 400, 0], [base[1], g + 200, m + 800, m + 1200, 0])
    assert not numba_tables._overlapping(apart, sizes, 4, False)
    twice = table([base[0], g, m, m + 400, 0], [base[0], g + 200, m + 800, m + 1200, 0])
    assert numba_tables._overlapping(twice, sizes, 4, False)
    halfway = table([base[0], g, m, m + 400, 0], [base[0] + 100, g + 200, m + 800, m + 1200, 0])
    assert numba_tables._overlapping(halfway, sizes, 4, False)
    read_twice = table([base[0], g, m, m + 400, 0], [base[1], g, m + 800, m + 1200, 0])
    assert not numba_tables._overlapping(read_twice, sizes, 4, False)  # grads are only read
    read_written = table([base[0], g, m, m + 400, 0], [base[1], base[0], m + 800, m + 1200, 0])
    assert numba_tables._overlapping(read_written, sizes, 4, False)
