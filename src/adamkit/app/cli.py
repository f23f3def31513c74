"""Command-line arguments of ``adamkit`` (and ``python -m adamkit``); nothing else lives here.

``adamkit train`` trains the Keras MNIST example's MLP and writes config.json, metrics.csv,
curves.png and checkpoint.pt (checkpoint.keras with ``--framework keras``); ``adamkit bench`` is
provided by ``adamkit.app.bench`` when that module is installed.  Exit status: 0 success, 2 bad
usage or input (one line on stderr, never a traceback), 130 interrupted by Ctrl-C (after writing a
checkpoint).

Options are declared in groups (data, optimizer, run).  Each option's ``dest`` is a
``TrainConfig`` field name and its parser default is ``None`` ("not given"), so
:func:`config_from_args` can copy options to the config by name and ``--resume`` can tell what
the user changed.  To add an option (``--guard``, ``--framework``, ``--state`` and ``--nproc``
were added so), add it to a group here and a field to ``TrainConfig`` (see ``config.py``); nothing
else here changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from adamkit import __version__
from adamkit.app.config import (
    COMMON_DEFAULTS,
    DATASET_DEFAULTS,
    DATASETS,
    FRAMEWORKS,
    GUARDS,
    MAX_NPROC_PER_CPU,
    STATE_OPTIMIZERS,
    STATES,
    TrainConfig,
)
from adamkit.app.errors import AppError
from adamkit.app.optimizers import KERAS_OPTIMIZERS, OPTIMIZERS

__all__ = ["build_parser", "config_from_args", "configure_train_parser", "main"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_BENCH_MISSING = "adamkit bench is not available in this build"


def _per_dataset(key: str) -> str:
    values: dict[int, list[str]] = {}
    for name, defaults in DATASET_DEFAULTS.items():
        values.setdefault(defaults[key], []).append(name)
    return ", ".join(f"{v} for {'/'.join(names)}" for v, names in values.items())


def _optimizer_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of optimizer names")
    return names


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        choices=list(DATASETS),
        help="data set: "
        + "; ".join(f"{name} = {text}" for name, text in DATASETS.items())
        + " (default: digits)",
    )
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder with the four MNIST-format IDX files (raw or .gz) or <dataset>.npz, or an "
        ".npz file (default: search $ADAMKIT_DATA/<dataset>, /usr/share/datasets/<dataset>, "
        "$ADAMKIT_CACHE/<dataset> or ~/.cache/adamkit/<dataset>; mnist is downloaded if absent)",
    )


def _add_optimizer_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimizer")
    group.add_argument(
        "--optimizer",
        choices=list(dict.fromkeys([*OPTIMIZERS, *KERAS_OPTIMIZERS])),
        help="optimizer: "
        + "; ".join(f"{name} = {spec.description}" for name, spec in OPTIMIZERS.items())
        + "; with --framework keras: "
        + "; ".join(f"{name} = {spec.description}" for name, spec in KERAS_OPTIMIZERS.items())
        + f" (default: {COMMON_DEFAULTS['optimizer']})",
    )
    group.add_argument(
        "--framework",
        choices=list(FRAMEWORKS),
        help="framework: "
        + "; ".join(f"{name} = {text}" for name, text in FRAMEWORKS.items())
        + f" (default: {COMMON_DEFAULTS['framework']})",
    )
    group.add_argument(
        "--lr",
        type=float,
        metavar="LR",
        help=f"learning rate, > 0 (default: {COMMON_DEFAULTS['lr']:g})",
    )
    group.add_argument(
        "--guard",
        choices=list(GUARDS),
        help="stability guard: "
        + "; ".join(f"{name} = {text}" for name, text in GUARDS.items())
        + f" (default: {COMMON_DEFAULTS['guard']})",
    )
    group.add_argument(
        "--state",
        choices=list(STATES),
        help="how adamkit's optimizers store the moments: "
        + "; ".join(f"{name} = {text}" for name, text in STATES.items())
        + f" (only {', '.join(STATE_OPTIMIZERS)}; default: moments in the parameters' dtype)",
    )
    group.add_argument(
        "--compare",
        type=_optimizer_list,
        metavar="A,B,...",
        help="train each listed optimizer from the same initial weights and data order, one "
        "subfolder of --out each, and plot them on one figure (default: off; replaces "
        "--optimizer)",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training run")
    group.add_argument(
        "--epochs",
        type=int,
        metavar="N",
        help=f"total number of epochs, >= 1 (default: {_per_dataset('epochs')})",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help=f"mini-batch size, >= 1 (default: {_per_dataset('batch_size')})",
    )
    group.add_argument(
        "--hidden",
        type=int,
        metavar="N",
        help=f"units of the hidden Dense+ReLU layer (default: {COMMON_DEFAULTS['hidden']})",
    )
    group.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed of the initial weights and the data order; same seed, same run "
        f"(default: {COMMON_DEFAULTS['seed']})",
    )
    group.add_argument(
        "--out",
        metavar="DIR",
        help="output folder for config.json, metrics.csv, curves.png, checkpoint.pt or "
        "checkpoint.keras (default: runs/<dataset>-<optimizer>-<timestamp>, "
        "runs/<dataset>-keras-<optimizer>-<timestamp> with --framework keras; with --resume, "
        "the checkpoint's folder)",
    )
    group.add_argument(
        "--resume",
        metavar="CKPT",
        help="continue the run saved in CKPT (a checkpoint.pt, or a checkpoint.keras of "
        "--framework keras) exactly where it stopped; "
        "settings come from the checkpoint, only --epochs, --out, --data-dir and --nproc may "
        "change (default: start a new run)",
    )
    group.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel on N local processes (torch.distributed, gloo on the CPU): "
        "each takes 1/N of every batch, so batch size, data order and results stay those of "
        f"one process up to rounding; 1 to {MAX_NPROC_PER_CPU} x CPU cores, torch only, not "
        "with --compare (default: 1, this process)",
    )


def configure_train_parser(parser: argparse.ArgumentParser) -> None:
    """Add every ``adamkit train`` option to ``parser`` (defaults ``None`` = not given)."""
    _add_data_options(parser)
    _add_optimizer_options(parser)
    _add_run_options(parser)


def build_parser() -> argparse.ArgumentParser:
    """The ``adamkit`` parser with its ``train`` and ``bench`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="adamkit",
        description="adamkit: the Adam optimizer family, and a small training app.",
    )
    parser.add_argument("--version", action="version", version=f"adamkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train an MLP on digits / MNIST / Fashion-MNIST and plot its curves",
        description="Train the Keras MNIST example (flatten -> Dense 128 + ReLU -> Dense 10, "
        "cross-entropy on logits, Adam lr 1e-3) and write config.json, metrics.csv, "
        "curves.png and checkpoint.pt (checkpoint.keras with --framework keras) to --out. "
        "Exit status: 0 done, 2 bad usage or data, "
        "130 interrupted (Ctrl-C writes a checkpoint first; resume with --resume).",
    )
    configure_train_parser(train)
    commands.add_parser(
        "bench", help="run the optimizer benchmarks (see 'adamkit bench --help')", add_help=False
    )
    return parser


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields found in ``args``, by name (``None`` where not given)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _run_bench(argv: Sequence[str]) -> int:
    # `adamkit bench` times optimizer steps; `adamkit bench stability` runs the guard's benchmark,
    # `adamkit bench accuracy` the state formats' accuracy benchmark, `adamkit bench memory`
    # their memory.
    argv = list(argv)
    sub = argv[0] if argv and argv[0] in ("stability", "accuracy", "memory") else None
    module = f"adamkit.app.bench_{sub}" if sub else "adamkit.app.bench"
    prog = f"adamkit bench {sub}" if sub else "adamkit bench"
    try:
        bench = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            print(_BENCH_MISSING, file=sys.stderr)
            return EXIT_USAGE
        print(f"{prog}: error: needs {exc.name}: pip install adamkit[app]", file=sys.stderr)
        return EXIT_USAGE
    if sub:
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog=prog,
        epilog=None
        if sub
        else "'adamkit bench stability --help': the guard's benchmark; "
        "'adamkit bench accuracy --help': the state formats' accuracy benchmark; "
        "'adamkit bench memory --help': optimizer-state memory per parameter",
    )
    bench.configure_parser(parser)
    args = parser.parse_args(argv)
    return int(bench.run(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adamkit`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return _run_bench(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        from adamkit.app import train

        return train.run(config_from_args(args), resume=args.resume, argv=argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2); or a message
        if isinstance(exc.code, int):
            return exc.code
        if exc.code is not None:
            print(exc.code, file=sys.stderr)
        return EXIT_USAGE
    except AppError as exc:
        print(f"adamkit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nadamkit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
