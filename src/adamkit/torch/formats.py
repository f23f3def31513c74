r"""Compressed optimizer state as torch tensors: the layout, zero-copy NumPy views, conversions.

``adamkit.torch.Adam(params, state="int8")`` keeps each moment in a state format of
:mod:`adamkit.formats` and runs the step through :mod:`adamkit.kernels.stored` on NumPy views of
the tensors below (so the math is the NumPy reference's, or its bit-identical fused kernel).
Every entry is a plain tensor (or a str), so ``torch.save``/``torch.load(weights_only=True)``,
``copy.deepcopy``, pickling and the guard's snapshots work as with torch's own state.

State of one parameter (``optimizer.state[p]``), by the format it got (see
:func:`adamkit.kernels.stored.param_format` for which one):

====================  ===============  ==================  ==================  ====================
key                   ``None``         ``"fp32"``          ``"bf16"``          ``"int8"``
                      (torch's)
====================  ===============  ==================  ==================  ====================
``step``              float32 0-d      float32 0-d         float32 0-d         float32 0-d
``state_format``      (absent)         ``"fp32"`` / 1      ``"bf16"`` / 2      ``"int8"`` / 3
``exp_avg``           param's dtype    float32             bfloat16            uint8 codes
``exp_avg_scale``     --               --                  --                  float32, one per
                                                                               block of 256
``exp_avg_sq``        param's dtype    float32             bfloat16            uint8 codes of
                                                                               sqrt(v), + scale
``max_exp_avg_sq``    AMSGrad only, like ``exp_avg_sq``
bytes per parameter   2x itemsize      8                   4                   2 + 8/256
====================  ===============  ==================  ==================  ====================

Every moment tensor has the parameter's shape (codes too: one per element, in C order), so a
state dict is readable without the model.  Under ``"int8"`` a parameter with fewer than 4096
elements keeps float32 moments (``exp_avg`` float32, no scale) while its ``state_format`` stays
``"int8"``: that is the format's small-tensor rule.  ``"int8-companded"`` uses int8 codes for
``exp_avg`` and blocks of 32.  ``state_format`` is the name in the live state and the number
(:data:`FORMAT_CODES`) in ``state_dict()``, which ``torch.distributed.checkpoint``'s flattened
state dicts require; loading takes either.

The step computes on the CPU through NumPy views that share memory with these tensors
(:func:`storage_of`); other devices raise ``NotImplementedError``.  Loading converts between
formats (:func:`convert_entry`): ``load`` of the source format to float32, ``store`` into the
target's.

FSDP2 (DTensor parameters, see the section "DTensor parameters" below): the format is chosen on
the whole parameter's shape, the moments are DTensors laid out like the parameter and int8 block
scales are plain per-rank tensors, those of the whole tensor's blocks that overlap the local
shard (:mod:`adamkit.torch.sharded_blocks`); ``state_dict()`` writes the single-process layout
(a collective then), so checkpoints do not depend on the number of ranks.  A sharded run equals
the single-process run bit for bit with torch's layout, ``fp32``, ``int8`` (blocks that straddle
shards included: one ``all_reduce(MAX)`` per step agrees on their scales; the companded code's
fused kernel within its kernel-vs-plain tolerance) and ``bf16`` state: every rank draws the
same key per parameter from the optimizer's generator (rank 0's seed, :func:`new_rng`), in the
order one process draws them, and the fused bf16 kernel indexes its rounding noise by global
element position (:func:`shard_rng`), so each shard rounds with the bits one process uses for
those elements; :func:`round_to_bf16_` (``param_rounding="stochastic"``) does the same for
bfloat16 parameters.  This holds when every parameter of the group is sharded (FSDP2 shards
them all): a plain parameter in a group of DTensors draws its key at another point of the
sequence.  Not bit for bit: bf16 state through the plain path (``impl="reference"``, no numba,
update clipping), whose rounding follows a generator's stream, so each shard draws from a
generator of its own and the run matches one process in distribution only; likewise a shard
that is no flat range of the whole tensor.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from adamkit.formats import FORMATS, QuantizedFormat, StateFormat, Storage, bf16, get_format
from adamkit.formats.base import SIGNED_ROLES, STATE_DICT_VERSION
from adamkit.kernels.stored import ShardRng, check_state, resolve_stored_impl
from adamkit.torch.sharded_blocks import (
    BlockSplit,
    SpanRow,
    SpanStorage,
    all_reduce_max,
    block_split,
    partial_peaks,
    shard_ranges,
    span_load,
    span_store,
    straddling_blocks,
)

__all__ = [
    "FORMAT_KEY",
    "PARAM_ROUNDINGS",
    "ROLES",
    "ParsedEntry",
    "add_moment",
    "check_rounding_params",
    "check_state_options",
    "check_stored_params",
    "convert_entry",
    "dense_state_dict",
    "new_entry",
    "new_rng",
    "numpy_view",
    "parse_entry",
    "parse_live_entry",
    "round_to_bf16_",
    "saved_rng",
    "scale_key",
    "state_nbytes",
    "storage_of",
    "stored_impl",
    "widened",
]

FORMAT_KEY = "state_format"
"""Per-parameter state key naming the format of a compressed entry (absent: torch's layout).  The
live state (``optimizer.state[p]``) holds the name; ``state_dict()`` writes its number from
:data:`FORMAT_CODES`."""

FORMAT_CODES: dict[str, int] = {
    "fp32": 1,
    "bf16": 2,
    "int8": 3,
    "int8-companded": 4,
    "int8-blockwise": 5,
}
"""How ``state_dict()`` writes ``state_format``: a number, because the flattened optimizer state
dicts of ``torch.distributed.checkpoint`` (``flatten_optimizer_state_dict=True``) hold only
tensors, ints, floats and dicts.  A number is never reused for another format.  Loading accepts
the number or the name (checkpoints written before the numbers hold names); a format without a
number here is written by name."""

ROLES: tuple[str, ...] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

PARAM_ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
"""``param_rounding``: how a bfloat16 parameter takes its update.  ``"nearest"`` (torch's):
updates below half a bf16 spacing of the parameter (2**-9 relative) are lost;
``"stochastic"``: the new value is computed in float32 and rounded up or down with the
probabilities that make it unbiased, so many tiny updates add up on average."""


def format_name(value: Any, where: str = "state") -> str:
    """The registered format named by a saved ``state_format``: a name or a number of
    :data:`FORMAT_CODES`.  ``ValueError`` naming ``where`` for anything else."""
    if isinstance(value, str) and value in FORMATS and value != "native":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        for name, code in FORMAT_CODES.items():
            if code == value and name in FORMATS:
                return name
    known = ", ".join(repr(k) for k in FORMATS if k != "native")
    codes = ", ".join(f"{c} for {n!r}" for n, c in FORMAT_CODES.items() if n in FORMATS)
    raise ValueError(f"{where}: unknown state format {value!r} (known: {known}; numbers {codes})")


def scale_key(role: str) -> str:
    """State key of the block scales of ``role`` (``"exp_avg"`` -> ``"exp_avg_scale"``)."""
    return f"{role}_scale"


def check_state_options(group: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a group's ``state`` and ``param_rounding``; return them normalised.

    ``state``: ``None`` or a registered format name (``"native"`` becomes ``None``);
    ``param_rounding``: one of :data:`PARAM_ROUNDINGS`.  Missing keys count as ``None`` and
    ``"nearest"``.  Raises ``TypeError``/``ValueError`` naming the setting.
    """
    state = check_state(group.get("state"))
    rounding = group.get("param_rounding", "nearest")
    if not isinstance(rounding, str) or rounding not in PARAM_ROUNDINGS:
        raise ValueError(
            f"param_rounding must be one of {', '.join(map(repr, PARAM_ROUNDINGS))}, got "
            f"{rounding!r}"
        )
    return {"state": state, "param_rounding": rounding}


# -- tensors <-> NumPy views ---------------------------------------------------------------------


def numpy_view(t: Tensor) -> np.ndarray:
    """A NumPy array sharing memory with the CPU tensor ``t`` (bfloat16 as its uint16 bits)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _tensor(a: np.ndarray) -> Tensor:
    """A tensor sharing memory with the C-contiguous array ``a`` (uint16 bits as bfloat16)."""
    if a.dtype == np.uint16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _encoding(fmt: StateFormat, state: Mapping[str, Any], role: str) -> str:
    if scale_key(role) in state:
        return fmt.name
    return "bf16" if state[role].dtype == torch.bfloat16 else "dense"


def storage_of(
    fmt: StateFormat, state: dict[str, Any], role: str, shape: tuple[int, ...]
) -> Storage:
    """A :class:`~adamkit.formats.Storage` whose arrays are views of ``state``'s CPU tensors.

    What ``fmt.store`` writes lands in the tensors.  A non-contiguous tensor is first replaced in
    ``state`` by a contiguous copy (a flat view must share memory).
    """
    keys = (role, scale_key(role)) if scale_key(role) in state else (role,)
    for key in keys:
        if not state[key].is_contiguous():
            state[key] = state[key].contiguous()
    encoding = _encoding(fmt, state, role)
    if encoding == "dense":
        return Storage(fmt.name, encoding, role, shape, {"values": numpy_view(state[role])})
    if encoding == "bf16":
        return Storage(fmt.name, encoding, role, shape, {"bits": numpy_view(state[role])})
    arrays = {
        "codes": numpy_view(state[role]).reshape(-1),
        "scales": numpy_view(state[scale_key(role)]).reshape(-1),
    }
    return Storage(fmt.name, encoding, role, shape, arrays, getattr(fmt, "block", 0))


def _tensors_of(storage: Storage, shape: tuple[int, ...]) -> dict[str, Tensor]:
    """State entries (sharing memory with ``storage``'s arrays) for one moment."""
    role = storage.role
    if storage.encoding == "dense":
        return {role: _tensor(np.ascontiguousarray(storage.arrays["values"])).reshape(shape)}
    if storage.encoding == "bf16":
        return {role: _tensor(np.ascontiguousarray(storage.arrays["bits"])).reshape(shape)}
    return {
        role: _tensor(storage.arrays["codes"]).reshape(shape),
        scale_key(role): _tensor(storage.arrays["scales"]),
    }


def _zero_moment(fmt: StateFormat, role: str, param: Tensor) -> dict[str, Tensor]:
    if not is_dtensor(param):
        shape = tuple(param.shape)
        return _tensors_of(fmt.zeros(shape, np.float32, role=role), shape)
    local = tuple(param.to_local().shape)
    fmt = shard_format(fmt, tuple(param.shape))
    out = _tensors_of(fmt.zeros(local, role=role), local)
    if scale_key(role) in out:
        # The span layout: the scales of the whole-tensor blocks that overlap the shard.
        split = shard_split(param, fmt)  # type: ignore[arg-type]
        out[scale_key(role)] = torch.zeros(split.j1 - split.j0, dtype=torch.float32)
    out[role] = as_dtensor(out[role], param)
    return out


def new_entry(fmt: StateFormat, param: Tensor, step: Tensor, amsgrad: bool) -> dict:
    """Zero state for ``param`` in ``fmt`` (CPU tensors), with ``step``.  A DTensor parameter
    gets moments laid out like it and block scales over its local shard (see
    :func:`shard_format`)."""
    entry: dict[str, Any] = {"step": step, FORMAT_KEY: fmt.name}
    for role in ROLES[: 3 if amsgrad else 2]:
        entry.update(_zero_moment(fmt, role, param))
    return entry


def add_moment(fmt: StateFormat, entry: dict[str, Any], role: str, param: Tensor) -> None:
    """Add a zero ``role`` moment to ``entry`` (AMSGrad switched on mid-run: ``max(0, v) = v``)."""
    entry.update(_zero_moment(fmt, role, param))


# -- parsing, validation and conversion of saved entries -----------------------------------------


class ParsedEntry(NamedTuple):
    """A validated per-parameter state entry: ``format`` (``None`` for torch's layout), the
    ``step`` tensor as saved, and per role either a tensor (torch's layout) or a private
    :class:`~adamkit.formats.Storage` copy."""

    format: str | None
    step: Any
    moments: dict[str, Tensor | Storage]


def _host_array(t: Tensor) -> np.ndarray:
    # A host array of the values: NumPy has no bfloat16, and float16 is widened alike (exact).
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return numpy_view(t)


def _saved_storage(
    fmt: StateFormat,
    state: Mapping[str, Any],
    role: str,
    shape: tuple[int, ...],
    where: str,
    split: BlockSplit | None = None,
) -> Storage:
    value = state[role]
    scale = state.get(scale_key(role))
    if not isinstance(value, Tensor) or (scale is not None and not isinstance(scale, Tensor)):
        bad = value if not isinstance(value, Tensor) else scale
        raise TypeError(f"{where}: {role} entries must be tensors, got {type(bad).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(
            f"{where}: {role} has shape {tuple(value.shape)}, the parameter has {shape}"
        )
    if scale is not None and split is not None and isinstance(fmt, QuantizedFormat):
        return _saved_span_storage(fmt, value, scale, role, shape, where, split)
    header: dict[str, Any] = {}
    if scale is not None:
        encoding = fmt.name
        arrays = {"codes": _host_array(value).reshape(-1), "scales": _host_array(scale)}
        if isinstance(fmt, QuantizedFormat):
            header = {"block": fmt.block, "sqrt_second_moment": fmt.sqrt_second_moment}
    elif value.dtype == torch.bfloat16:
        encoding, arrays = "bf16", {"bits": numpy_view(value.detach().cpu())}
    else:
        encoding, arrays = "dense", {"values": _host_array(value)}
    saved = {
        "format": fmt.name,
        "version": STATE_DICT_VERSION,
        "encoding": encoding,
        "role": role,
        "shape": list(shape),
        **header,
        **arrays,
    }
    try:
        return fmt.from_state_dict(saved, shape)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {role}: {error}") from None


def _saved_span_storage(
    fmt: QuantizedFormat,
    value: Tensor,
    scale: Tensor,
    role: str,
    shape: tuple[int, ...],
    where: str,
    split: BlockSplit,
) -> SpanStorage:
    # A shard's codes with the scales of its whole-tensor blocks (the span layout): checked as
    # the codes of the span padded with the code of 0, by the format's own validation.
    signed = role in SIGNED_ROLES
    codes = _host_array(value).reshape(-1)
    length = (split.j1 - split.j0) * fmt.block
    span = np.full(length, fmt.codec.zero_code(signed), dtype=codes.dtype)
    span[split.start : split.start + split.size] = codes
    saved = {
        "format": fmt.name,
        "version": STATE_DICT_VERSION,
        "encoding": fmt.name,
        "role": role,
        "shape": [length],
        "block": fmt.block,
        "sqrt_second_moment": fmt.sqrt_second_moment,
        "codes": span,
        "scales": _host_array(scale),
    }
    try:
        checked = fmt.from_state_dict(saved, (length,))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{where}: {role}: {error} (a shard's codes with the scales of the whole-tensor "
            f"blocks {split.j0} .. {split.j1 - 1} that overlap it)"
        ) from None
    arrays = {
        "codes": np.ascontiguousarray(
            checked.arrays["codes"][split.start : split.start + split.size]
        ),
        "scales": checked.arrays["scales"],
    }
    return SpanStorage(fmt.name, fmt.name, role, shape, arrays, fmt.block, split=split)


class ShardEntry(dict):
    """A saved entry of a DTensor parameter's shard (:func:`local_saved_entry`): a dict of
    plain tensors, with the shard's :class:`ShardLayout` as ``layout`` so that
    :func:`parse_entry` can check block scales in the span layout."""

    layout: ShardLayout | None = None


def parse_entry(
    state: Any,
    shape: tuple[int, ...],
    dtype: torch.dtype | None,
    amsgrad: bool,
    where: str,
    global_shape: tuple[int, ...] | None = None,
    layout: ShardLayout | None = None,
) -> ParsedEntry | None:
    """Validate one saved per-parameter entry for a parameter of ``shape`` and ``dtype``.

    ``None`` for an empty entry.  Torch's layout (no ``state_format``): moments must be tensors of
    the parameter's shape and, unless ``dtype`` is ``None``, its dtype (``ValueError``: torch
    would cast silently).  A compressed entry must name a registered format (by name or number,
    :func:`format_name`) and hold exactly its
    tensors, of the parameter's shape, with codes, scales and bits that the format's
    ``from_state_dict`` accepts (code dtype and range, one finite scale >= 0 per block, ...).
    ``max_exp_avg_sq`` must be present when ``amsgrad``.  Raises ``ValueError``/``TypeError``
    prefixed by ``where``; copies what it keeps and modifies nothing.  ``global_shape``: for the
    local shard of a DTensor parameter (``shape`` is then the shard's), the whole parameter's
    shape, which decides the encoding (see :func:`shard_format`); the entry then holds plain
    tensors of the shard (:func:`local_saved_entry`), block-quantized moments in the span
    layout (the scales of the whole-tensor blocks that overlap the shard, see the section
    "DTensor parameters") when the shard's ``layout`` is given (or ``state`` is a
    :class:`ShardEntry`); they are then :class:`~adamkit.torch.sharded_blocks.SpanStorage`.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{where}: state must be a dict, got {type(state).__name__}")
    if len(state) == 0:
        return None
    required = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"{where}: state lacks {missing} (amsgrad={amsgrad})")
    roles = [role for role in ROLES if role in state]
    name = state.get(FORMAT_KEY)
    if name is None:
        moments: dict[str, Tensor | Storage] = {}
        for role in roles:
            value = state[role]
            if not isinstance(value, Tensor):
                raise TypeError(f"{where}: {role} must be a tensor, got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"{where}: {role} has shape {tuple(value.shape)}, the parameter has {shape}"
                )
            if dtype is not None and value.dtype != dtype:
                raise ValueError(
                    f"{where}: {role} has dtype {value.dtype}, the parameter has {dtype} "
                    "(torch would cast it silently; convert the checkpoint explicitly if intended)"
                )
            moments[role] = value
        return ParsedEntry(None, state["step"], moments)
    name = format_name(name, where)
    fmt = FORMATS[name] if global_shape is None else shard_format(FORMATS[name], global_shape)
    allowed = {"step", FORMAT_KEY, *roles, *(scale_key(r) for r in roles)}
    extra = sorted(map(str, set(state) - allowed))
    if extra:
        raise ValueError(f"{where}: unexpected entries {extra} in {name!r} state")
    if layout is None and global_shape is not None:
        layout = getattr(state, "layout", None)
    split = None
    if layout is not None and isinstance(fmt, QuantizedFormat) and layout.flat_offset is not None:
        split = block_split(layout.flat_offset, layout.local_size, layout.size, fmt.block)
    storages = {role: _saved_storage(fmt, state, role, shape, where, split) for role in roles}
    return ParsedEntry(name, state["step"], storages)  # type: ignore[arg-type]


def parse_live_entry(state: Mapping[str, Any], param: Tensor, where: str) -> ParsedEntry | None:
    """:func:`parse_entry` for ``param``'s own live state (a DTensor's: its local shard, block
    scales in the span layout), whatever its dtypes."""
    if is_dtensor(param):
        local = tuple(param.to_local().shape)
        return parse_entry(
            local_tensors(state), local, None, False, where, tuple(param.shape), shard_layout(param)
        )
    return parse_entry(state, tuple(param.shape), None, False, where)


def _values(entry: ParsedEntry, role: str) -> np.ndarray:
    source = entry.moments[role]
    if isinstance(source, SpanStorage):
        return span_load(FORMATS[entry.format], source)  # type: ignore[arg-type, index]
    if isinstance(source, Storage):
        return FORMATS[entry.format].load(source)  # type: ignore[index]
    return _host_array(source)


def convert_entry(
    entry: ParsedEntry,
    param: Tensor,
    target: StateFormat | None,
    step: Tensor,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """A new state entry for ``param`` holding ``entry``'s moments in ``target`` (``None``:
    torch's layout in the parameter's dtype, on its device), with ``step``.

    Same format: the validated copies are used as they are (exact).  Otherwise each moment is
    decoded to float32 and stored in ``target`` (``rng`` for stochastic rounding).  Raises
    ``ValueError`` when ``target`` cannot hold the values (non-finite into ``int8``).  For a
    DTensor ``param`` the entry holds its local shard (:func:`local_saved_entry`) and the result
    is laid out like ``param``.
    """
    if is_dtensor(param):
        local = param.to_local()
        target_local = None if target is None else shard_format(target, tuple(param.shape))
        if (
            isinstance(target_local, QuantizedFormat)
            and entry.format != target_local.name
            and math.prod(param.shape) >= target_local.min_size
        ):
            return _convert_to_span(entry, param, target_local, step)
        out = convert_entry(entry, local, target_local, step, rng)
        for role in ROLES:
            if role in out:
                out[role] = as_dtensor(out[role], param)
        return out
    shape = tuple(param.shape)
    out: dict[str, Any] = {"step": step}
    if target is not None:
        out[FORMAT_KEY] = target.name
    for role in ROLES:
        if role not in entry.moments:
            continue
        source = entry.moments[role]
        if target is None:
            values = (
                source if isinstance(source, Tensor) else torch.from_numpy(_values(entry, role))
            )
            out[role] = values.detach().to(param.device, param.dtype, copy=True).reshape(shape)
        elif entry.format == target.name:
            out.update(_tensors_of(source, shape))  # type: ignore[arg-type]
        else:
            storage = target.zeros(shape, np.float32, role=role)
            try:
                target.store(storage, _values(entry, role), rng=rng)
            except ValueError as error:
                raise ValueError(
                    f"cannot convert {role} to {target.name!r} state: {error}"
                ) from None
            out.update(_tensors_of(storage, shape))
    return out


def _convert_to_span(
    entry: ParsedEntry, param: Tensor, target: QuantizedFormat, step: Tensor
) -> dict[str, Any]:
    # Quantize the shard's moments into the span layout: blocks that straddle shards take the
    # whole block's maximum (one small all_reduce per moment; every rank converts the same
    # entries in the same order, as load_state_dict and the step do).
    split = shard_split(param, target)
    out: dict[str, Any] = {"step": step, FORMAT_KEY: target.name}
    for role in ROLES:
        if role not in entry.moments:
            continue
        values = np.asarray(_values(entry, role), dtype=np.float32)
        peaks = _span_peaks(param, target, role, values, split)
        try:
            codes, scales = span_store(target, role, values, split, peaks)
        except ValueError as error:
            raise ValueError(f"cannot convert {role} to {target.name!r} state: {error}") from None
        out[role] = as_dtensor(
            torch.from_numpy(np.ascontiguousarray(codes)).reshape(param.to_local().shape), param
        )
        out[scale_key(role)] = torch.from_numpy(np.ascontiguousarray(scales))
    return out


def dense_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an adamkit state dict in torch's layout: every compressed entry decoded to
    float32 tensors under torch's keys (``state_format`` and scales dropped).

    ``torch.optim.Adam``/``AdamW`` load the result (casting the moments to each parameter's
    dtype), and so does any adamkit optimizer.  Other entries are shared, not copied.  Raises
    ``ValueError``/``TypeError`` for an entry that :func:`parse_entry` refuses.
    """
    if not isinstance(state_dict, Mapping) or "state" not in state_dict:
        raise TypeError("state_dict must be a dict with an entry 'state'")
    state = {}
    for key, entry in state_dict["state"].items():
        if not isinstance(entry, Mapping) or FORMAT_KEY not in entry:
            state[key] = entry
            continue
        shape = tuple(entry["exp_avg"].shape) if isinstance(entry.get("exp_avg"), Tensor) else ()
        parsed = parse_entry(entry, shape, None, False, f"state {key!r}")
        dense: dict[str, Any] = {"step": entry["step"]}
        for role in parsed.moments:  # type: ignore[union-attr]
            dense[role] = torch.from_numpy(np.array(_values(parsed, role), dtype=np.float32))
        state[key] = dense
    return {**state_dict, "state": state}


# -- DTensor parameters (FSDP2): local shards, and the state dict's whole-tensor layout ----------
#
# The step is elementwise, so a DTensor parameter is updated through its local shard: its moments
# are DTensors laid out like it (codes, bf16 bits and float32 moments have the parameter's shape).
# Block-quantized moments keep the scales of the *whole tensor's* blocks j0 .. j1 - 1 that overlap
# the local flat range [o, o + n) (block j covers flat elements [j * block, (j + 1) * block)), as
# a plain tensor of j1 - j0 scales per rank: the span layout of adamkit.torch.sharded_blocks.  A
# block that straddles two shards has its scale on both ranks, equal, so every element has one
# process's code and scale.  The step agrees on those scales by one all_reduce(MAX) of the
# straddling blocks' partial maxima (span_row, sharded_blocks.update_spans_); converting into
# such a format likewise (_convert_to_span).  Which format a parameter gets is decided on the
# whole (global) shape, so every rank agrees and the choice is the single-process one; a local
# shard below a quantized format's size threshold is quantized all the same (shard_format).
#
# The per-rank scales are no DTensor (DTensor shards follow torch.chunk, per-rank block counts do
# not), so state_dict() writes the single-process layout instead (export_state_dict): codes as a
# DTensor like the parameter and the scales of all the whole tensor's blocks as a plain tensor
# equal on every rank.  That makes the state dict independent of the number of ranks (DCP
# reshards it to any world size) and equal to the single-process one.  Both directions are exact
# slices (_whole_blocks, _shard_blocks), whether or not a shard is *block-aligned* (o and n
# multiples of the block, or the range reaching the end: then j1 - j0 = ceil(n / block) and the
# span's blocks are the shard's own).


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or ``None`` when it was never imported (then no
    DTensor can exist, and nothing is imported here)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, its gradient or state)."""
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


class ShardLayout(NamedTuple):
    """Where the local shard of a DTensor sits in the whole tensor: ``local_shape``, ``offset``
    (per dimension) and ``flat_offset``, the index of its first element in the flattened whole
    tensor when the shard is a contiguous flat range of it (sharded along dim 0 only), else
    ``None``."""

    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    offset: tuple[int, ...]
    flat_offset: int | None

    @property
    def size(self) -> int:
        return math.prod(self.global_shape)

    @property
    def local_size(self) -> int:
        return math.prod(self.local_shape)


def shard_layout(p: Tensor) -> ShardLayout:
    """The :class:`ShardLayout` of the DTensor ``p`` on this rank."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    global_shape = tuple(p.shape)
    local_shape = tuple(p.to_local().shape)
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    offset = tuple(int(o) for o in offset)
    flat = None
    if not global_shape:
        flat = 0
    elif local_shape[1:] == global_shape[1:] or math.prod(local_shape) == 0:
        flat = offset[0] * math.prod(global_shape[1:]) if math.prod(local_shape) else 0
    return ShardLayout(global_shape, local_shape, offset, flat)


