r"""Stateful Adam and AdamW over NumPy arrays, with torch-style (optionally named) parameter groups.

::

    opt = Adam([{"params": [w1, b1], "name": "encoder", "lr": 3e-4},
                {"params": [w2], "name": "head", "weight_decay": 0.0}], lr=1e-3)
    opt.step([g_w1, g_b1, g_w2])            # parameter order across groups; None skips a parameter
    opt.step({"encoder": [g_w1, None], "head": [g_w2]})   # or keyed by group name

The classes here are bookkeeping only: they validate (through :mod:`adamkit.core.config`, so the
messages are those of every other front end), keep per-parameter state, and hand each group to
:func:`adamkit.kernels.adam_update_`, which applies the step specified by
:mod:`adamkit.core.reference`.  ``AdamW`` is ``Adam`` with ``decoupled_weight_decay=True`` and
``weight_decay=1e-2``.

Dtype policy
    Parameters are float32 or float64 ``numpy.ndarray`` (any shape, 0-d and empty included) and are
    updated in place.  The state of a parameter (``exp_avg``, ``exp_avg_sq`` and, with AMSGrad,
    ``max_exp_avg_sq``) has the parameter's shape and dtype, unless its group has a state format
    (``state="fp32"``, ``"bf16"``, ``"int8"``, ...: :mod:`adamkit.formats`); each moment is then a
    :class:`~adamkit.formats.Storage` of that format and the step is computed in float32 between
    decode and encode (:mod:`adamkit.kernels.stored`, which states the sensitive-tensor rule:
    under ``"int8"``, tensors below 4096 elements or 2 dimensions keep float32 moments).
    A gradient may have any real floating dtype (float16/32/64, longdouble): it is rounded to the
    parameter's dtype before the step, so a float64 gradient for a float32 parameter gives exactly
    the result of ``grad.astype(float32)``.  Integer, bool and complex gradients raise
    ``TypeError``.  Non-finite gradients are accepted (what to do with them is the guard's job),
    except by formats that cannot store them (``int8``: ``ValueError``); gradients are never
    written to.

Errors
    Every check of a call runs before anything is modified: a ``ValueError``/``TypeError`` from
    ``__init__``, ``add_param_group``, ``step`` or ``load_state_dict`` leaves parameters, state and
    groups as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

try:
    from numpy.exceptions import TooHardError
except ImportError:  # NumPy < 1.25
    from numpy import TooHardError

from adamkit.core.config import AdamHyperParams, check_flag, validate_hyperparams
from adamkit.formats import StateFormat, Storage, from_state_dict, get_format
from adamkit.kernels import adam_update_, resolve_impl
from adamkit.kernels.stored import (
    adam_update_stored_,
    check_state,
    holds_non_finite,
    param_format,
    resolve_stored_impl,
)

__all__ = ["HYPERPARAM_KEYS", "STATE_FORMAT", "STATE_VERSION", "Adam", "AdamW"]

#: Hyper-parameters every group carries; any of them may differ between groups.
HYPERPARAM_KEYS: tuple[str, ...] = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "bias_correction",
    "decoupled_weight_decay",
)
_GROUP_KEYS = frozenset(("params", "name", "state", *HYPERPARAM_KEYS))
_OPTIONAL_GROUP_KEYS = frozenset({"state"})  # absent in a state_dict group: state=None
_STATE_ARRAYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")

#: ``state_dict()["format"]`` and ``["version"]``: what ``load_state_dict`` accepts.
STATE_FORMAT = "adamkit.numpy.Adam"
STATE_VERSION = 1

_PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _checked_state_option(value: Any, where: str, impl: str) -> str | None:
    """A group's ``state`` through the shared check, prefixed by ``where``; also checks that
    ``impl`` can run the format (``"numba"`` needs a fused kernel for it)."""
    try:
        state = check_state(value)
        if state is not None:
            resolve_stored_impl(impl, get_format(state))
    except (TypeError, ValueError) as exc:
        if not where:
            raise
        raise type(exc)(f"{where}: {exc}") from None
    return state


def _target(state: str | None, param: np.ndarray) -> StateFormat | None:
    """The format of ``param``'s moments in a group with ``state`` (``None``: plain arrays)."""
    return None if state is None else param_format(state, param.shape)


def _entry_format(entry: Mapping[str, Any]) -> str | None:
    moment = entry["exp_avg"]
    return moment.format if isinstance(moment, Storage) else None


def _values(moment: np.ndarray | Storage) -> np.ndarray:
    """A moment as an array (decoded to float32 when stored in a format)."""
    if isinstance(moment, Storage):
        return get_format(moment.format).load(moment)
    return moment


