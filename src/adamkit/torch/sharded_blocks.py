r"""Block-quantized state on shards that are no whole number of blocks (FSDP2, issue #10).

A DTensor parameter sharded along dim 0 gives each rank one flat range ``[o, o + n)`` of the
flattened whole tensor.  One process cuts that tensor into blocks ``j`` of ``block`` elements,
``[j * block, (j + 1) * block)``, each with one float32 absmax scale.  A shard keeps the codes of
its own elements and the scales of the *whole-tensor* blocks ``j0 .. j1 - 1`` that overlap it
(the *span* layout): a block that straddles two shards has its scale stored on both ranks, the
same value.  So the codes and scales of every element are exactly one process's, and the state
dict's single-process layout is a slice away (no re-encoding).

The step splits the local range (:func:`block_split`) into a *head* (the part of block ``j0``
when the shard does not cover all of it), whole blocks, and a *tail* (the part of block
``j1 - 1``).  Whole blocks take the usual stored step (:func:`adamkit.kernels.stored
.adam_update_stored_` on flat slices: the fused kernel or the plain path).  Head and tail
elements are decoded with the stored whole-block scale and stepped as dense ``fp32`` moments
through the same dispatcher (the fused dense kernel shares its float32 arithmetic with the 8-bit
kernels: same FMA moments, same update; the plain path is the oracle's), then every rank's
partial absmax of each straddling block is combined by ONE ``all_reduce(MAX)`` for all
parameters of the step (per reduction group: the mesh dimensions that shard), and the parts are
encoded with the whole block's maximum.  Hence a sharded step gives the codes and scales one
process gives: bit for bit where the whole-block path and the dense path agree (the fused
kernels, and the plain path), else within the kernel-vs-plain tolerance of
``tests/kernels/test_kernels_formats.py``.

Non-finite moments (int8 cannot hold them): a straddling block whose new moments are not finite
on some rank is reduced as ``inf`` and left unchanged on every rank (parameter, codes, scale),
like the fused kernel's blocks; :func:`update_spans_` raises ``ValueError`` after the step, once
the collective is done (so no rank waits for another).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from adamkit.core.config import AdamHyperParams
from adamkit.formats import QuantizedFormat, Storage, get_format
from adamkit.formats.base import SIGNED_ROLES
from adamkit.kernels.stored import adam_update_stored_, resolve_stored_impl

__all__ = [
    "BlockSplit",
    "SpanRow",
    "SpanStorage",
    "all_reduce_max",
    "block_split",
    "partial_peaks",
    "shard_ranges",
    "span_load",
    "span_store",
    "straddling_blocks",
    "update_spans_",
]

_ROLES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
Reduce = Callable[[Any, np.ndarray], None]
"""``reduce(key, buffer)``: replace ``buffer`` (float32) in place by its elementwise maximum over
the ranks of the reduction group ``key`` (see :func:`all_reduce_max`)."""


class BlockSplit(NamedTuple):
    """Where the flat range ``[offset, offset + size)`` of a whole tensor sits in its blocks.

    ``j0 .. j1 - 1``: the whole-tensor blocks that overlap it (``j1 - j0`` scales in the span
    layout); ``start``: the position of its first element in block ``j0``; ``head``: how many of
    its first elements lie in block ``j0`` when it does not cover that block entirely, else 0;
    ``tail``: likewise its last elements in block ``j1 - 1`` (0 when that block is ``j0``).
    Elements ``[head, size - tail)`` form whole blocks, with scales ``[first, last)``.
    """

    j0: int
    j1: int
    start: int
    size: int
    head: int
    tail: int

    @property
    def first(self) -> int:
        """Index in the span's scales of the first whole block."""
        return 1 if self.head else 0

    @property
    def last(self) -> int:
        """Index in the span's scales after the last whole block."""
        return (self.j1 - self.j0) - (1 if self.tail else 0)

    @property
    def parts(self) -> list[tuple[int, int, int]]:
        """``(lo, hi, s)`` per partial block: local elements ``[lo, hi)``, span scale ``s``."""
        out = []
        if self.head:
            out.append((0, self.head, 0))
        if self.tail:
            out.append((self.size - self.tail, self.size, self.j1 - self.j0 - 1))
        return out

    @property
    def aligned(self) -> bool:
        """No partial block: the span's blocks are the shard's own."""
        return self.head == 0 and self.tail == 0


