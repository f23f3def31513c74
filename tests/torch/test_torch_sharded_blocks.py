"""Block-quantized state on shards that are no whole number of blocks, without processes
(``adamkit.torch.sharded_blocks``).

- :func:`block_split` and :func:`straddling_blocks` against a brute-force count of each block's
  elements, for blocks of 32 and 256 and random ranges and partitions.
- The span step (:func:`update_spans_`) against one process: a tensor cut into 2 or 3 shards at
  rows that are no block boundary, each "rank" a thread whose ``reduce`` meets the others at a
  barrier (what ``all_reduce(MAX)`` does), several steps from zero state.  The parameters, codes
  and whole-tensor scales must equal the one-process step's bit for bit: whole blocks run the same
  kernel on the same bytes, and the partial blocks' dense step shares the 8-bit step's float32
  arithmetic (the fused kernels' FMA moments and update; the plain path's reference step).
  Measured: equal for every case here.  The stated fallback, should a kernel ever differ, would
  be the kernel-vs-plain tolerance of ``tests/kernels/test_kernels_formats.py``.
- :func:`span_store` / :func:`span_load` against the format's ``store``/``load`` of the whole
  tensor, and the non-finite rule (a straddling block with non-finite moments stays unchanged on
  every rank, which raises after the reduce).
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from adamkit.core.config import AdamHyperParams
from adamkit.formats import get_format
from adamkit.kernels import numba_available
from adamkit.kernels.stored import adam_update_stored_
from adamkit.torch.sharded_blocks import (
    SpanRow,
    SpanStorage,
    block_split,
    partial_peaks,
    span_load,
    span_store,
    straddling_blocks,
    update_spans_,
)

IMPLS = ["reference"] + (["numba"] if numba_available() else [])
FORMATS = ["int8", "int8-companded"]  # blocks of 256 and of 32


def _brute_split(offset: int, size: int, total: int, block: int) -> tuple[int, int, int, int]:
    # (j0, j1, head, tail) by counting each block's elements of the range.
    if size == 0:
        return 0, 0, 0, 0
    blocks: dict[int, int] = {}
    for i in range(offset, offset + size):
        blocks[i // block] = blocks.get(i // block, 0) + 1
    j0, j1 = min(blocks), max(blocks) + 1

    def partial(j: int) -> bool:
        return blocks[j] < min((j + 1) * block, total) - j * block

    head = blocks[j0] if partial(j0) else 0
    tail = blocks[j1 - 1] if j1 - 1 > j0 and partial(j1 - 1) else 0
    return j0, j1, head, tail


@pytest.mark.parametrize("block", [32, 256])
def test_block_split_matches_brute_force(block):
    rng = np.random.default_rng()
    cases = [(0, 0, 10), (0, 10, 10), (0, block, block), (5, block, 3 * block)]
    cases += [(block, block, 2 * block + 7), (block - 1, 2, 4 * block), (3, 4, 9)]
    cases += [(2 * block, 7, 2 * block + 7), (0, 2 * block + 7, 2 * block + 7)]
    for _ in range(300):
        total = int(rng.integers(1, 6 * block))
        offset = int(rng.integers(0, total + 1))
        cases.append((offset, int(rng.integers(0, total - offset + 1)), total))
    for offset, size, total in cases:
        split = block_split(offset, size, total, block)
        j0, j1, head, tail = _brute_split(offset, size, total, block)
        assert (split.j0, split.j1, split.head, split.tail) == (j0, j1, head, tail), (
            offset,
            size,
            total,
        )
        if size:
            assert split.start == offset - j0 * block
            # Whole blocks: the rest, a whole number of blocks (or reaching the end).
            lo, hi = split.head, size - split.tail
            assert split.last - split.first == -(-max(hi - lo, 0) // block)
            assert hi - lo == 0 or (offset + lo) % block == 0
            assert [s for *_, s in split.parts] == [0] * bool(head) + [j1 - j0 - 1] * bool(tail)


def test_block_split_refuses_ranges_outside():
    with pytest.raises(ValueError, match="does not fit"):
        block_split(5, 10, 12, 32)
    with pytest.raises(ValueError, match="does not fit"):
        block_split(-1, 1, 12, 32)


@pytest.mark.parametrize("block", [32, 256])
def test_straddling_blocks_matches_brute_force(block):
    rng = np.random.default_rng()
    for _ in range(100):
        total = int(rng.integers(1, 8 * block))
        cuts = sorted(int(c) for c in rng.integers(0, total + 1, size=int(rng.integers(1, 5))))
        bounds = [0, *cuts, total]
        ranges = [(a, b - a) for a, b in itertools.pairwise(bounds)]
        owners: dict[int, set[int]] = {}
        for rank, (offset, size) in enumerate(ranges):
            for i in range(offset, offset + size):
                owners.setdefault(i // block, set()).add(rank)
        want = sorted(j for j, ranks in owners.items() if len(ranks) > 1)
        assert straddling_blocks(ranges, total, block) == want, ranges


# -- the step against one process ------------------------------------------------------------


class _ThreadMax:
    """``reduce`` for threads standing in for ranks: elementwise maximum of every rank's
    buffer, like ``all_reduce(MAX)``."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=10)
        self.buffers: dict[int, np.ndarray] = {}
        self.calls = 0

    def for_rank(self, rank: int):
        def reduce(key, buffer):
            self.buffers[rank] = buffer.copy()
            self.barrier.wait()
            top = np.max(np.stack(list(self.buffers.values())), axis=0)
            self.barrier.wait()
            buffer[:] = top
            if rank == 0:
                self.calls += 1

        return reduce