_ANY_SIZE: dict[int, tuple[QuantizedFormat, QuantizedFormat]] = {}


def _quantize_any_size(fmt: QuantizedFormat) -> QuantizedFormat:
    # Keyed by identity (formats are registered once; their fields need not be hashable), with
    # the format itself kept alive so the id stays its own.
    if id(fmt) not in _ANY_SIZE:
        _ANY_SIZE[id(fmt)] = (fmt, dataclasses.replace(fmt, min_size=0))
    return _ANY_SIZE[id(fmt)][1]


def shard_format(fmt: StateFormat, global_shape: tuple[int, ...]) -> StateFormat:
    """The format that stores a local shard of a parameter of ``global_shape`` in ``fmt``: ``fmt``
    itself, except that a quantized format quantizes every shard of a parameter whose whole size
    reaches its threshold (``min_size``), however small the shard (same name, same storages)."""
    if isinstance(fmt, QuantizedFormat) and math.prod(global_shape) >= fmt.min_size:
        return _quantize_any_size(fmt)
    return fmt


def local_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every DTensor replaced by its local tensor (sharing memory)."""
    return {k: v.to_local() if is_dtensor(v) else v for k, v in state.items()}


def as_dtensor(local: Tensor, like: Tensor) -> Tensor:
    """A DTensor with local tensor ``local`` (shared) laid out like the DTensor ``like``."""
    return type(like).from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def check_shard_layout(p: Tensor, fmt: StateFormat, where: str) -> None:
    """Raise unless the DTensor ``p`` can keep state in ``fmt``: ``NotImplementedError`` for
    block-quantized state on a shard that is no flat range of the whole tensor (sharded along a
    dim other than 0), ``ValueError`` for partial placements or a gradient laid out otherwise."""
    if any(placement.is_partial() for placement in p.placements):
        raise ValueError(f"{where}: a DTensor parameter with partial placements {p.placements}")
    if (
        isinstance(fmt, QuantizedFormat)
        and len(p.shape) >= 2
        and math.prod(p.shape) >= fmt.min_size
        and shard_layout(p).flat_offset is None
    ):
        raise NotImplementedError(
            f"{where}: state={fmt.name!r} quantizes blocks of a flat range of the parameter and "
            f"needs DTensors sharded along dim 0 only, got {p.placements}"
        )
    grad = p.grad
    if grad is not None and (not is_dtensor(grad) or grad.placements != p.placements):
        layout = grad.placements if is_dtensor(grad) else type(grad).__name__
        raise ValueError(
            f"{where}: a DTensor parameter is updated shard by shard and needs its gradient laid "
            f"out the same way; the parameter has {p.placements}, the gradient {layout}"
        )


def shard_rng(rng: np.random.Generator, p: Tensor) -> ShardRng | np.random.Generator:
    """What rounds the local shard of the DTensor ``p`` for one step, given the optimizer's
    generator ``rng`` (the same state on every rank: rank 0's seed, see :func:`new_rng`).

    A shard that is one flat range of the whole tensor (sharded along dim 0, as FSDP2 does):
    a :class:`~adamkit.kernels.stored.ShardRng` of ``rng`` and the range's start, with which the
    fused bf16 kernel and :func:`round_to_bf16_` round exactly as one process rounds the whole
    tensor (the key drawn from ``rng`` as one process draws it, the noise indexed by global
    element position).  Any other layout: a generator seeded by one draw of ``rng`` and the
    shard's offset (shards draw different bits, replicas of a shard the same), which matches one
    process in distribution only.  Either way ``rng`` advances alike on every rank, whatever the
    shard sizes."""
    layout = shard_layout(p)
    if layout.flat_offset is not None:
        return ShardRng(rng, layout.flat_offset)
    draw = int(rng.integers(0, 2**63))
    return np.random.default_rng([draw, *layout.offset])


def shard_split(p: Tensor, fmt: QuantizedFormat) -> BlockSplit:
    """The :class:`~adamkit.torch.sharded_blocks.BlockSplit` of the DTensor ``p``'s local shard
    in ``fmt``'s blocks (``p`` sharded along dim 0 only: ``ValueError`` otherwise)."""
    layout = shard_layout(p)
    if layout.flat_offset is None:
        raise ValueError(f"a shard sharded as {p.placements} is no flat range of the tensor")
    return block_split(layout.flat_offset, layout.local_size, layout.size, fmt.block)


@functools.lru_cache(maxsize=256)
def _straddling(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: tuple[Any, ...], block: int
) -> tuple[int, ...]:
    ranges = shard_ranges(shape, mesh_shape, placements)
    return tuple(straddling_blocks(ranges, math.prod(shape), block))


def straddling_of(p: Tensor, block: int) -> list[int]:
    """The whole-tensor blocks of ``block`` elements that straddle two shards of the DTensor
    ``p`` (the same list on every rank; empty when every shard is block-aligned)."""
    mesh = p.device_mesh
    return list(_straddling(tuple(p.shape), tuple(mesh.shape), tuple(p.placements), block))


def shard_groups(p: Tensor) -> tuple[Any, ...]:
    """The process groups of the mesh dimensions along which the DTensor ``p`` is sharded:
    where the shards of a straddling block live (replicas hold equal copies)."""
    mesh = p.device_mesh
    return tuple(
        mesh.get_group(dim) for dim, placement in enumerate(p.placements) if placement.is_shard()
    )


def _span_peaks(
    p: Tensor, fmt: QuantizedFormat, role: str, values: np.ndarray, split: BlockSplit
) -> dict[int, float]:
    # The whole blocks' maxima of this shard's partial blocks: one all_reduce(MAX) of one slot
    # per straddling block of the tensor (none when there is none, on every rank alike).
    blocks = straddling_of(p, fmt.block)
    if not blocks:
        return {}
    mine = partial_peaks(fmt, role, values, split)
    buffer = np.zeros(len(blocks), dtype=np.float32)
    for i, j in enumerate(blocks):
        buffer[i] = mine.get(j - split.j0, 0.0)
    all_reduce_max(shard_groups(p), buffer)
    return {j - split.j0: float(buffer[i]) for i, j in enumerate(blocks) if j - split.j0 in mine}


def span_row(
    fmt: StateFormat,
    p: Tensor,
    state: dict[str, Any],
    param: np.ndarray,
    grad: np.ndarray,
    step: int,
    amsgrad: bool,
) -> SpanRow | None:
    """The row of :func:`adamkit.torch.sharded_blocks.update_spans_` for the DTensor ``p`` whose
    live ``state`` (``local_tensors`` of it: plain local tensors) holds block-quantized moments in
    ``fmt`` (its :func:`shard_format`), or ``None`` where the usual stored step applies (not a
    DTensor, moments not quantized, or no block of ``p`` straddles two shards).  ``param`` and
    ``grad``: NumPy arrays of the shard (``param`` updated in place, shared or a float32 copy);
    ``step``: the 1-based update number.  Non-contiguous state tensors are replaced in ``state``
    by contiguous copies (the row's arrays share memory with them)."""
    if not (is_dtensor(p) and isinstance(fmt, QuantizedFormat) and scale_key("exp_avg") in state):
        return None
    straddling = straddling_of(p, fmt.block)
    if not straddling:
        return None
    roles = ROLES[: 3 if amsgrad else 2]
    for key in (*roles, *(scale_key(role) for role in roles)):
        if not state[key].is_contiguous():
            state[key] = state[key].contiguous()
    return SpanRow(
        fmt,
        param.reshape(-1),
        grad.reshape(-1),
        [numpy_view(state[role]).reshape(-1) for role in roles],
        [numpy_view(state[scale_key(role)]).reshape(-1) for role in roles],
        step,
        shard_split(p, fmt),
        straddling,
        shard_groups(p),
    )


def _max_over_mesh(t: Tensor, like: Tensor) -> None:
    import torch.distributed as dist

    mesh = like.device_mesh
    for dim in range(mesh.ndim):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))