_EMPTY = BlockSplit(0, 0, 0, 0, 0, 0)


def block_split(offset: int, size: int, total: int, block: int) -> BlockSplit:
    """The :class:`BlockSplit` of the range ``[offset, offset + size)`` of a flat tensor of
    ``total`` elements in blocks of ``block`` (the last block may be shorter).  ``ValueError``
    unless ``0 <= offset``, ``0 <= size``, ``offset + size <= total`` and ``block >= 1``."""
    if block < 1 or offset < 0 or size < 0 or offset + size > total:
        raise ValueError(
            f"range [{offset}, {offset + size}) does not fit a tensor of {total} elements "
            f"in blocks of {block}"
        )
    if size == 0:
        return _EMPTY
    end = offset + size
    j0, j1 = offset // block, -(-end // block)
    start = offset - j0 * block
    first_end = min((j0 + 1) * block, total)
    head = 0 if start == 0 and end >= first_end else min(size, first_end - offset)
    tail = 0
    if j1 - 1 > j0 and end < min(j1 * block, total):
        tail = end - (j1 - 1) * block
    return BlockSplit(j0, j1, start, size, head, tail)


def straddling_blocks(ranges: Sequence[tuple[int, int]], total: int, block: int) -> list[int]:
    """Sorted whole-tensor blocks that some range of ``ranges`` (``(offset, size)`` pairs, every
    shard of one tensor) covers only in part: those whose scale needs the other shards."""
    out: set[int] = set()
    for offset, size in ranges:
        split = block_split(offset, size, total, block)
        if split.head:
            out.add(split.j0)
        if split.tail:
            out.add(split.j1 - 1)
    return sorted(out)