def _run_ranks(world: int, body) -> list[BaseException | None]:
    errors: list[BaseException | None] = [None] * world

    def target(rank: int) -> None:
        try:
            body(rank)
        except BaseException as error:
            errors[rank] = error

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


class _Sharded:
    """One process's int8 state cut into shards ``ranges`` in the span layout."""

    def __init__(self, fmt, param, storages, ranges):
        self.fmt = fmt
        self.ranges = ranges
        flat = param.reshape(-1)
        self.params = [flat[o : o + n].copy() for o, n in ranges]
        self.splits = [block_split(o, n, flat.size, fmt.block) for o, n in ranges]
        self.codes = [[st.arrays["codes"][o : o + n].copy() for st in storages] for o, n in ranges]
        self.scales = [
            [st.arrays["scales"][s.j0 : s.j1].copy() for st in storages] for s in self.splits
        ]
        self.straddling = straddling_blocks(ranges, flat.size, fmt.block)

    def row(self, rank, grad, step):
        o, n = self.ranges[rank]
        return SpanRow(
            self.fmt,
            self.params[rank],
            np.ascontiguousarray(grad.reshape(-1)[o : o + n]),
            self.codes[rank],
            self.scales[rank],
            step,
            self.splits[rank],
            self.straddling,
            "mesh",
        )

    def assert_equals(self, param, storages, what, before=None):
        """Bit for bit; with ``before`` (the parameter before the step) within the
        kernel-vs-plain tolerances of tests/kernels/test_kernels_formats.py instead."""
        flat = param.reshape(-1)
        for rank, (o, n) in enumerate(self.ranges):
            split = self.splits[rank]
            got_p, want_p = self.params[rank], flat[o : o + n]
            if before is None:
                np.testing.assert_array_equal(got_p, want_p, f"{what} param")
            else:
                update = np.abs(flat - before.reshape(-1)).max()
                bound = 4 * np.spacing(np.abs(want_p)) + 1e-5 * update
                assert (np.abs(got_p - want_p) <= bound).all(), f"{what} param"
            for k, st in enumerate(storages):
                got_c, want_c = self.codes[rank][k], st.arrays["codes"][o : o + n]
                got_s = self.scales[rank][k]
                want_s = st.arrays["scales"][split.j0 : split.j1]
                if before is None:
                    np.testing.assert_array_equal(got_c, want_c, f"{what} codes {k}")
                    np.testing.assert_array_equal(got_s, want_s, f"{what} scales {k}")
                    continue
                off = np.abs(got_c.astype(np.int16) - want_c.astype(np.int16))
                assert off.max(initial=0) <= 1 and off.mean() <= 0.01, f"{what} codes {k}"
                top = np.abs(st.arrays["scales"]).max()
                assert np.abs(got_s - want_s).max(initial=0) <= 1e-6 * top, f"{what} scales {k}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("rows", [(35,), (23, 47), (1, 2)])