def _new_entry(param: np.ndarray, fmt: StateFormat | None, amsgrad: bool) -> dict[str, Any]:
    roles = _STATE_ARRAYS[: 3 if amsgrad else 2]
    if fmt is None:
        zeros = np.zeros_like(param)
        return {"step": 0, **{role: zeros.copy() for role in roles}}
    return {"step": 0, **{role: fmt.zeros(param.shape, param.dtype, role=role) for role in roles}}


def _converted(
    entry: Mapping[str, Any],
    param: np.ndarray,
    fmt: StateFormat | None,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """``entry`` with its moments in ``fmt`` (``None``: arrays of the parameter's dtype).  A moment
    already in ``fmt`` is kept as it is; others are decoded and stored (``ValueError`` when
    ``fmt`` cannot hold them, e.g. non-finite values in ``int8``)."""
    out: dict[str, Any] = {"step": entry["step"]}
    for role in _STATE_ARRAYS:
        if role not in entry:
            continue
        moment = entry[role]
        if fmt is None:
            out[role] = np.array(_values(moment), dtype=param.dtype)
        elif isinstance(moment, Storage) and moment.format == fmt.name:
            out[role] = moment
        else:
            storage = fmt.zeros(param.shape, param.dtype, role=role)
            fmt.store(storage, _values(moment), rng=rng)
            out[role] = storage
    return out


def _generator(saved: Any, where: str) -> np.random.Generator:
    """A generator in the saved ``bit_generator.state``; ``ValueError`` naming ``where``."""
    name = saved.get("bit_generator") if isinstance(saved, Mapping) else None
    if name not in _BIT_GENERATORS:
        raise ValueError(
            f"{where} must be the state of a NumPy bit generator ({', '.join(_BIT_GENERATORS)})"
        )
    bit_generator = getattr(np.random, name)()
    try:
        bit_generator.state = copy.deepcopy(dict(saved))
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{where} is not a valid {name} state: {exc}") from None
    return np.random.Generator(bit_generator)


def _plain_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _validated(group: Mapping[str, Any], where: str) -> AdamHyperParams:
    """The group's hyper-parameters through the one validator; errors are prefixed by ``where``."""
    try:
        checked = validate_hyperparams(
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
        )
        return AdamHyperParams(
            lr=checked["lr"],
            beta1=checked["betas"][0],
            beta2=checked["betas"][1],
            eps=checked["eps"],
            weight_decay=checked["weight_decay"],
            amsgrad=checked["amsgrad"],
            maximize=checked["maximize"],
            bias_correction=check_flag(group["bias_correction"], "bias_correction"),
            decoupled_weight_decay=check_flag(
                group["decoupled_weight_decay"], "decoupled_weight_decay"
            ),
        )
    except (TypeError, ValueError) as exc:
        if not where:
            raise
        raise type(exc)(f"{where}: {exc}") from None


def _as_group_values(hp: AdamHyperParams) -> dict[str, Any]:
    """The normalised group entries (Python floats/bools, ``betas`` a tuple) of ``hp``."""
    return {
        "lr": hp.lr,
        "betas": (hp.beta1, hp.beta2),
        "eps": hp.eps,
        "weight_decay": hp.weight_decay,
        "amsgrad": hp.amsgrad,
        "maximize": hp.maximize,
        "bias_correction": hp.bias_correction,
        "decoupled_weight_decay": hp.decoupled_weight_decay,
    }


def _check_param(param: Any, where: str, impl: str) -> None:
    if not isinstance(param, np.ndarray):
        raise TypeError(
            f"{where} must be a numpy.ndarray of float32 or float64, got {type(param).__name__}"
        )
    if param.dtype not in _PARAM_DTYPES:
        raise TypeError(f"{where} must have dtype float32 or float64, got {param.dtype}")
    if not param.flags.writeable:
        raise ValueError(f"{where} is read-only (flags.writeable is False); parameters are updated")
    if impl == "numba" and (type(param) is not np.ndarray or not param.flags.c_contiguous):
        raise TypeError(
            f"{where} must be a C-contiguous numpy.ndarray (not a subclass or a strided view) "
            "for impl='numba'; use impl='auto' to fall back to the reference for such arrays"
        )


def _byte_span(a: np.ndarray) -> tuple[int, int]:
    lo = hi = a.ctypes.data
    for n, stride in zip(a.shape, a.strides, strict=True):
        if stride < 0:
            lo += stride * (n - 1)
        else:
            hi += stride * (n - 1)
    return lo, hi + a.itemsize


def _check_no_overlap(params: Sequence[np.ndarray], labels: Sequence[str]) -> None:
    """Reject two parameters that are views of the same memory: each would be updated twice."""
    spans = sorted(
        (_byte_span(p), i) for i, p in enumerate(params) if p.size > 0
    )  # a sweep over address ranges instead of comparing every pair
    for k, ((_, hi), i) in enumerate(spans):
        for (lo2, _), j in spans[k + 1 :]:
            if lo2 >= hi:
                break
            try:
                overlap = np.shares_memory(params[i], params[j], max_work=10_000)
            except TooHardError:
                overlap = True
            if overlap:
                first, second = sorted((i, j))
                raise ValueError(
                    f"{labels[second]} shares memory with {labels[first]}; "
                    "parameters must not overlap (each would be updated twice)"
                )


class Adam:
    r"""Adam (Kingma & Ba, 2015) over NumPy arrays; with ``decoupled_weight_decay=True``, AdamW.

    Per step, for each parameter with a gradient (``t`` counts that parameter's updates)::

        g <- -g                                   if maximize
        g <- g + weight_decay * theta             coupled L2 (decoupled_weight_decay=False)
        theta <- theta * (1 - lr * weight_decay)  decoupled (AdamW)
        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2;   v_max <- max(v_max, v)
        m_hat = m / (1 - beta1^t);   v_hat = (v_max if amsgrad else v) / (1 - beta2^t)
        theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

    (both corrections are 1 with ``bias_correction=False``); see :mod:`adamkit.core.reference`.

    ``params`` is an iterable of arrays (one group) or of group dicts with the key ``"params"`` (an
    array or an iterable of arrays), optionally ``"name"`` (a unique non-empty str) and any of
    :data:`HYPERPARAM_KEYS`, which default to this constructor's arguments.  ``impl`` picks the
    kernel (see :mod:`adamkit.kernels`): ``"auto"`` uses the fused numba kernel where it applies
    and the reference elsewhere; ``"numba"`` requires C-contiguous plain ``ndarray`` parameters
    (checked here, ``TypeError``) and numba itself (``ImportError``).

    ``state`` (also a group key, overriding it per group) chooses how moments are stored:
    ``None`` (default) arrays of the parameter's dtype, or a format name of
    :mod:`adamkit.formats` (``"fp32"``, ``"bf16"``, ``"int8"``, ``"int8-companded"``).  ``seed``
    seeds the generator behind stochastic rounding (``bf16``); it is saved in
    :meth:`state_dict`, so a resumed run rounds like an uninterrupted one.  Formats that cannot
    hold NaN/inf (``int8``) make :meth:`step` refuse non-finite gradients (``ValueError``,
    nothing changed).

    Raises ``TypeError`` for non-arrays, other dtypes, unknown group keys and badly typed
    hyper-parameters; ``ValueError`` for read-only arrays, empty parameter lists, an array given
    twice (or two overlapping views), duplicate names, out-of-range hyper-parameters and unknown
    ``impl``.

    Attributes: ``param_groups`` (list of dicts, like torch: hyper-parameters may be changed
    between steps and are validated at the start of the next ``step()``; ``"params"`` must not be
    edited, use :meth:`add_param_group`; ``amsgrad`` cannot change once a parameter of the group
    has state), ``defaults``, ``impl`` and :attr:`state`.
    """

    def __init__(
        self,
        params: Iterable[np.ndarray] | Iterable[Mapping[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        bias_correction: bool = True,
        decoupled_weight_decay: bool = False,
        impl: str = "auto",
        state: str | None = None,
        seed: int | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "bias_correction": bias_correction,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        self.defaults: dict[str, Any] = _as_group_values(_validated(defaults, ""))
        resolve_impl(impl)
        self.defaults["state"] = _checked_state_option(state, "", impl)
        if seed is not None and (not _plain_int(seed) or seed < 0):
            raise TypeError(f"seed must be None or an int >= 0, got {type(seed).__name__} {seed!r}")
        self._rng = np.random.default_rng(seed)
        self.impl = impl
        self.param_groups: list[dict[str, Any]] = []
        self._params: list[np.ndarray] = []  # flat, in group order: the index used by state
        self._state: dict[int, dict[str, Any]] = {}

        if isinstance(params, (np.ndarray, Mapping, str, bytes, set, frozenset)):
            raise TypeError(
                "params must be a list of arrays or of group dicts, got "
                f"{type(params).__name__} (wrap a single array or group in a list)"
            )
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        if all(isinstance(item, Mapping) for item in items):
            groups = items
        elif any(isinstance(item, Mapping) for item in items):
            raise TypeError("params must be all arrays or all group dicts, not a mix")
        else:
            groups = [{"params": items}]
        for group in groups:
            self.add_param_group(group)

    @property
    def state(self) -> Mapping[int, dict[str, Any]]:
        """Per-parameter state, keyed by the parameter's position across groups (read-only view).

        An entry exists once the parameter has been updated: ``{"step": int, "exp_avg": ndarray,
        "exp_avg_sq": ndarray}`` plus ``"max_exp_avg_sq"`` with AMSGrad; arrays are the live
        buffers (modify them only through :meth:`load_state_dict`).  In a group with a state
        format the moments are :class:`~adamkit.formats.Storage` objects of that format.
        """
        return MappingProxyType(self._state)

    def state_nbytes(self) -> int:
        """Bytes held by the moments of every parameter (arrays, or codes and scales)."""
        total = 0
        for entry in self._state.values():
            for role in _STATE_ARRAYS:
                moment = entry.get(role)
                if isinstance(moment, Storage):
                    total += get_format(moment.format).nbytes(moment)
                elif moment is not None:
                    total += moment.nbytes
        return total

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Validate ``param_group`` and append it; missing hyper-parameters take ``defaults``.

        Raises like the constructor and then changes nothing.
        """
        index = len(self.param_groups)
        where = f"param_groups[{index}]"
        if not isinstance(param_group, Mapping):
            raise TypeError(f"{where} must be a dict, got {type(param_group).__name__}")
        unknown = sorted(map(str, set(param_group) - _GROUP_KEYS))
        if unknown:
            raise TypeError(
                f"{where} has unknown key {unknown[0]!r}; allowed keys: "
                f"'params', 'name', 'state', {', '.join(map(repr, HYPERPARAM_KEYS))}"
            )
        if "params" not in param_group:
            raise ValueError(f"{where} has no 'params' key")
        params = param_group["params"]
        if isinstance(params, np.ndarray):
            params = [params]
        elif isinstance(params, (Mapping, str, bytes, set, frozenset)) or not isinstance(
            params, Iterable
        ):
            raise TypeError(
                f"{where}['params'] must be an array or a list of arrays, got "
                f"{type(params).__name__}"
            )
        params = list(params)
        if not params:
            raise ValueError(f"{where} has no parameters ('params' is empty)")
        labels = [f"{where}['params'][{i}]" for i in range(len(params))]
        for param, label in zip(params, labels, strict=True):
            _check_param(param, label, self.impl)
        self._check_distinct(params, labels)
        name = param_group.get("name")
        self._check_name(name, where, [g["name"] for g in self.param_groups])
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        values = _as_group_values(_validated(merged, where))
        state = _checked_state_option(merged["state"], where, self.impl)

        self.param_groups.append({"params": params, **values, "name": name, "state": state})
        self._params.extend(params)

    def _check_distinct(self, new: list[np.ndarray], labels: list[str]) -> None:
        old_labels = [
            f"param_groups[{g}]['params'][{i}]"
            for g, group in enumerate(self.param_groups)
            for i in range(len(group["params"]))
        ]
        seen: dict[int, str] = {
            id(p): label for p, label in zip(self._params, old_labels, strict=True)
        }
        for p, label in zip(new, labels, strict=True):
            if id(p) in seen:
                raise ValueError(
                    f"{label} is the same array as {seen[id(p)]}; each may appear once"
                )
            seen[id(p)] = label
        _check_no_overlap([*self._params, *new], [*old_labels, *labels])

    @staticmethod
    def _check_name(name: Any, where: str, others: list[Any]) -> None:
        if name is None:
            return
        if not isinstance(name, str):
            raise TypeError(f"{where}['name'] must be a str or None, got {type(name).__name__}")
        if not name:
            raise ValueError(f"{where}['name'] must be a non-empty str")
        if name in others:
            raise ValueError(f"{where}['name'] {name!r} is already used by another group")

    def _check_groups(self, hyperparams: bool = True) -> list[AdamHyperParams]:
        """Check ``param_groups`` as the user may have edited them; return the hyper-params.

        With ``hyperparams=False`` only the parameters and names are checked (and ``[]`` is
        returned): what ``load_state_dict`` needs, since it replaces the hyper-parameters.
        """
        hps = []
        names: list[Any] = []
        start = 0
        for g, group in enumerate(self.param_groups):
            where = f"param_groups[{g}]"
            unknown = sorted(map(str, set(group) - _GROUP_KEYS))
            if unknown and hyperparams:
                raise TypeError(f"{where} has unknown key {unknown[0]!r}")
            required = ("params", "name", *(HYPERPARAM_KEYS if hyperparams else ()))
            missing = [k for k in required if k not in group]
            if missing:
                raise ValueError(f"{where} lacks the key {missing[0]!r}")
            params = group["params"]
            registered = self._params[start : start + len(params)]
            if len(params) != len(registered) or any(
                p is not q for p, q in zip(params, registered, strict=True)
            ):
                raise ValueError(
                    f"{where}['params'] was changed after the group was added; "
                    "use add_param_group() to add parameters"
                )
            self._check_name(group["name"], where, names)
            names.append(group["name"])
            hp = _validated(group, where) if hyperparams else None
            if hyperparams:
                _checked_state_option(group.get("state"), where, self.impl)
            for i, param in enumerate(params):
                label = f"{where}['params'][{i}]"
                _check_param(param, label, self.impl)
                state = self._state.get(start + i)
                if state is None or hp is None:
                    continue
                moment = state["exp_avg"]
                dtype = param.dtype if isinstance(moment, Storage) else moment.dtype
                if moment.shape != param.shape or dtype != param.dtype:
                    raise ValueError(
                        f"{label} now has shape {param.shape} and dtype {param.dtype}, but its "
                        f"state has {moment.shape} and {dtype}"
                    )
                if ("max_exp_avg_sq" in state) != hp.amsgrad:
                    raise ValueError(
                        f"{where}: amsgrad was changed to {hp.amsgrad} after {label} got state; "
                        "amsgrad cannot change mid-run (load a state_dict or start afresh)"
                    )
            if hp is not None:
                hps.append(hp)
            start += len(params)
        if start != len(self._params):
            raise ValueError("param_groups was changed; use add_param_group() to add groups")
        return hps

    def _flat_grads(self, grads: Any) -> list[tuple[Any, str]]:
        """Gradients in flat parameter order, each with the label used in error messages."""
        if isinstance(grads, Mapping):
            names = [group["name"] for group in self.param_groups]
            if None in names:
                raise ValueError(
                    "step() got gradients keyed by group name, but param_groups"
                    f"[{names.index(None)}] has no name; name every group or pass a list"
                )
            unknown = [key for key in grads if key not in names]
            if unknown:
                raise ValueError(
                    f"step() got gradients for unknown group {unknown[0]!r}; groups: {names}"
                )
            missing = [name for name in names if name not in grads]
            if missing:
                raise ValueError(f"step() got no gradients for group {missing[0]!r}")
            flat = []
            for name, group in zip(names, self.param_groups, strict=True):
                entries = grads[name]
                if not isinstance(entries, (list, tuple)):
                    raise TypeError(
                        f"grads[{name!r}] must be a list or tuple, got {type(entries).__name__}"
                    )
                if len(entries) != len(group["params"]):
                    raise ValueError(
                        f"grads[{name!r}] has {len(entries)} entries, expected "
                        f"{len(group['params'])} (one per parameter of the group, None to skip)"
                    )
                flat.extend((g, f"grads[{name!r}][{i}]") for i, g in enumerate(entries))
            return flat
        if not isinstance(grads, (list, tuple)):
            raise TypeError(
                "grads must be a list/tuple (one entry per parameter) or a dict keyed by group "
                f"name, got {type(grads).__name__}"
            )
        if len(grads) != len(self._params):
            raise ValueError(
                f"step() got {len(grads)} gradients, expected {len(self._params)} "
                "(one per parameter, in group order, None to skip)"
            )
        return [(g, f"grads[{i}]") for i, g in enumerate(grads)]

    @staticmethod
    def _checked_grad(grad: Any, param: np.ndarray, where: str) -> np.ndarray | None:
        if grad is None:
            return None
        array = np.asarray(grad)
        if array.dtype.kind != "f":
            raise TypeError(f"{where} must have a real floating dtype, got {array.dtype}")
        if array.shape != param.shape:
            raise ValueError(
                f"{where} has shape {array.shape}, expected {param.shape} (its parameter's)"
            )
        if array.dtype != param.dtype or np.may_share_memory(array, param):
            # a private copy, rounded to the parameter's dtype and not aliasing what the kernel
            # writes (a gradient that is, or overlaps, its own parameter)
            order = "C" if param.flags.c_contiguous else "K"
            return np.array(array, dtype=param.dtype, order=order)
        if param.flags.c_contiguous and not array.flags.c_contiguous:
            return np.ascontiguousarray(array)  # the fused kernel takes C-contiguous arrays only
        return array

    def step(
        self, grads: Sequence[np.ndarray | None] | Mapping[str, Sequence[np.ndarray | None]]
    ) -> None:
        """Apply one update to every parameter that has a gradient; return ``None``.

        ``grads`` is a list/tuple with one entry per parameter in group order, or a dict mapping
        every group's name to such a list for that group.  ``None`` skips a parameter (its state
        and step count stay as they are, like a torch parameter whose ``grad`` is ``None``).  Each
        gradient has its parameter's shape and a real floating dtype (see the module docstring).

        Raises ``TypeError``/``ValueError`` for a wrong structure, count, shape or dtype and for
        invalid hyper-parameters in ``param_groups``, before anything is modified.
        """
        hps = self._check_groups()
        flat = self._flat_grads(grads)
        checked = [
            self._checked_grad(g, p, where)
            for (g, where), p in zip(flat, self._params, strict=True)
        ]

        self._check_encodable(checked, [where for _, where in flat])

        start = 0
        for group, hp in zip(self.param_groups, hps, strict=True):
            indices = [
                start + i for i in range(len(group["params"])) if checked[start + i] is not None
            ]
            start += len(group["params"])
            if indices:
                self._update_group(indices, [checked[i] for i in indices], hp, group.get("state"))

    def _check_encodable(self, grads: list[np.ndarray | None], labels: list[str]) -> None:
        # int8 codes cannot hold NaN/inf: refuse such a step before anything changes.
        start = 0
        for group in self.param_groups:
            count = len(group["params"])
            state = group.get("state")
            if state is not None and not holds_non_finite(get_format(state)):
                rows = zip(grads[start : start + count], labels[start : start + count], strict=True)
                for g, label in rows:
                    if g is not None and not np.isfinite(g).all():
                        raise ValueError(
                            f"{label} has non-finite values, which state={state!r} cannot "
                            "store; nothing was changed (skip such steps before step())"
                        )
            start += count

    def _update_group(
        self,
        indices: list[int],
        grads: list[np.ndarray],
        hp: AdamHyperParams,
        state_option: str | None,
    ) -> None:
        states = []
        for i in indices:
            param = self._params[i]
            fmt = _target(state_option, param)
            state = self._state.get(i)
            if state is None:
                state = _new_entry(param, fmt, hp.amsgrad)
            elif _entry_format(state) != (None if fmt is None else fmt.name):
                # the group's state was changed since: re-encode in the new format
                state = _converted(state, param, fmt, self._rng)
            states.append(state)
        steps = [state["step"] + 1 for state in states]
        if state_option is not None:
            self._update_stored(indices, grads, states, steps, hp)
            return
        adam_update_(
            [self._params[i] for i in indices],
            grads,
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [state.get("max_exp_avg_sq") for state in states],
            steps,
            hp,
            impl=self.impl,
        )
        for i, state, step in zip(indices, states, steps, strict=True):
            state["step"] = step
            self._state[i] = state

    def _update_stored(
        self,
        indices: list[int],
        grads: list[np.ndarray],
        states: list[dict[str, Any]],
        steps: list[int],
        hp: AdamHyperParams,
    ) -> None:
        # One dispatcher call per format (the sensitive-tensor rule may mix two in a group).
        buckets: dict[str, tuple[StateFormat, list[tuple[Any, ...]]]] = {}
        for i, grad, state, step in zip(indices, grads, states, steps, strict=True):
            fmt = get_format(_entry_format(state))
            row = (
                self._params[i],
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                state.get("max_exp_avg_sq"),
                step,
            )
            buckets.setdefault(fmt.name, (fmt, []))[1].append(row)
        for fmt, rows in buckets.values():
            columns = [list(column) for column in zip(*rows, strict=True)]
            adam_update_stored_(fmt, *columns, hp, rng=self._rng, impl=self.impl)
        for i, state, step in zip(indices, states, steps, strict=True):
            state["step"] = step
            self._state[i] = state

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the optimizer as plain Python and NumPy objects (arrays are copies).

        ``{"format": STATE_FORMAT, "version": STATE_VERSION, "state": {index: {"step": int,
        "exp_avg": ndarray, "exp_avg_sq": ndarray[, "max_exp_avg_sq": ndarray]}}, "param_groups":
        [{hyper-parameters..., "name": str | None, "params": [index, ...]}]}``, where ``index`` is
        a parameter's position across groups (as in torch).  Raises like :meth:`step` if
        ``param_groups`` holds invalid values.

        With state formats (optional entries, absent otherwise, so a ``state=None`` dict is the
        same as before formats existed): a group has ``"state"`` (the format name), a moment
        stored in a format is the dict of ``StateFormat.to_state_dict`` (its compact form: codes
        and scales, or bf16 bits, with the format named in it), and ``"rng"`` holds the state of
        the generator behind stochastic rounding.
        """
        hps = self._check_groups()
        groups = []
        start = 0
        for group, hp in zip(self.param_groups, hps, strict=True):
            count = len(group["params"])
            saved = {
                **_as_group_values(hp),
                "name": group["name"],
                "params": list(range(start, start + count)),
            }
            if group.get("state") is not None:
                saved["state"] = group["state"]
            groups.append(saved)
            start += count
        state = {
            index: {key: _saved_value(value) for key, value in entry.items()}
            for index, entry in sorted(self._state.items())
        }
        out = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "state": state,
            "param_groups": groups,
        }
        if any(group.get("state") is not None for group in self.param_groups):
            out["rng"] = copy.deepcopy(self._rng.bit_generator.state)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace hyper-parameters and state by those of ``state_dict`` (from :meth:`state_dict`).

        Groups are matched by position and must have the same sizes; a saved group name must equal
        the current group's name.  Each state entry must have the keys of its group's ``amsgrad``
        setting, an int ``step`` >= 0, and arrays of its parameter's shape and exact dtype
        (``exp_avg_sq``/``max_exp_avg_sq`` without negative entries).  Arrays are copied.

        State formats: each group keeps *this* optimizer's ``state``, and every moment is
        converted to the format its parameter has here (plain arrays, ``fp32``, ``bf16``,
        ``int8``, ... in any direction; the same format is taken exactly).  A saved moment in a
        format is validated by that format (registered name, version, shape, code length, dtype
        and range); values the target cannot hold (non-finite into ``int8``) are refused.

        Everything is checked first: a bad dict raises ``ValueError`` (values, structure) or
        ``TypeError`` (types) and leaves the optimizer unchanged.  Invalid hyper-parameters set in
        ``param_groups`` since the last step do not prevent loading; the loaded ones replace them.
        """
        self._check_groups(hyperparams=False)
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        _check_keys(
            state_dict, {"format", "version", "state", "param_groups"}, "state_dict", {"rng"}
        )
        if state_dict["format"] != STATE_FORMAT:
            raise ValueError(
                f"state_dict['format'] must be {STATE_FORMAT!r}, got {state_dict['format']!r}"
            )
        version = state_dict["version"]
        if not _plain_int(version) or version != STATE_VERSION:
            raise ValueError(
                f"state_dict['version'] {version!r} is not supported (this adamkit reads "
                f"version {STATE_VERSION})"
            )
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError(
                f"state_dict['param_groups'] must be a list, got {type(saved_groups).__name__}"
            )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} parameter groups, the optimizer has "
                f"{len(self.param_groups)}"
            )
        new_values = []
        position: dict[int, int] = {}  # saved parameter index -> position in self._params
        group_of: list[AdamHyperParams] = []
        targets: list[StateFormat | None] = []
        rng = (
            _generator(state_dict["rng"], "state_dict['rng']")
            if "rng" in state_dict
            else copy.deepcopy(self._rng)
        )
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            where = f"state_dict['param_groups'][{g}]"
            if not isinstance(saved, Mapping):
                raise TypeError(f"{where} must be a dict, got {type(saved).__name__}")
            _check_keys(saved, set(_GROUP_KEYS - _OPTIONAL_GROUP_KEYS), where, _OPTIONAL_GROUP_KEYS)
            _checked_state_option(saved.get("state"), where, "reference")
            ids = saved["params"]
            if not isinstance(ids, (list, tuple)) or not all(_plain_int(i) for i in ids):
                raise TypeError(f"{where}['params'] must be a list of int indices")
            if len(ids) != len(group["params"]):
                raise ValueError(
                    f"{where} has {len(ids)} parameters, param_groups[{g}] has "
                    f"{len(group['params'])}"
                )
            for i in ids:
                if int(i) in position:
                    raise ValueError(f"{where}['params'] repeats the index {int(i)}")
                position[int(i)] = len(position)
            if saved["name"] is not None and saved["name"] != group["name"]:
                raise ValueError(
                    f"{where}['name'] is {saved['name']!r}, but param_groups[{g}] is named "
                    f"{group['name']!r}"
                )
            hp = _validated(saved, where)
            new_values.append(_as_group_values(hp))
            group_of.extend([hp] * len(ids))
            targets.extend(_target(group.get("state"), p) for p in group["params"])

        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise TypeError(f"state_dict['state'] must be a dict, got {type(saved_state).__name__}")
        new_state: dict[int, dict[str, Any]] = {}
        for key, entry in saved_state.items():
            if not _plain_int(key):
                raise TypeError(f"state_dict['state'] keys must be int indices, got {key!r}")
            if int(key) not in position:
                raise ValueError(f"state_dict['state'] has index {int(key)}, which no group lists")
            index = position[int(key)]
            where = f"state_dict['state'][{int(key)}]"
            checked = _checked_state(entry, self._params[index], group_of[index], where)
            try:
                new_state[index] = _converted(checked, self._params[index], targets[index], rng)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None

        for group, values in zip(self.param_groups, new_values, strict=True):
            group.update(values)
        self._state = new_state
        self._rng = rng

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for g, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {g}")
            for key in sorted(group):
                if key != "params":
                    lines.append(f"    {key}: {group[key]}")
            sizes = sum(p.size for p in group["params"])
            lines.append(f"    params: {len(group['params'])} arrays, {sizes} elements")
        lines.append(")")
        return "\n".join(lines)


def _saved_value(value: Any) -> Any:
    if isinstance(value, Storage):
        return get_format(value.format).to_state_dict(value)
    return value.copy() if isinstance(value, np.ndarray) else value


def _check_keys(
    mapping: Mapping[str, Any],
    expected: set[str],
    where: str,
    optional: Iterable[str] = (),
) -> None:
    missing = sorted(expected - set(mapping))
    if missing:
        raise ValueError(f"{where} lacks the key {missing[0]!r}")
    unknown = sorted(map(repr, set(mapping) - expected - set(optional)))
    if unknown:
        raise ValueError(f"{where} has unknown key {unknown[0]}")


def _checked_state(
    entry: Any, param: np.ndarray, hp: AdamHyperParams, where: str
) -> dict[str, Any]:
    """A validated private copy of one saved per-parameter state entry."""
    if not isinstance(entry, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
    if hp.amsgrad and "max_exp_avg_sq" not in entry:
        raise ValueError(f"{where} lacks 'max_exp_avg_sq', which its group's amsgrad=True needs")
    if not hp.amsgrad and "max_exp_avg_sq" in entry:
        raise ValueError(f"{where} has 'max_exp_avg_sq', but its group has amsgrad=False")
    keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if hp.amsgrad else set())
    _check_keys(entry, keys, where)
    step = entry["step"]
    if not _plain_int(step):
        raise TypeError(f"{where}['step'] must be an int, got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"{where}['step'] must be >= 0, got {step}")
    out: dict[str, Any] = {"step": int(step)}
    for key in _STATE_ARRAYS:
        if key not in keys:
            continue
        array = entry[key]
        label = f"{where}[{key!r}]"
        if isinstance(array, Mapping):
            out[key] = _checked_storage(array, param, key, label)
            continue
        if not isinstance(array, np.ndarray):
            raise TypeError(
                f"{label} must be a numpy.ndarray, got {type(array).__name__} (or, for a moment "
                "in a state format, that format's dict)"
            )
        if array.dtype != param.dtype:
            raise TypeError(
                f"{label} has dtype {array.dtype}, expected {param.dtype} (its parameter's)"
            )
        if array.shape != param.shape:
            raise ValueError(
                f"{label} has shape {array.shape}, expected {param.shape} (its parameter's)"
            )
        if key != "exp_avg" and bool(np.any(array < 0)):
            raise ValueError(f"{label} has negative entries; a second moment is >= 0")
        out[key] = array.copy()
    return out


def _checked_storage(saved: Mapping[str, Any], param: np.ndarray, role: str, label: str) -> Storage:
    """A moment saved in a state format, validated by that format for ``param``'s shape."""
    try:
        storage = from_state_dict(saved, param.shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{label}: {exc}") from None
    if storage.role != role:
        raise ValueError(f"{label} holds the role {storage.role!r}, expected {role!r}")
    if role != "exp_avg" and bool(np.any(_values(storage) < 0)):
        raise ValueError(f"{label} has negative entries; a second moment is >= 0")
    return storage


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter): :class:`Adam` with ``decoupled_weight_decay=True``.

    The only other difference is the default ``weight_decay=1e-2`` (torch's).  The decay is
    ``theta <- theta * (1 - lr * weight_decay)`` before the Adam update; everything else, including
    errors and the state_dict format, is :class:`Adam`'s.
    """

    def __init__(
        self,
        params: Iterable[np.ndarray] | Iterable[Mapping[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        bias_correction: bool = True,
        impl: str = "auto",
        state: str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            bias_correction=bias_correction,
            decoupled_weight_decay=True,
            impl=impl,
            state=state,
            seed=seed,
        )