def shard_ranges(
    shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Any]
) -> list[tuple[int, int]]:
    """``(flat offset, size)`` of the shard on every coordinate of a device mesh of
    ``mesh_shape`` for a DTensor of ``shape`` with ``placements`` sharded along dim 0 only
    (duplicates of replicas included).  ``ValueError`` for a shard that is no flat range."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    shape = tuple(int(s) for s in shape)
    row = math.prod(shape[1:]) if shape else 1
    out = []
    for coordinate in itertools.product(*(range(int(n)) for n in mesh_shape)):
        local, offset = _compute_local_shape_and_global_offset(
            shape, tuple(mesh_shape), list(coordinate), placements
        )
        local = tuple(int(s) for s in local)
        size = math.prod(local)
        if size and local[1:] != shape[1:]:
            raise ValueError(f"a shard {local} of {shape} is no flat range of the whole tensor")
        out.append((int(offset[0]) * row if shape and size else 0, size))
    return out


# -- decoding and encoding in the span layout ------------------------------------------------------


@dataclasses.dataclass(eq=False, repr=False)
class SpanStorage(Storage):
    """A :class:`~adamkit.formats.Storage` of a shard's moment in the span layout: ``codes`` of
    the shard's ``size`` elements and ``scales`` of its whole-tensor blocks (``split``).
    Decode it with :func:`span_load` (the format's own ``load`` expects the shard's blocks)."""

    split: BlockSplit = _EMPTY


def _span_array(fmt: QuantizedFormat, codes: np.ndarray, split: BlockSplit, signed: bool) -> Any:
    # The shard's codes placed in its blocks, padded with the code of 0.
    last = split.j1 - split.j0
    span = np.full(
        last * fmt.block, fmt.codec.zero_code(signed), dtype=fmt.codec.code_dtype(signed)
    )
    span[split.start : split.start + split.size] = codes.reshape(-1)
    return span


def _sqrt(fmt: QuantizedFormat, role: str) -> bool:
    return fmt.sqrt_second_moment and role not in SIGNED_ROLES


def span_load(fmt: QuantizedFormat, storage: SpanStorage) -> np.ndarray:
    """The float32 moment of ``storage.shape`` that a span-layout storage holds (what
    ``fmt.load`` gives one process for these elements)."""
    split, signed = storage.split, storage.signed
    if split.size == 0:
        return np.zeros(storage.shape, dtype=np.float32)
    span = _span_array(fmt, storage.arrays["codes"], split, signed)
    values = fmt.codec.decode(span, storage.arrays["scales"], (span.size,), fmt.block, signed)
    out = np.ascontiguousarray(values[split.start : split.start + split.size])
    if _sqrt(fmt, storage.role):
        np.square(out, out=out)
    return out.reshape(storage.shape)


def _encode_with_maxima(
    fmt: QuantizedFormat,
    role: str,
    values: np.ndarray,
    split: BlockSplit,
    maxima: dict[int, float],
) -> tuple[np.ndarray, np.ndarray]:
    # Codes of the shard's (stored-domain) values and the span's scales, where span block s in
    # `maxima` takes that maximum as its scale: one padding slot of the block is set to it, so
    # the codec's absmax is it (the maximum is >= every value of the shard in that block).
    signed = role in SIGNED_ROLES
    span = np.zeros((split.j1 - split.j0) * fmt.block, dtype=np.float32)
    span[split.start : split.start + split.size] = values.reshape(-1)
    for s, peak in maxima.items():
        lo = s * fmt.block
        # A partial first block has padding before the shard, any other one after it.
        slot = lo if s == 0 and split.start > 0 else split.start + split.size
        if not (lo <= slot < lo + fmt.block) or (split.start <= slot < split.start + split.size):
            raise AssertionError("a partial block has no padding slot")  # pragma: no cover
        span[slot] = peak
    codes, scales = fmt.codec.encode(span, fmt.block, signed, keep_nonzero=not signed)
    return codes[split.start : split.start + split.size], scales


def _stored_domain(fmt: QuantizedFormat, role: str, values: np.ndarray) -> np.ndarray:
    x = np.array(values, dtype=np.float32).reshape(-1)
    if _sqrt(fmt, role):
        np.sqrt(x, out=x)
    return x


def span_store(
    fmt: QuantizedFormat,
    role: str,
    values: np.ndarray,
    split: BlockSplit,
    peaks: dict[int, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, scales)`` of the shard's float32 moment ``values`` in the span layout: whole
    blocks quantized as ``fmt.store`` quantizes them, and each partial block ``s`` (index in the
    span) with the whole block's maximum ``peaks[s]`` (in the stored domain: ``sqrt(v)`` for
    second moments; every rank's partial maxima reduced, see :func:`partial_peaks`) as its
    scale.  ``ValueError`` for non-finite or (second moments) negative values."""
    raw = np.asarray(values, dtype=np.float32)
    if not np.isfinite(raw).all():
        raise ValueError(f"{role} has non-finite values, which {fmt.name} state cannot hold")
    if role not in SIGNED_ROLES and raw.size and raw.min() < 0:
        raise ValueError(f"{role} must be >= 0, got {raw.min()}")
    return _encode_with_maxima(fmt, role, _stored_domain(fmt, role, raw), split, peaks or {})


def partial_peaks(
    fmt: QuantizedFormat, role: str, values: np.ndarray, split: BlockSplit
) -> dict[int, float]:
    """``{span index: absmax}`` of the shard's part of each partial block, in the stored domain
    (``inf`` where a value is not finite, or a second moment negative)."""
    with np.errstate(invalid="ignore"):
        x = _stored_domain(fmt, role, values)
    return {s: _absmax(x[lo:hi]) for lo, hi, s in split.parts}


def _absmax(x: np.ndarray) -> float:
    if x.size == 0:
        return 0.0
    peak = float(np.max(np.abs(x)))
    return peak if math.isfinite(peak) else math.inf


# -- the step -----------------------------------------------------------------------------------