def test_span_step_equals_one_process(impl, name, amsgrad, rows):
    # 70 x 70: 4900 elements, quantized; cuts at rows 35, 23/47 or 1/2 are no block boundary of
    # 32 or 256 (70 * 35 = 2450), and rows of 70 put three shards inside one block of 256.
    fmt = get_format(name)
    rng = np.random.default_rng()
    shape = (70, 70)
    param = rng.standard_normal(shape).astype(np.float32)
    roles = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 3 if amsgrad else 2]
    storages = [fmt.zeros(shape, role=role) for role in roles]
    bounds = [0, *(r * shape[1] for r in rows), param.size]
    ranges = [(a, b - a) for a, b in itertools.pairwise(bounds)]
    hp = AdamHyperParams(
        lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=amsgrad, eps=1e-8
    )
    world = len(ranges)
    # The fused companded kernel decodes by a table and encodes with one division (the codec:
    # two), so it follows the plain path within tolerances; the blockwise kernel and the plain
    # path agree with their dense twins bit for bit.
    exact = impl == "reference" or name == "int8"
    for step in range(1, 5):
        # Each step from one process's state (so tolerances do not compound).
        sharded = _Sharded(fmt, param, storages, ranges)
        assert sharded.straddling, "the cuts must straddle blocks"
        before = param.copy()
        grad = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
        w = storages[2] if amsgrad else None
        adam_update_stored_(
            fmt, [param], [grad], [storages[0]], [storages[1]], [w], [step], hp, impl=impl
        )
        reduce = _ThreadMax(world)
        errors = _run_ranks(
            world,
            lambda rank, sh=sharded, grad=grad, step=step, reduce=reduce: update_spans_(
                [sh.row(rank, grad, step)], hp, impl=impl, reduce=reduce.for_rank(rank)
            ),
        )
        assert errors == [None] * world, errors
        assert reduce.calls == 1  # one collective per step
        sharded.assert_equals(param, storages, f"step {step}", None if exact else before)
    assert np.abs(storages[0].arrays["scales"]).min() > 0, "every block moved"


