r"""Adam steps on moments kept in a state format, the one place that chooses how, and which format
each parameter gets.

A state format (:mod:`adamkit.formats`) is a codec; the arithmetic stays
:func:`adamkit.core.reference.adam_step`, in float32 between decode and encode ("compute in fp32,
store compressed").  The plain path is the oracle of every faster one::

    m, v = fmt.load(sm), fmt.load(sv)                         (v_max too with AMSGrad)
    p, new = adam_step(p, g, AdamState(t - 1, m, v, v_max), hp)
    fmt.store(sm, new.exp_avg, rng); fmt.store(sv, new.exp_avg_sq, rng)

Implementations (``impl=``, the names of :mod:`adamkit.kernels`):

- ``"reference"``: the plain path above, parameter by parameter.
- ``"numba"``: :mod:`adamkit.kernels.numba_formats`, one fused pass per parameter in float32 with
  the hardware FMA: it follows the plain path within a few float32 ulps of the update for the
  parameter and one code (or bf16 ulp) for the stored moments, where a moment sits at a rounding
  boundary (bf16 stochastic rounding agrees in distribution; the tolerances are stated there).
  Needs numba (``ImportError``) and a format it has a kernel for (``TypeError``); every parameter
  must qualify (C-contiguous float32/float64 arrays), else ``TypeError`` before any update.
- ``"auto"`` (default): ``"numba"`` for the parameters that qualify when numba is installed and
  the format has a kernel, ``"reference"`` for the rest.

AMSGrad on stored state: the running maximum is taken in float32 over the *decoded* stored
``v_max`` and the new ``v``, then re-encoded.  So it is the maximum over what was stored, not over
the exact history: with ``int8`` each stored value is its block's code (``sqrt(v_max)`` rounded to
the nearest of the 256 levels of its block maximum) and may sit up to half a code gap below the
true running maximum; with ``bf16`` up to one bf16 ulp (stochastic rounding) either way.

Which format a parameter gets (:func:`param_format`), the documented default rule.  A group's
``state`` names its format; under a block-quantized format (``"int8"``, ``"int8-blockwise"``) these
*sensitive* parameters keep float32 moments instead (8-bit state on embeddings is a known cause of
divergence, Dettmers et al. 2021, and norms and biases cost nothing to keep exact):

1. tensors with fewer than :data:`~adamkit.formats.MIN_QUANTIZED_SIZE` (4096) elements: the format
   itself stores them densely in float32 (the per-block scale would cost more than it saves);
2. tensors with fewer than two dimensions: biases and normalisation scales and shifts;
3. parameters whose name is known (torch: ``model.named_parameters()`` or ``param_names``) and
   matches :func:`is_sensitive_name`: embeddings and normalisation layers by their usual names;
4. any group the user marks with its own ``state`` (e.g. ``{"params": emb, "state": "fp32"}``).

``bf16`` and ``fp32`` apply to every parameter.

Shards (FSDP2): the update of a contiguous flat part of a larger parameter takes
``rng=ShardRng(generator, offset)`` (one parameter per call): the fused kernel then draws the
parameter's key from ``generator`` as a one-process call draws it and indexes its bf16 rounding
noise by global element position (``offset + i``), so every shard rounds with exactly the bits
the whole tensor gets in one process.  The plain path, a fallback and :func:`update_through_`
round with the generator's stream instead, which cannot be indexed: they get a generator of the
shard's own (:meth:`ShardRng.generator`), so shards agree with one process only in distribution.

Non-finite values: ``int8`` codes cannot hold NaN or inf (:func:`holds_non_finite`).  The plain
path checks before it writes anything of a parameter and raises ``ValueError``; the fused kernel
raises after the parameter's pass (see :mod:`adamkit.kernels.numba_formats`).  Front ends skip
non-finite steps before this point (the guard's non-finite check, or a check of the gradients).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import AdamState, adam_step
from adamkit.formats import FORMATS, QuantizedFormat, StateFormat, Storage, get_format
from adamkit.kernels import IMPLS, numba_available

__all__ = [
    "SENSITIVE_NAME_PARTS",
    "SENSITIVE_NAME_SEGMENTS",
    "SENSITIVE_STATE",
    "ShardRng",
    "adam_update_stored_",
    "all_finite",
    "check_state",
    "holds_non_finite",
    "is_sensitive_name",
    "param_format",
    "plain_step_",
    "resolve_stored_impl",
    "update_through_",
]

SENSITIVE_STATE = "fp32"
"""The format sensitive parameters get under a block-quantized ``state``."""

SENSITIVE_NAME_PARTS: tuple[str, ...] = ("embed", "norm")
"""Case-insensitive substrings of a parameter name that mark it as sensitive (``embed_tokens``,
``word_embeddings``, ``tok_embeddings``, ``layernorm``, ``norm.weight``, ...)."""

SENSITIVE_NAME_SEGMENTS: frozenset[str] = frozenset({"wte", "wpe"})
"""Dotted name segments that mark a parameter as sensitive: GPT-2's token and position embeddings
(``transformer.wte.weight``)."""

_ROLES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_NOT_LOADED = object()
_fused_module: ModuleType | object | None = _NOT_LOADED


@dataclasses.dataclass(frozen=True)
class ShardRng:
    """Stochastic rounding for one parameter that is the contiguous flat range starting at
    element ``offset`` of a larger tensor (a local shard under FSDP2): ``parent`` is the generator
    a one-process run would use for the whole tensor (the same state on every rank).

    Each use draws exactly one 64-bit word of ``parent`` for the parameter (two for the fused
    kernel with AMSGrad), as a one-process update draws it, whatever the shard's size, so
    ``parent`` advances alike on every rank.  Pass it as ``rng`` to :func:`adam_update_stored_`
    and :func:`update_through_`, or to ``adamkit.torch.formats.round_to_bf16_``.
    ``ValueError`` for a negative ``offset``, ``TypeError`` unless ``parent`` is a
    ``numpy.random.Generator``.
    """

    parent: np.random.Generator
    offset: int

    def __post_init__(self) -> None:
        if not isinstance(self.parent, np.random.Generator):
            raise TypeError(
                f"parent must be a numpy.random.Generator, got {type(self.parent).__name__}"
            )
        if isinstance(self.offset, bool) or not isinstance(self.offset, int | np.integer):
            raise TypeError(f"offset must be an int, got {type(self.offset).__name__}")
        if self.offset < 0:
            raise ValueError(f"offset must be >= 0, got {self.offset}")

    def key(self) -> int:
        """One raw 64-bit word of ``parent``: the key of an indexed rounding of the shard."""
        return int(self.parent.bit_generator.random_raw())

    def generator(self) -> np.random.Generator:
        """A generator of the shard's own for rounding by stream (the plain path): seeded by one
        word of ``parent`` and ``offset``, so shards draw different bits."""
        return np.random.default_rng([self.key(), int(self.offset)])


def _stream_rng(fmt: StateFormat, rng: Any) -> Any:
    # The generator that rounds by stream (fmt.store): a shard's own, drawn only when the format
    # rounds stochastically (a draw otherwise would advance the parent unlike one process's).
    if isinstance(rng, ShardRng):
        return rng.generator() if fmt.needs_rng else None
    return rng


def _load_fused() -> ModuleType | None:
    global _fused_module
    if _fused_module is _NOT_LOADED:
        try:
            _fused_module = importlib.import_module("adamkit.kernels.numba_formats")
        except ImportError:
            _fused_module = None
    return _fused_module  # type: ignore[return-value]


def check_state(value: Any, name: str = "state") -> str | None:
    """Validate a ``state=`` option: ``None`` or a registered format name; return it normalised.

    ``"native"`` (torch's behaviour, moments in the parameter's dtype) is returned as ``None``.
    Raises ``TypeError`` for anything but ``None`` or a str, ``ValueError`` for an unknown name
    (the words of :func:`adamkit.formats.get_format`).
    """
    if value is None:
        return None
    if not isinstance(value, str):
        allowed = ", ".join(repr(k) for k in FORMATS)
        raise TypeError(
            f"{name} must be None or a format name ({allowed}), got {type(value).__name__} "
            f"{value!r}"
        )
    get_format(value)
    return None if value == "native" else value


def all_finite(arrays: Sequence[np.ndarray]) -> bool:
    """Whether every element of every array (e.g. the gradients of a step) is finite.

    The check a front end makes before a step under a format that cannot hold NaN/inf
    (:func:`holds_non_finite`), so that refusing the step changes nothing.  With numba: one
    compiled read pass per array and no temporary, 3-5x cheaper than
    ``torch.isfinite(g).all()`` or ``numpy.isfinite(g).all()``; otherwise NumPy.
    """
    fused = _load_fused() if numba_available() else None
    if fused is not None:
        return bool(fused.all_finite(arrays))
    return all(bool(np.isfinite(np.asarray(a)).all()) for a in arrays)


def holds_non_finite(fmt: StateFormat) -> bool:
    """Whether ``fmt`` can store NaN and inf (dense and bf16 formats can, block-quantized ones
    cannot: their ``store`` raises ``ValueError``)."""
    return not isinstance(fmt, QuantizedFormat)


def is_sensitive_name(name: str | None) -> bool:
    """Whether a parameter name marks an embedding or normalisation parameter (rule 3 of the
    module docstring): a segment containing one of :data:`SENSITIVE_NAME_PARTS` or equal to one of
    :data:`SENSITIVE_NAME_SEGMENTS`, case-insensitively.  ``None`` (no name) is not sensitive."""
    if not isinstance(name, str):
        return False
    segments = name.lower().split(".")
    return any(
        seg in SENSITIVE_NAME_SEGMENTS or any(part in seg for part in SENSITIVE_NAME_PARTS)
        for seg in segments
    )


def param_format(state: str | None, shape: tuple[int, ...], name: str | None = None) -> StateFormat:
    """The format that stores the moments of a parameter of ``shape`` (and ``name``, if known) in a
    group with ``state`` (a value :func:`check_state` accepted), by the rule of the module
    docstring.  Raises ``ValueError`` for an unknown format name."""
    fmt = get_format(state)
    if isinstance(fmt, QuantizedFormat) and (len(shape) < 2 or is_sensitive_name(name)):
        return get_format(SENSITIVE_STATE)
    return fmt


def resolve_stored_impl(impl: str, fmt: StateFormat) -> str:
    """The implementation ``impl`` gives for ``fmt``: ``"reference"`` or ``"numba"``.

    Raises ``ValueError`` for an unknown ``impl``, ``ImportError`` for ``"numba"`` without numba and
    ``TypeError`` for ``"numba"`` with a format that has no fused kernel.
    """
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "reference":
        return impl
    fused = _load_fused() if numba_available() else None
    if fused is None:
        if impl == "numba":
            raise ImportError("impl='numba' needs numba: pip install adamkit[fast]")
        return "reference"
    if not fused.supports(fmt):
        if impl == "numba":
            raise TypeError(
                f"impl='numba' has no fused kernel for state format {fmt.name!r}; use "
                "impl='auto' or 'reference'"
            )
        return "reference"
    return "numba"


def _check_encodable(fmt: StateFormat, values: Sequence[np.ndarray | None]) -> None:
    if holds_non_finite(fmt):
        return
    for role, x in zip(_ROLES, values, strict=True):
        if x is not None and not np.isfinite(x).all():
            raise ValueError(
                f"{role} got non-finite values, which {fmt.name} state cannot hold; nothing of "
                "this parameter was changed (skip non-finite steps before the update: the "
                "guard's non-finite check)"
            )


def _store_all(
    fmt: StateFormat,
    stored: Sequence[Storage | None],
    values: Sequence[np.ndarray | None],
    rng: np.random.Generator | None,
) -> None:
    for st, x in zip(stored, values, strict=True):
        if st is not None:
            fmt.store(st, x, rng=rng)


def plain_step_(
    fmt: StateFormat,
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: Storage,
    exp_avg_sq: Storage,
    max_exp_avg_sq: Storage | None,
    step: int,
    hp: AdamHyperParams,
    rng: np.random.Generator | None = None,
) -> None:
    """The oracle for one parameter: load, :func:`~adamkit.core.reference.adam_step`, store.

    ``param`` (float32/float64 array, any strides) and the storages are overwritten; ``step`` is
    the 1-based update index.  Raises ``ValueError`` when the new moments cannot be stored
    (non-finite under ``int8``), before anything is written.
    """
    w = None if max_exp_avg_sq is None else fmt.load(max_exp_avg_sq)
    state = AdamState(step - 1, fmt.load(exp_avg), fmt.load(exp_avg_sq), w)
    new_param, new = adam_step(param, grad, state, hp)
    values = (new.exp_avg, new.exp_avg_sq, new.max_exp_avg_sq)
    _check_encodable(fmt, values)
    _store_all(fmt, (exp_avg, exp_avg_sq, max_exp_avg_sq), values, rng)
    np.copyto(param, new_param)


def _check_rows(
    fmt: StateFormat, max_exp_avg_sqs: Sequence[Storage | None], hp: AdamHyperParams, rng: Any
) -> None:
    for index, w in enumerate(max_exp_avg_sqs):
        if (w is not None) != hp.amsgrad:
            raise ValueError(
                f"max_exp_avg_sqs[{index}] must be a storage exactly when amsgrad=True "
                f"(amsgrad={hp.amsgrad})"
            )
    if fmt.needs_rng and not isinstance(rng, np.random.Generator | ShardRng):
        raise TypeError(
            f"{fmt.name!r} state rounds stochastically: the update needs "
            f"rng=numpy.random.Generator (or a ShardRng), got {type(rng).__name__}"
        )


def adam_update_stored_(
    fmt: StateFormat,
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[Storage],
    exp_avg_sqs: Sequence[Storage],
    max_exp_avg_sqs: Sequence[Storage | None],
    steps: Sequence[int],
    hp: AdamHyperParams,
    *,
    rng: np.random.Generator | None = None,
    impl: str = "auto",
) -> None:
    """One Adam step per parameter, in place, with moments kept in ``fmt``'s storages.

    The contract of :func:`adamkit.kernels.adam_update_` with :class:`~adamkit.formats.Storage`
    moments made by ``fmt`` for each parameter's shape: ``steps[i]`` is the 1-based update index,
    ``max_exp_avg_sqs[i]`` a storage exactly when ``hp.amsgrad`` (``ValueError`` otherwise),
    ``grads`` are only read, ``rng`` (a generator, or a :class:`ShardRng` for a single shard:
    ``ValueError`` with several parameters) is required when ``fmt.needs_rng`` (``TypeError``).
    ``impl`` as in the module docstring.  These errors come before anything is modified; a
    non-finite moment under ``int8`` raises ``ValueError`` (see the module docstring for what was
    written).
    """
    chosen = resolve_stored_impl(impl, fmt)
    _check_rows(fmt, max_exp_avg_sqs, hp, rng)
    rows = list(zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, strict=True))
    shard = rng if isinstance(rng, ShardRng) else None
    if shard is not None and len(rows) != 1:
        raise ValueError(f"a ShardRng rounds the shard of one parameter, got {len(rows)}")
    if chosen == "reference":
        for row in rows:
            plain_step_(fmt, *row, hp, _stream_rng(fmt, rng))
        return
    fallback: Callable[..., None] | None = None
    if impl == "auto":
        fallback = plain_step_ if shard is None else _shard_fallback(shard)
    _load_fused().adam_update_stored_(  # type: ignore[union-attr]
        fmt,
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        hp,
        rng=rng if shard is None else shard.parent,
        fallback=fallback,
        offsets=None if shard is None else [shard.offset],
    )


def _shard_fallback(shard: ShardRng) -> Callable[..., None]:
    def fallback(fmt: StateFormat, *row: Any) -> None:
        # row: param, grad, m, v, v_max, step, hp, and the parent generator (not used)
        plain_step_(fmt, *row[:-1], _stream_rng(fmt, shard))

    return fallback


def update_through_(
    fmt: StateFormat,
    update: Callable[..., Any],
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[Storage],
    exp_avg_sqs: Sequence[Storage],
    max_exp_avg_sqs: Sequence[Storage | None],
    steps: Sequence[int],
    hp: AdamHyperParams,
    *,
    rng: np.random.Generator | None = None,
    **options: Any,
) -> Any:
    """Run any in-place multi-tensor NumPy step on decoded moments, then encode them back.

    ``update(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hp, **options)`` must
    have the contract of :func:`adamkit.kernels.adam_update_` on float32 moment arrays (e.g.
    :func:`adamkit.guard.clipped_adam_update_` with its clipping options); its return value is
    returned.  It runs on copies of the parameters, which are written back only when every moment
    could be stored, so a ``ValueError`` for non-finite ``int8`` moments changes nothing.  Other
    arguments as :func:`adam_update_stored_` (a :class:`ShardRng` rounds with a generator of the
    shard's own, see the module docstring).
    """
    _check_rows(fmt, max_exp_avg_sqs, hp, rng)
    rng = _stream_rng(fmt, rng)
    work = [np.array(p, copy=True) for p in params]
    ms = [np.array(fmt.load(s), copy=True) for s in exp_avgs]
    vs = [np.array(fmt.load(s), copy=True) for s in exp_avg_sqs]
    ws = [None if s is None else np.array(fmt.load(s), copy=True) for s in max_exp_avg_sqs]
    result = update(work, grads, ms, vs, ws, steps, hp, **options)
    for values in zip(ms, vs, ws, strict=True):
        _check_encodable(fmt, values)
    for stored, values in zip(
        zip(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, strict=True),
        zip(ms, vs, ws, strict=True),
        strict=True,
    ):
        _store_all(fmt, stored, values, rng)
    for p, new in zip(params, work, strict=True):
        np.copyto(p, new)
    return result