@dataclasses.dataclass
class SpanRow:
    """One sharded parameter for :func:`update_spans_`: ``param`` and ``grad`` flat float32 or
    float64 arrays of the shard (``param`` updated in place), per moment (2, 3 with AMSGrad)
    the flat ``codes`` and the span's ``scales`` (updated in place), the 1-based ``step``, the
    shard's ``split``, the tensor's ``straddling`` blocks (:func:`straddling_blocks`, the same
    list on every rank) and the reduction group ``key`` passed to ``reduce``."""

    fmt: QuantizedFormat
    param: np.ndarray
    grad: np.ndarray
    codes: list[np.ndarray]
    scales: list[np.ndarray]
    step: int
    split: BlockSplit
    straddling: list[int]
    key: Any = None

    def storages(self, lo: int, hi: int, s0: int, s1: int) -> list[Storage]:
        """Storages (views) of elements ``[lo, hi)`` with span scales ``[s0, s1)``."""
        return [
            Storage(
                self.fmt.name,
                self.fmt.name,
                role,
                (hi - lo,),
                {"codes": codes[lo:hi], "scales": scales[s0:s1]},
                self.fmt.block,
            )
            for role, codes, scales in zip(_ROLES, self.codes, self.scales, strict=False)
        ]


def all_reduce_max(key: Any, buffer: np.ndarray) -> None:
    """The default ``reduce`` of :func:`update_spans_`: ``all_reduce(MAX)`` of ``buffer`` over
    each process group of the tuple ``key`` in turn (one for FSDP2's 1-d mesh)."""
    import torch.distributed as dist

    t = torch.from_numpy(buffer)
    for group in key:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)


def update_spans_(
    rows: Sequence[SpanRow],
    hp: AdamHyperParams,
    *,
    impl: str = "auto",
    reduce: Reduce = all_reduce_max,
) -> None:
    """One Adam step of sharded parameters with block-quantized moments in the span layout (see
    the module docstring), in place.  Every rank must call it with its rows of the same
    parameters in the same order: one ``reduce`` per distinct ``key`` (in order of first use),
    none when no tensor has a straddling block.  ``hp.amsgrad`` decides the moments (3 with
    AMSGrad).  ``impl`` as :func:`adamkit.kernels.stored.adam_update_stored_`.

    Raises before anything changes: ``NotImplementedError`` for a format that rounds
    stochastically, ``ValueError``/``TypeError``/``ImportError`` as the dispatcher.  After the
    step (every ``reduce`` done): ``ValueError`` when some block got non-finite moments (those
    blocks unchanged, as the fused kernel leaves them)."""
    moments = 3 if hp.amsgrad else 2
    for index, row in enumerate(rows):
        if row.fmt.needs_rng:
            raise NotImplementedError(
                f"state={row.fmt.name!r} rounds stochastically, which shards that are no whole "
                "number of blocks do not support"
            )
        if len(row.codes) != moments or len(row.scales) != moments:
            raise ValueError(f"rows[{index}] must hold {moments} moments (amsgrad={hp.amsgrad})")
        resolve_stored_impl(impl, row.fmt)
    failure: Exception | None = None
    try:
        # Non-finite moments are handled below, block by block: no floating-point warnings.
        with np.errstate(all="ignore"):
            parts = _step_parts(rows, hp, impl)
    except Exception as error:
        # Still take part in the reduce (the other ranks wait in it), with every straddling
        # block marked non-finite so that no rank changes one; then raise the error.
        failure, parts = error, []
    peaks = _reduced_peaks(rows, parts, moments, reduce, failed=failure is not None)
    if failure is not None:
        raise failure
    bad = _finish_parts(rows, parts, peaks, moments)
    errors = [f"{bad} partial block(s)"] if bad else []
    for index, row in enumerate(rows):
        lo, hi = row.split.head, row.split.size - row.split.tail
        if hi <= lo:
            continue
        m, v, *w = row.storages(lo, hi, row.split.first, row.split.last)
        try:
            adam_update_stored_(
                row.fmt,
                [row.param[lo:hi]],
                [row.grad[lo:hi]],
                [m],
                [v],
                [w[0] if w else None],
                [row.step],
                hp,
                impl=impl,
            )
        except ValueError as error:
            errors.append(f"parameter {index}: {error}")
    if errors:
        raise ValueError(
            "non-finite moments, which 8-bit state cannot hold; those blocks were left unchanged "
            f"(skip non-finite steps before the update: the guard's non-finite check): "
            f"{'; '.join(errors)}"
        )