def _whole_blocks(
    fmt: QuantizedFormat, role: str, p: Tensor, codes: Tensor, scales: Tensor
) -> tuple[Tensor, Tensor]:
    """(codes, scales) of one moment of the DTensor ``p`` in the whole-tensor block layout (a
    collective over ``p``'s mesh: one ``all_reduce`` of the scales).  Exact: the span layout
    holds the whole blocks' scales (a straddling block's on each of its ranks, equal)."""
    layout = shard_layout(p)
    split = shard_split(p, fmt)
    whole = torch.zeros(-(-layout.size // fmt.block), dtype=torch.float32)
    whole[split.j0 : split.j1] = scales.reshape(-1)
    _max_over_mesh(whole, p)
    return codes, whole


def _shard_blocks(
    fmt: QuantizedFormat, role: str, layout: ShardLayout, codes: Tensor, whole: Tensor
) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`_whole_blocks` on one rank, without communication and exact:
    local ``codes`` and the whole tensor's block ``scales`` -> (codes, the span's scales)."""
    assert layout.flat_offset is not None
    split = block_split(layout.flat_offset, layout.local_size, layout.size, fmt.block)
    maxima = _host_array(whole).reshape(-1)[split.j0 : split.j1]
    return codes, torch.from_numpy(np.array(maxima, dtype=np.float32))


def whole_tensor_entry(entry: dict[str, Any], p: Tensor) -> dict[str, Any]:
    """The live entry ``entry`` (a new dict of it, named format) of the DTensor parameter ``p``
    with block-quantized moments in the whole-tensor block layout (a collective over ``p``'s
    mesh; see the section comment); other entries are returned as they are."""
    name = entry[FORMAT_KEY]
    fmt = FORMATS[name]
    if not isinstance(fmt, QuantizedFormat):
        return entry
    for role in ROLES:
        key = scale_key(role)
        if key in entry:
            entry[role], entry[key] = _whole_blocks(fmt, role, p, entry[role], entry[key])
    return entry


def export_state_dict(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> dict[str, Any]:
    """What an adamkit optimizer's ``state_dict()`` returns, from torch's: every compressed
    entry copied with ``state_format`` as its number (:data:`FORMAT_CODES`), and for DTensor
    parameters block-quantized moments in the whole-tensor block layout (see the section comment;
    a collective over the parameter's mesh, so every rank must call ``state_dict()``).  Live
    tensors are shared, never modified."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in state_dict["state"].items():
        if isinstance(entry, Mapping) and isinstance(entry.get(FORMAT_KEY), str):
            name = entry[FORMAT_KEY]
            entry = dict(entry)
            p = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
            if p is not None and is_dtensor(p):
                entry = whole_tensor_entry(entry, p)
            entry[FORMAT_KEY] = FORMAT_CODES.get(name, name)
        state[index] = entry
    return {**state_dict, "state": state}


def live_entry(state: Mapping[str, Any], p: Tensor, where: str) -> dict[str, Any]:
    """The inverse of :func:`whole_tensor_entry` for the DTensor ``p`` (no communication):
    moments as DTensors laid out like ``p``, block scales over this rank's shard."""
    out = local_saved_entry(state, p, where)
    for role in ROLES:
        if isinstance(out.get(role), Tensor) and not is_dtensor(out[role]):
            out[role] = as_dtensor(out[role].contiguous(), p)
    return out


def local_saved_entry(state: Any, p: Tensor, where: str) -> Any:
    """A saved entry for the DTensor parameter ``p`` (``export_state_dict``'s layout: moments as
    DTensors laid out like ``p``, or as whole plain tensors; block scales of the whole tensor) as
    plain tensors of this rank's shard, with the scales in the span layout (those of the
    whole-tensor blocks that overlap the shard: exact, a slice), as a :class:`ShardEntry`
    carrying the shard's layout.  Anything it cannot place is left for :func:`parse_entry` to
    refuse; ``ValueError`` for a DTensor laid out unlike ``p``."""
    if not isinstance(state, Mapping):
        return state
    layout = shard_layout(p)
    out = ShardEntry()
    out.layout = layout
    for key, value in state.items():
        if is_dtensor(value):
            if value.placements != p.placements or tuple(value.shape) != layout.global_shape:
                raise ValueError(
                    f"{where}: {key} is a DTensor {tuple(value.shape)} {value.placements}, the "
                    f"parameter {layout.global_shape} {p.placements}"
                )
            value = value.to_local()
        elif (
            key in ROLES and isinstance(value, Tensor) and tuple(value.shape) == layout.global_shape
        ):
            index = tuple(
                slice(o, o + n) for o, n in zip(layout.offset, layout.local_shape, strict=True)
            )
            value = value[index]
        out[key] = value
    name = out.get(FORMAT_KEY)
    try:
        fmt = FORMATS[format_name(name, where)] if name is not None else None
    except ValueError:
        return out  # parse_entry refuses it with the same words
    if not isinstance(fmt, QuantizedFormat) or layout.flat_offset is None:
        return out
    whole = -(-layout.size // fmt.block)
    for role in ROLES:
        key = scale_key(role)
        codes, scales = out.get(role), out.get(key)
        if not (isinstance(codes, Tensor) and isinstance(scales, Tensor)):
            continue
        if scales.numel() != whole or tuple(codes.shape) != layout.local_shape:
            continue
        if _host_array(codes).dtype != fmt.codec.code_dtype(role in SIGNED_ROLES):
            continue
        out[role], out[key] = _shard_blocks(fmt, role, layout, codes, scales)
    return out


# -- parameters and accounting -------------------------------------------------------------------


def round_to_bf16_(param: Tensor, values: np.ndarray, rng: np.random.Generator | ShardRng) -> None:
    """Write float32 ``values`` into the bfloat16 CPU tensor ``param``, rounded stochastically
    (:func:`adamkit.formats.bf16.encode_stochastic_at`: unbiased, up with probability (x - lo) /
    (hi - lo)), with one 64-bit word of ``rng`` as the key, whatever the size.  ``rng`` a
    :class:`~adamkit.kernels.stored.ShardRng` (``param`` a local shard): the key from its
    parent and the noise indexed from its offset, so the shard gets the bits of the whole."""
    if isinstance(rng, ShardRng):
        key, offset = rng.key(), rng.offset
    else:
        key, offset = int(rng.bit_generator.random_raw()), 0
    bits = bf16.encode_stochastic_at(values, key, offset)
    param.copy_(_tensor(np.ascontiguousarray(bits)).reshape(param.shape))


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of memory held by the tensors in ``optimizer.state`` (each storage counted once,
    whole: what the allocator holds, not what the views show), ``step`` tensors included; a
    DTensor counts its local shard."""
    seen: dict[tuple[str, int], int] = {}
    for entry in optimizer.state.values():
        for value in local_tensors(entry).values():
            if isinstance(value, Tensor):
                storage = value.untyped_storage()
                seen[(str(value.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


# -- checks, generators and the stochastic rounding of torch's layout ----------------------------


_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def new_rng(process_group: Any = False) -> np.random.Generator:
    """The generator behind stochastic rounding of a new optimizer.

    Seeded from ``torch.initial_seed()``.  With ``process_group`` ``None`` (the default group) or
    a ``ProcessGroup``, and more than one rank in it, every rank takes the seed of the group's
    first rank (one ``broadcast_object_list``, a collective: every rank must construct the
    optimizer), so data-parallel replicas round identically even when the program never called
    ``torch.manual_seed`` (torch gives each process a random initial seed).  ``False``: local.
    """
    # Stochastic rounding follows torch.manual_seed without drawing from torch's generator (which
    # would shift the random numbers of the user's program).
    seed = torch.initial_seed()
    dist = sys.modules.get("torch.distributed")
    if (
        process_group is not False
        and dist is not None
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size(process_group) > 1
    ):
        box = [seed]
        src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
        dist.broadcast_object_list(box, src=src, group=process_group)
        seed = int(box[0])
    return np.random.default_rng((seed, 0x5EED))


def uses_rng(groups: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any group rounds stochastically (bf16-style state or ``param_rounding``)."""
    return any(
        group.get("param_rounding") == "stochastic"
        or (group.get("state") is not None and get_format(group["state"]).needs_rng)
        for group in groups
    )


def saved_rng(saved: Any, current: np.random.Generator) -> np.random.Generator:
    """A generator in the state ``saved`` (a ``bit_generator.state`` dict), or a copy of
    ``current`` for ``None``.  ``ValueError`` for anything else."""
    if saved is None:
        return copy.deepcopy(current)
    name = saved.get("bit_generator") if isinstance(saved, Mapping) else None
    if name not in _BIT_GENERATORS:
        raise ValueError(
            "state_dict['state_rng'] must be the state of a NumPy bit generator "
            f"({', '.join(_BIT_GENERATORS)}), got {type(saved).__name__}"
        )
    bit_generator = getattr(np.random, name)()
    try:
        bit_generator.state = copy.deepcopy(dict(saved))
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"state_dict['state_rng'] is not a valid {name} state: {error}") from None
    return np.random.Generator(bit_generator)


def stored_impl(impl: str, state: str) -> str:
    """The :mod:`adamkit.kernels.stored` implementation for a group's ``impl`` and ``state``."""
    if impl == "torch":
        raise ValueError(
            f"impl='torch' has no step for state={state!r} (compressed state is updated by the "
            "NumPy kernels on the CPU); use impl='auto' or impl='reference'"
        )
    return impl


def check_stored_params(state: str, impl: str, params: Sequence[Tensor]) -> None:
    """Raise unless a group with ``state`` can update ``params`` with ``impl`` (DTensors: see
    :func:`check_shard_layout`)."""
    fmt = get_format(state)
    resolve_stored_impl(stored_impl(impl, state), fmt)
    for p in params:
        if is_dtensor(p):
            check_shard_layout(p, fmt, f"state={state!r}")
        if p.device.type != "cpu":
            raise NotImplementedError(
                f"state={state!r} needs CPU tensors for now, got a parameter on {p.device}; use "
                "state=None (torch's state in the parameter's dtype) on other devices"
            )
        if not p.is_floating_point():
            raise TypeError(f"state={state!r} needs real floating parameters, got {p.dtype}")


def check_rounding_params(params: Sequence[Tensor]) -> None:
    """Raise unless ``param_rounding="stochastic"`` can round every low-precision parameter."""
    for p in params:
        if p.dtype == torch.float16:
            raise NotImplementedError(
                "param_rounding='stochastic' rounds bfloat16 parameters; float16 is not supported"
            )
        if p.dtype == torch.bfloat16 and p.device.type != "cpu":
            raise NotImplementedError(
                f"param_rounding='stochastic' needs CPU tensors for now, got {p.device}"
            )


def widened(
    args: tuple[Any, ...], low: list[int], amsgrad: bool
) -> tuple[tuple[Any, ...], Callable[[np.random.Generator], None]]:
    """``args`` of a step function with the parameters at ``low`` (bfloat16) replaced by float32
    copies (and their gradients and moments), and the function that writes them back: moments
    rounded to nearest (their dtype is torch's), parameters stochastically."""
    params, grads, ms, vs, ws, steps = (list(a) for a in args)
    originals = []
    for i in low:
        originals.append((i, params[i], ms[i], vs[i], ws[i] if amsgrad else None))
        params[i] = params[i].detach().float()
        grads[i] = grads[i].float()
        ms[i] = ms[i].float()
        vs[i] = vs[i].float()
        if amsgrad:
            ws[i] = ws[i].float()

    def finish(rng: np.random.Generator) -> None:
        for i, p, m, v, w in originals:
            m.copy_(ms[i])
            v.copy_(vs[i])
            if w is not None:
                w.copy_(ws[i])
            round_to_bf16_(p, numpy_view(params[i]), rng)

    return (params, grads, ms, vs, ws, steps), finish
