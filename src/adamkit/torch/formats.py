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
``state_format``      (absent)         ``"fp32"``          ``"bf16"``          ``"int8"``
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
``exp_avg`` and blocks of 32.

The step computes on the CPU through NumPy views that share memory with these tensors
(:func:`storage_of`); other devices raise ``NotImplementedError``.  Loading converts between
formats (:func:`convert_entry`): ``load`` of the source format to float32, ``store`` into the
target's.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from adamkit.formats import FORMATS, QuantizedFormat, StateFormat, Storage, bf16, get_format
from adamkit.formats.base import STATE_DICT_VERSION
from adamkit.kernels.stored import check_state, resolve_stored_impl

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
    "round_to_bf16_",
    "saved_rng",
    "scale_key",
    "state_nbytes",
    "storage_of",
    "stored_impl",
    "widened",
]

FORMAT_KEY = "state_format"
"""Per-parameter state key naming the format of a compressed entry (absent: torch's layout)."""

ROLES: tuple[str, ...] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

PARAM_ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
"""``param_rounding``: how a bfloat16 parameter takes its update.  ``"nearest"`` (torch's):
updates below half a bf16 spacing of the parameter (2**-9 relative) are lost;
``"stochastic"``: the new value is computed in float32 and rounded up or down with the
probabilities that make it unbiased, so many tiny updates add up on average."""


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


def new_entry(fmt: StateFormat, shape: tuple[int, ...], step: Tensor, amsgrad: bool) -> dict:
    """Zero state for a parameter of ``shape`` in ``fmt`` (CPU tensors), with ``step``."""
    entry: dict[str, Any] = {"step": step, FORMAT_KEY: fmt.name}
    for role in ROLES[: 3 if amsgrad else 2]:
        entry.update(_tensors_of(fmt.zeros(shape, np.float32, role=role), shape))
    return entry


def add_moment(fmt: StateFormat, entry: dict[str, Any], role: str, shape: tuple[int, ...]) -> None:
    """Add a zero ``role`` moment to ``entry`` (AMSGrad switched on mid-run: ``max(0, v) = v``)."""
    entry.update(_tensors_of(fmt.zeros(shape, np.float32, role=role), shape))


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
    fmt: StateFormat, state: Mapping[str, Any], role: str, shape: tuple[int, ...], where: str
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


def parse_entry(
    state: Any,
    shape: tuple[int, ...],
    dtype: torch.dtype | None,
    amsgrad: bool,
    where: str,
) -> ParsedEntry | None:
    """Validate one saved per-parameter entry for a parameter of ``shape`` and ``dtype``.

    ``None`` for an empty entry.  Torch's layout (no ``state_format``): moments must be tensors of
    the parameter's shape and, unless ``dtype`` is ``None``, its dtype (``ValueError``: torch
    would cast silently).  A compressed entry must name a registered format and hold exactly its
    tensors, of the parameter's shape, with codes, scales and bits that the format's
    ``from_state_dict`` accepts (code dtype and range, one finite scale >= 0 per block, ...).
    ``max_exp_avg_sq`` must be present when ``amsgrad``.  Raises ``ValueError``/``TypeError``
    prefixed by ``where``; copies what it keeps and modifies nothing.
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
    if not isinstance(name, str) or name not in FORMATS or name == "native":
        known = ", ".join(repr(k) for k in FORMATS if k != "native")
        raise ValueError(f"{where}: unknown state format {name!r} (known: {known})")
    fmt = FORMATS[name]
    allowed = {"step", FORMAT_KEY, *roles, *(scale_key(r) for r in roles)}
    extra = sorted(map(str, set(state) - allowed))
    if extra:
        raise ValueError(f"{where}: unexpected entries {extra} in {name!r} state")
    storages = {role: _saved_storage(fmt, state, role, shape, where) for role in roles}
    return ParsedEntry(name, state["step"], storages)  # type: ignore[arg-type]


def _values(entry: ParsedEntry, role: str) -> np.ndarray:
    source = entry.moments[role]
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
    ``ValueError`` when ``target`` cannot hold the values (non-finite into ``int8``).
    """
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


# -- parameters and accounting -------------------------------------------------------------------


def round_to_bf16_(param: Tensor, values: np.ndarray, rng: np.random.Generator) -> None:
    """Write float32 ``values`` into the bfloat16 CPU tensor ``param``, rounded stochastically
    (:func:`adamkit.formats.bf16.encode_stochastic`: unbiased, up with probability (x - lo) /
    (hi - lo))."""
    bits = bf16.encode_stochastic(values, rng)
    param.copy_(_tensor(np.ascontiguousarray(bits)).reshape(param.shape))


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of memory held by the tensors in ``optimizer.state`` (each storage counted once,
    whole: what the allocator holds, not what the views show), ``step`` tensors included."""
    seen: dict[tuple[str, int], int] = {}
    for entry in optimizer.state.values():
        for value in entry.values():
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
    """Raise unless a group with ``state`` can update ``params`` with ``impl``."""
    resolve_stored_impl(stored_impl(impl, state), get_format(state))
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    for p in params:
        if dtensor is not None and isinstance(p, dtensor):
            raise NotImplementedError(
                f"state={state!r} does not support DTensor parameters (FSDP2) yet; use state=None"
            )
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