class _Part(NamedTuple):
    row: int
    lo: int
    hi: int
    span: int  # index of its block in the row's span
    param: np.ndarray  # the new parameter values
    values: list[np.ndarray]  # new moments, float32 (v and v_max squared)


def _step_parts(rows: Sequence[SpanRow], hp: AdamHyperParams, impl: str) -> list[_Part]:
    # Decode the partial blocks with their stored whole-block scales, step them as dense fp32
    # moments (one dispatcher call for all), on copies: nothing is written before the reduce.
    fp32 = get_format("fp32")
    parts, columns = [], ([], [], [], [], [], [])
    for index, row in enumerate(rows):
        for lo, hi, s in row.split.parts:
            stored = row.storages(lo, hi, s, s + 1)
            values = [np.array(row.fmt.load(st), dtype=np.float32) for st in stored]
            param = np.array(row.param[lo:hi])
            dense = [
                Storage(fp32.name, "dense", role, (hi - lo,), {"values": x})
                for role, x in zip(_ROLES, values, strict=False)
            ]
            for column, item in zip(
                columns,
                (param, np.ascontiguousarray(row.grad[lo:hi]), dense[0], dense[1]),
                strict=False,
            ):
                column.append(item)
            columns[4].append(dense[2] if hp.amsgrad else None)
            columns[5].append(row.step)
            parts.append(_Part(index, lo, hi, s, param, values))
    if parts:
        # The fused dense kernel where the 8-bit one is fused (the same float32 arithmetic).
        dense_impl = "numba" if resolve_stored_impl(impl, rows[0].fmt) == "numba" else "reference"
        adam_update_stored_(fp32, *columns, hp, impl=dense_impl)
    return parts


def _reduced_peaks(
    rows: Sequence[SpanRow],
    parts: list[_Part],
    moments: int,
    reduce: Reduce,
    failed: bool = False,
) -> dict[tuple[int, int], np.ndarray]:
    # One buffer per reduction group: per row, per straddling block, the absmax of each moment.
    layout: dict[Any, list[int]] = {}  # key -> rows, in order of first use
    for index, row in enumerate(rows):
        if row.straddling:
            layout.setdefault(row.key, []).append(index)
    local: dict[tuple[int, int], np.ndarray] = {}
    for part in parts:
        row = rows[part.row]
        local[part.row, part.span] = np.array(
            [
                _absmax(_stored_domain(row.fmt, role, x))
                for role, x in zip(_ROLES, part.values, strict=False)
            ],
            dtype=np.float32,
        )
    out: dict[tuple[int, int], np.ndarray] = {}
    for key, members in layout.items():
        slots: list[tuple[int, int]] = []
        for index in members:
            row = rows[index]
            slots.extend((index, j - row.split.j0) for j in row.straddling)
        buffer = np.full((len(slots), moments), np.inf if failed else 0.0, dtype=np.float32)
        for i, slot in enumerate(slots):
            if slot in local:
                buffer[i] = local[slot]
        reduce(key, buffer.reshape(-1))
        for i, slot in enumerate(slots):
            out[slot] = buffer[i]
    return out


def _finish_parts(
    rows: Sequence[SpanRow],
    parts: list[_Part],
    peaks: dict[tuple[int, int], np.ndarray],
    moments: int,
) -> int:
    # Encode each partial block with the whole block's maxima, write it and its scales; a block
    # with a non-finite maximum anywhere stays as it was.
    bad = 0
    for part in parts:
        row = rows[part.row]
        peak = peaks.get((part.row, part.span))
        if peak is None:  # pragma: no cover - a part is always a straddling block
            raise AssertionError("a partial block without its reduced maximum")
        if not np.isfinite(peak).all():
            bad += 1
            continue
        split = BlockSplit(0, 1, 0, part.hi - part.lo, part.hi - part.lo, 0)
        for role, x, codes, scales, top in zip(
            _ROLES, part.values, row.codes, row.scales, peak[:moments], strict=False
        ):
            new_codes, _ = _encode_with_maxima(
                row.fmt, role, _stored_domain(row.fmt, role, x), split, {0: float(top)}
            )
            codes[part.lo : part.hi] = new_codes
            scales[part.span] = top
        row.param[part.lo : part.hi] = part.param
    return bad
