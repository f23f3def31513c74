"""The settings of one ``adamkit train`` run, their defaults, and their validation.

:class:`TrainConfig` is the single description of a run: the CLI builds it, ``config.json`` and
the checkpoint store it (``dataclasses.asdict``), and ``--resume`` rebuilds it.  Every check
happens in :func:`validate`, before any data is read or any training starts.

Adding an option later (``--guard``, ``--framework``, ``--state`` and ``--nproc`` were added
this way) takes three edits and no restructuring: a field here with
its default (and a check in :func:`validate`), an argument with the same ``dest`` in the
matching group of ``cli.py`` (``cli.config_from_args`` copies every field by name), and the
consumer reading ``config.<field>`` (the optimizer factory in ``optimizers.py`` and the model
builder receive the whole config; ``train.py`` is where a framework or process count would be
dispatched).
Checkpoints written before a field existed still load: missing fields take their defaults; list
the new field in :data:`OMIT_AT_DEFAULT` so runs that leave it at its default still write files
that earlier releases read.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from adamkit.app.errors import UsageError
from adamkit.core.config import check_lr

__all__ = [
    "COMMON_DEFAULTS",
    "DATASETS",
    "DATASET_DEFAULTS",
    "FRAMEWORKS",
    "GUARDS",
    "MAX_NPROC_PER_CPU",
    "OMIT_AT_DEFAULT",
    "RESUME_MAY_CHANGE",
    "STATES",
    "STATE_OPTIMIZERS",
    "TrainConfig",
    "build_config",
    "resolve_defaults",
    "resume_config",
    "validate",
]

#: Data sets ``--dataset`` accepts, with a one-line description for ``--help``.
DATASETS: dict[str, str] = {
    "digits": "scikit-learn's bundled 8x8 digits (1797 images, no download)",
    "fashion-mnist": "Fashion-MNIST, 28x28 (IDX files; apt-get install dataset-fashion-mnist)",
    "mnist": "MNIST, 28x28 (IDX or mnist.npz; downloaded and checksummed if absent)",
}

#: Frameworks ``--framework`` accepts, with a one-line description for ``--help``.
FRAMEWORKS: dict[str, str] = {
    "torch": "PyTorch (adamkit.torch; checkpoint.pt)",
    "keras": "Keras 3 on $KERAS_BACKEND, torch if unset, jax works too (adamkit.keras; "
    "checkpoint.keras; pip install adamkit[keras])",
}

#: Stability-guard settings ``--guard`` accepts (see :mod:`adamkit.guard`), for ``--help``.
GUARDS: dict[str, str] = {
    "default": "each optimizer's own default: adamkit and adamkit-adamw skip steps with NaN/Inf "
    "gradients, torch-adam, torch-adamw and sgd run unguarded",
    "off": "no guard at all (adamkit is plain Adam, as torch.optim.Adam)",
    "all": "every behaviour of adamkit.guard.GuardConfig.all(): non-finite skip, gradient-spike "
    "clipping, loss-spike skip and rollback, update clipping (adamkit only) and diagnostics; "
    "torch optimizers are wrapped in adamkit.torch.GuardedOptimizer",
}

#: Moment storage formats ``--state`` accepts (``adamkit.torch.Adam(state=...)``), for ``--help``.
STATES: dict[str, str] = {
    "fp32": "float32 moments whatever the parameter dtype",
    "bf16": "bfloat16 moments with stochastic rounding (half the memory of fp32)",
    "int8": "block-wise int8 moments, one float32 scale per 256 values (a quarter of fp32; "
    "small tensors and biases keep float32)",
}

#: The ``--optimizer`` choices that take ``--state`` (adamkit's own; torch's have no formats).
STATE_OPTIMIZERS = ("adamkit", "adamkit-adamw")

#: ``--nproc`` may ask for up to this many processes per CPU core (``os.cpu_count()``).
MAX_NPROC_PER_CPU = 4

#: Defaults shared by every data set (the Keras MNIST example: MLP 128, Adam lr 1e-3).
COMMON_DEFAULTS: dict[str, Any] = {
    "optimizer": "adamkit",
    "lr": 1e-3,
    "hidden": 128,
    "seed": 0,
    "framework": "torch",
    "guard": "default",
}

#: Per-data-set defaults.  MNIST-format data uses the Keras example's 5 epochs of batch 256.
#: The digits set is 40 times smaller (1437 training images), so it needs more, smaller steps:
#: 30 epochs of batch 32 (1350 steps) reach >= 96% test accuracy for every seed tried (0..19).
DATASET_DEFAULTS: dict[str, dict[str, int]] = {
    "digits": {"epochs": 30, "batch_size": 32},
    "fashion-mnist": {"epochs": 5, "batch_size": 256},
    "mnist": {"epochs": 5, "batch_size": 256},
}

_MAX_SEED = 2**32 - 1  # numpy's seed range; torch accepts it too


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (JSON-serialisable via ``dataclasses.asdict``).

    ``optimizer`` names the single optimizer of a run; ``compare`` (non-empty) lists several that
    are trained one after the other from the same initial weights and data order.  ``out`` is the
    output folder; ``data_dir`` is ``None`` to search the usual places (see ``data.py``).
    ``framework`` is ``"torch"`` or ``"keras"`` (see ``keras_train.py``).  ``guard`` is a key of
    :data:`GUARDS` (read by ``optimizers.py``).  ``state`` is ``None`` (the optimizer's default:
    moments in the parameters' dtype) or a key of :data:`STATES`.  ``nproc`` is the number of
    data-parallel processes (see ``parallel.py``; 1 trains in this process).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    optimizer: str = COMMON_DEFAULTS["optimizer"]
    lr: float = COMMON_DEFAULTS["lr"]
    epochs: int = DATASET_DEFAULTS["digits"]["epochs"]
    batch_size: int = DATASET_DEFAULTS["digits"]["batch_size"]
    hidden: int = COMMON_DEFAULTS["hidden"]
    seed: int = COMMON_DEFAULTS["seed"]
    out: str = ""
    compare: tuple[str, ...] = field(default_factory=tuple)
    framework: str = COMMON_DEFAULTS["framework"]
    guard: str = COMMON_DEFAULTS["guard"]
    state: str | None = None
    nproc: int = 1

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (not validated; call :func:`validate`)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (``compare`` as a list).

        Fields of :data:`OMIT_AT_DEFAULT` are left out while they hold their default, so the
        stored config of a run that does not use a newer option is the one earlier releases wrote
        and can read (their :meth:`from_dict` rejects unknown keys); missing keys load as defaults.
        """
        out = dataclasses.asdict(self)
        out["compare"] = list(self.compare)
        for name in OMIT_AT_DEFAULT:
            if out[name] == _FIELD_DEFAULTS[name]:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`.  Unknown keys raise ``UsageError``; missing keys default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"unknown setting(s) in stored config: {', '.join(unknown)}")
        values = dict(data)
        if "compare" in values:
            values["compare"] = tuple(values["compare"] or ())
        return cls(**values)


#: Options added after the first release (see :meth:`TrainConfig.to_dict`).
OMIT_AT_DEFAULT: tuple[str, ...] = ("guard", "state", "nproc")
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def resolve_defaults(dataset: str, given: dict[str, Any]) -> dict[str, Any]:
    """Fill the settings the user left as ``None`` with the defaults for ``dataset``.

    ``given`` maps field names to values or ``None``; returns a new dict.  An unknown dataset is
    left for :func:`validate` to report.
    """
    defaults = {**COMMON_DEFAULTS, **DATASET_DEFAULTS.get(dataset, DATASET_DEFAULTS["mnist"])}
    return {key: (defaults.get(key) if value is None else value) for key, value in given.items()}


def _positive_int(value: Any, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{flag} must be an integer >= 1, got {value!r}")


def _check_state(config: TrainConfig, names: tuple[str, ...]) -> None:
    if config.state is None:
        return
    if config.state not in STATES:
        raise UsageError(f"--state must be one of {', '.join(STATES)}, got {config.state!r}")
    if config.framework != "torch":
        raise UsageError(
            f"--state is not available with --framework {config.framework}; use --framework "
            "torch or leave --state out"
        )
    for name in names:
        if name not in STATE_OPTIMIZERS:
            raise UsageError(
                f"--state {config.state} needs an adamkit optimizer ({', '.join(STATE_OPTIMIZERS)})"
                f"; {name} keeps its moments in the parameters' dtype (leave --state out)"
            )


def _check_nproc(config: TrainConfig) -> None:
    limit = (os.cpu_count() or 1) * MAX_NPROC_PER_CPU
    value = config.nproc
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise UsageError(
            f"--nproc must be an integer in [1, {limit}] ({MAX_NPROC_PER_CPU} per CPU core), "
            f"got {value!r}"
        )
    if value > 1 and config.framework != "torch":
        raise UsageError(
            f"--nproc is not supported with --framework {config.framework} (data-parallel "
            "training is torch only); leave --nproc out"
        )
    if value > 1 and config.compare:
        raise UsageError(
            "--nproc is not supported with --compare; train each optimizer with its own "
            "--optimizer run"
        )


def validate(config: TrainConfig) -> TrainConfig:
    """Check every setting; return ``config`` unchanged or raise ``UsageError`` (one line).

    Messages name the command-line flag, echo the value and state the allowed range.
    """
    from adamkit.app.optimizers import optimizer_table

    if config.dataset not in DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)}, got {config.dataset!r}")
    if config.framework not in FRAMEWORKS:
        raise UsageError(
            f"--framework must be one of {', '.join(FRAMEWORKS)}, got {config.framework!r}"
        )
    if config.guard not in GUARDS:
        raise UsageError(f"--guard must be one of {', '.join(GUARDS)}, got {config.guard!r}")
    if config.framework != "torch" and config.guard == "all":
        raise UsageError(
            f"--guard all is not available with --framework {config.framework} (the Keras "
            "front end has no stability guard yet); use --framework torch or leave --guard out"
        )
    table = optimizer_table(config.framework)
    names = config.compare or (config.optimizer,)
    for name in names:
        if name not in table:
            flag = "--compare" if config.compare else "--optimizer"
            where = "" if config.framework == "torch" else f" for --framework {config.framework}"
            raise UsageError(
                f"{flag}: unknown optimizer {name!r}{where} (choose from {', '.join(table)})"
            )
    if len(set(names)) != len(names):
        raise UsageError(f"--compare lists an optimizer twice: {','.join(names)}")
    _check_state(config, names)
    _check_nproc(config)
    try:
        lr: float | None = check_lr(config.lr, "--lr")
    except TypeError as exc:
        raise UsageError(str(exc)) from None
    except ValueError:
        lr = None  # reported below with the CLI's stricter rule (lr = 0 trains nothing)
    if lr is None or lr <= 0.0:
        raise UsageError(f"Invalid learning rate: {config.lr!r} (--lr must be a finite number > 0)")
    _positive_int(config.epochs, "--epochs")
    _positive_int(config.batch_size, "--batch-size")
    _positive_int(config.hidden, "--hidden")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int):
        raise UsageError(f"--seed must be an integer in [0, {_MAX_SEED}], got {config.seed!r}")
    if not 0 <= config.seed <= _MAX_SEED:
        raise UsageError(f"--seed must be an integer in [0, {_MAX_SEED}], got {config.seed!r}")
    if config.dataset == "digits" and config.data_dir is not None:
        raise UsageError(
            "--data-dir does not apply to --dataset digits (it is bundled); add --dataset mnist "
            "or --dataset fashion-mnist to read MNIST-format files"
        )
    return config


#: Settings that ``--resume`` may change; every other explicit setting must match the checkpoint.
RESUME_MAY_CHANGE = ("epochs", "out", "data_dir", "nproc")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_config(explicit: dict[str, Any]) -> TrainConfig:
    """A validated config from the settings the user gave (others take the data set's defaults).

    ``explicit`` maps field names to values; ``None`` means "not given".  Raises ``UsageError``.
    """
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(explicit) - set(names))
    if unknown:
        raise UsageError(f"unknown setting(s): {', '.join(unknown)}")
    dataset = explicit.get("dataset") or TrainConfig.dataset
    given = {name: explicit.get(name) for name in names}
    given["dataset"] = dataset
    values = {k: v for k, v in resolve_defaults(dataset, given).items() if v is not None}
    if "compare" in values:
        values["compare"] = tuple(values["compare"])
    return validate(TrainConfig(**values))


def resume_config(stored: dict[str, Any], explicit: dict[str, Any]) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with the allowed changes applied.

    ``stored`` is the checkpoint's ``config`` dict; ``explicit`` the settings given on the
    command line (``None`` = not given).  Only :data:`RESUME_MAY_CHANGE` may differ; any other
    explicit setting that differs raises ``UsageError`` naming the flag and both values.
    """
    base = TrainConfig.from_dict(stored)
    changes = {}
    for name, value in explicit.items():
        if value is None:
            continue
        if name == "compare":
            raise UsageError(
                "--compare cannot be combined with --resume; resume each optimizer of a "
                "--compare run from its own OUT/NAME/checkpoint.pt"
            )
        if name in RESUME_MAY_CHANGE:
            changes[name] = value
        elif value != getattr(base, name):
            raise UsageError(
                f"{_flag(name)} {value} differs from the checkpoint's {getattr(base, name)}; "
                f"leave it out when resuming (only --epochs, --out, --data-dir and --nproc may "
                "change)"
            )
    return validate(base.replace(**changes))