def test_span_step_many_parameters_one_reduce():
    # Two sharded tensors and an aligned one in one call: one reduce, every tensor as one process.
    fmt = get_format("int8")
    rng = np.random.default_rng()
    hp = AdamHyperParams(lr=1e-2)
    shapes = [(70, 70), (45, 100), (64, 128)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    storages = [[fmt.zeros(s, role=r) for r in ("exp_avg", "exp_avg_sq")] for s in shapes]
    sharded = []
    for s, p, st in zip(shapes, params, storages, strict=True):
        half = (s[0] // 2) * s[1]
        sharded.append(_Sharded(fmt, p, st, [(0, half), (half, p.size - half)]))
    assert not sharded[2].straddling
    for step in (1, 2):
        sharded = [
            _Sharded(fmt, p, st, sh.ranges)
            for sh, p, st in zip(sharded, params, storages, strict=True)
        ]
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for p, g, st in zip(params, grads, storages, strict=True):
            adam_update_stored_(fmt, [p], [g], [st[0]], [st[1]], [None], [step], hp)
        reduce = _ThreadMax(2)

        def body(rank, shards=sharded, grads=grads, step=step, reduce=reduce):
            rows = [sh.row(rank, g, step) for sh, g in zip(shards, grads, strict=True)]
            update_spans_(rows, hp, reduce=reduce.for_rank(rank))

        assert _run_ranks(2, body) == [None, None]
        assert reduce.calls == 1
        for sh, p, st in zip(sharded, params, storages, strict=True):
            sh.assert_equals(p, st, f"step {step}")


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("role", ["exp_avg", "exp_avg_sq"])
def test_span_store_and_load_equal_the_whole_tensor(name, role):
    fmt = get_format(name)
    rng = np.random.default_rng()
    values = rng.standard_normal(4900).astype(np.float32)
    if role == "exp_avg_sq":
        values = values**2
    whole = fmt.zeros((4900,), role=role)
    fmt.store(whole, values)
    ranges = [(0, 2450), (2450, 1000), (3450, 1450)]
    splits = [block_split(o, n, 4900, fmt.block) for o, n in ranges]
    # The whole blocks' maxima of the straddling blocks, as the reduce gives them.
    top: dict[int, float] = {}
    for (o, n), split in zip(ranges, splits, strict=True):
        for s, peak in partial_peaks(fmt, role, values[o : o + n], split).items():
            top[split.j0 + s] = max(top.get(split.j0 + s, 0.0), peak)
    for (o, n), split in zip(ranges, splits, strict=True):
        peaks = {s: top[split.j0 + s] for *_, s in split.parts}
        codes, scales = span_store(fmt, role, values[o : o + n], split, peaks)
        np.testing.assert_array_equal(codes, whole.arrays["codes"][o : o + n])
        np.testing.assert_array_equal(scales, whole.arrays["scales"][split.j0 : split.j1])
        storage = SpanStorage(
            fmt.name, fmt.name, role, (n,), {"codes": codes, "scales": scales}, fmt.block, split
        )
        np.testing.assert_array_equal(span_load(fmt, storage), fmt.load(whole)[o : o + n])


def test_span_step_non_finite_block_is_left_unchanged():
    # A gradient whose square overflows float32 in a straddling block: v is inf there, so the
    # block keeps its parameter, codes and scale on both ranks, which both raise after the reduce.
    fmt = get_format("int8-companded")
    rng = np.random.default_rng()
    hp = AdamHyperParams(lr=1e-2)
    param = rng.standard_normal(4900).astype(np.float32)
    storages = [fmt.zeros((4900,), role=r) for r in ("exp_avg", "exp_avg_sq")]
    ranges = [(0, 2450), (2450, 2450)]
    sharded = _Sharded(fmt, param, storages, ranges)
    grad = rng.standard_normal(4900).astype(np.float32)
    grad[2452] = 3e38
    before = [p.copy() for p in sharded.params]
    reduce = _ThreadMax(2)
    errors = _run_ranks(
        2,
        lambda rank: update_spans_(
            [sharded.row(rank, grad, 1)], hp, impl="reference", reduce=reduce.for_rank(rank)
        ),
    )
    assert all(isinstance(e, ValueError) and "non-finite" in str(e) for e in errors), errors
    block = 2450 // fmt.block  # the straddling block
    lo, hi = block * fmt.block, (block + 1) * fmt.block
    np.testing.assert_array_equal(sharded.params[0][lo:], before[0][lo:])
    np.testing.assert_array_equal(sharded.params[1][: hi - 2450], before[1][: hi - 2450])
    assert sharded.scales[0][0][-1] == 0 and sharded.scales[1][0][0] == 0
    # The rest moved (the whole blocks took their step).
    assert not np.array_equal(sharded.params[0][:lo], before[0][:lo])


def test_span_step_refuses_wrong_rows():
    fmt = get_format("int8")
    split = block_split(10, 300, 600, fmt.block)
    row = SpanRow(
        fmt,
        np.zeros(300, np.float32),
        np.zeros(300, np.float32),
        [np.zeros(300, np.uint8)] * 2,
        [np.zeros(2, np.float32)] * 2,
        1,
        split,
        [0, 1],
    )
    with pytest.raises(ValueError, match="3 moments"):
        update_spans_([row], AdamHyperParams(amsgrad=True), reduce=lambda k, b: None)


@pytest.mark.skipif(not numba_available(), reason="needs numba (pip install adamkit[fast])")
def test_span_step_failure_on_one_rank_still_reduces():
    # Rank 1's partial block cannot take the fused step (a float64 gradient for a float32
    # parameter: TypeError with impl="numba").  It must still join the reduce, so rank 0 does not
    # wait forever, and mark the straddling block so that neither rank changes it.
    fmt = get_format("int8")
    rng = np.random.default_rng()
    hp = AdamHyperParams(lr=1e-2)
    param = rng.standard_normal(4900).astype(np.float32)
    storages = [fmt.zeros((4900,), role=r) for r in ("exp_avg", "exp_avg_sq")]
    sharded = _Sharded(fmt, param, storages, [(0, 2450), (2450, 2450)])
    grad = rng.standard_normal(4900).astype(np.float32)
    before = [p.copy() for p in sharded.params]
    reduce = _ThreadMax(2)

    def body(rank):
        row = sharded.row(rank, grad, 1)
        if rank == 1:
            row.grad = row.grad.astype(np.float64)
        update_spans_([row], hp, impl="numba", reduce=reduce.for_rank(rank))

    errors = _run_ranks(2, body)
    assert isinstance(errors[1], TypeError), errors
    assert isinstance(errors[0], ValueError) and "1 partial block" in str(errors[0]), errors
    lo = (2450 // fmt.block) * fmt.block
    np.testing.assert_array_equal(sharded.params[0][lo:], before[0][lo:])
    np.testing.assert_array_equal(sharded.params[1], before[1])  # nothing of rank 1 changed
    assert sharded.scales[0][0][-1] == 0


@pytest.mark.parametrize("role", ["exp_avg", "exp_avg_sq"])
def test_span_store_refuses_what_int8_cannot_hold(role):
    fmt = get_format("int8")
    split = block_split(100, 300, 1000, fmt.block)
    values = np.ones(300, np.float32)
    values[5] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        span_store(fmt, role, values, split, {0: 1.0, 1: 1.0})
    if role == "exp_avg_sq":
        with pytest.raises(ValueError, match=">= 0"):
            span_store(fmt, role, -np.ones(300, np.float32), split, {0: 1.0, 1: 1.0})
