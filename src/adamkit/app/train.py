"""One ``adamkit train`` invocation: data, model, optimizer, loop and subscribers, wired together.

Output layout (``--out``, default ``runs/<dataset>-<optimizer>-<YYYYmmdd-HHMMSS>/``)::

    config.json  metrics.csv  curves.png  checkpoint.pt

``--guard`` (see ``optimizers.py``): ``config.json`` records what the optimizer got under
``"guard"`` (the resolved :class:`adamkit.guard.GuardConfig`, or ``null``), ``metrics.csv`` has the
guard's diagnostics per epoch, ``curves.png`` a third panel with them, and a line after the final
accuracy says what the guard did over the run.  ``config.json`` also records ``"state"`` (the
``--state`` format, ``null`` for the optimizer's default) and ``"nproc"``.

``--nproc N`` (N > 1) trains data-parallel in N spawned processes (``parallel.py``); the first of
them writes the same four files and prints the progress, so the results look like one process's.

With ``--compare A,B,...`` (default ``runs/<dataset>-compare-<timestamp>/``) each optimizer gets
a subfolder with those four files, and the top folder holds a ``config.json`` for the whole
comparison and a ``curves.png`` with one colour per optimizer.  Every optimizer starts from the
same initial weights (the model is rebuilt after re-seeding) and sees the same data order (a
shuffle generator seeded the same way), so each sub-run equals a single run with that optimizer.

``--framework keras`` trains the same MLP through Keras 3 and writes the same files, with
``checkpoint.keras`` as the checkpoint; ``keras_train.py`` lists the differences.

Ctrl-C (SIGINT) asks the loop to stop after the current batch; the checkpoint is written, the
command to resume is printed and the exit status is 130.  A second Ctrl-C stops at once, keeping
the checkpoint of the last finished epoch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import random
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from adamkit.app.config import DATASET_DEFAULTS, TrainConfig, build_config, resume_config
from adamkit.app.errors import UsageError

__all__ = ["EXIT_INTERRUPTED", "EXIT_OK", "default_out", "prepare_out", "run"]

EXIT_OK = 0
EXIT_INTERRUPTED = 130
CONFIG_FORMAT = "adamkit.train-config"
#: The checkpoint file of each framework.
CHECKPOINT_FILES = {"torch": "checkpoint.pt", "keras": "checkpoint.keras"}
_RUN_FILES = (*CHECKPOINT_FILES.values(), "metrics.csv")


def default_out(config: TrainConfig, root: str = "runs") -> str:
    """``runs/<dataset>-<optimizer or 'compare'>-<timestamp>``, made unique with a suffix."""
    label = "compare" if config.compare else config.optimizer
    if config.framework != "torch":
        label = f"{config.framework}-{label}"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{config.dataset}-{label}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{base}-{n}")
    return str(candidate)


def prepare_out(out: str, run_dirs: Sequence[Path], resuming: bool) -> list[Path]:
    """Create the output folders and check they are writable; raise ``UsageError`` if not.

    A folder that already holds a run's results is refused unless ``resuming`` into it, so a
    finished run is never overwritten by mistake.  Returns the folders it created (to be removed
    again if the run fails before writing anything).
    """
    created = [d for d in dict.fromkeys([Path(out), *run_dirs]) if not d.exists()]
    for folder in run_dirs:
        if not resuming and any((folder / name).exists() for name in _RUN_FILES):
            saved = [folder / n for n in CHECKPOINT_FILES.values() if (folder / n).exists()]
            raise UsageError(
                f"--out {out}: {folder} already holds a run; choose another --out, or continue "
                f"it with --resume {saved[0] if saved else folder / 'checkpoint.pt'}"
            )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise UsageError(f"--out {out}: cannot write to {folder} ({reason})") from None
    return created


def _remove_if_empty(folders: Sequence[Path]) -> None:
    for folder in reversed(folders):  # children were listed after their parent
        with contextlib.suppress(OSError):  # not empty, or already gone: leave it
            folder.rmdir()


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous number.

    The MLP's matrices are too small to gain from threads, and on a busy machine idle-spinning
    worker threads make a step ten times slower; one thread also makes the floating-point
    results independent of the machine's core count.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _stop_on_sigint(request_stop: Callable[[], None]) -> Iterator[None]:
    """First SIGINT calls ``request_stop``; a second one raises ``KeyboardInterrupt``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    pressed = []

    def handler(signum: int, frame: Any) -> None:
        pressed.append(signum)
        if len(pressed) > 1:
            raise KeyboardInterrupt
        request_stop()

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _config_document(
    config: TrainConfig,
    dataset: Any,
    versions: dict[str, str],
    argv: Sequence[str],
    resumed_from: str | None,
) -> dict[str, Any]:
    return {
        "format": CONFIG_FORMAT,
        "version": 1,
        "command": shlex.join(["adamkit", *argv]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": config.to_dict(),
        "dataset_defaults": DATASET_DEFAULTS.get(config.dataset, {}),
        "data": {
            "source": dataset.source,
            "train_size": len(dataset.y_train),
            "test_size": len(dataset.y_test),
            "image_shape": list(dataset.image_shape),
        },
        "resumed_from": resumed_from,
        "versions": versions,
    }


def _print_header(config: TrainConfig, dataset: Any, out: str, stream: TextIO) -> None:
    names = ", ".join(config.compare) if config.compare else config.optimizer
    defaults = DATASET_DEFAULTS[config.dataset]
    print(f"adamkit train: {dataset.summary()}", file=stream)
    print(f"  from {dataset.source}", file=stream)
    print(
        f"  optimizer {names}, lr {config.lr:g}, epochs {config.epochs}, batch size "
        f"{config.batch_size}, hidden {config.hidden}, seed {config.seed} "
        f"({config.dataset} defaults: epochs {defaults['epochs']}, batch size "
        f"{defaults['batch_size']})",
        file=stream,
    )
    shape = "x".join(str(n) for n in dataset.image_shape)
    loss = "cross-entropy on the logits"
    if config.framework == "keras":
        from adamkit.app.keras_train import describe_keras

        print(f"  framework: {describe_keras()}", file=stream)
        loss = "softmax, sparse categorical cross-entropy"
    print(
        f"  model: flatten {shape} -> Dense {config.hidden} + ReLU -> Dense 10, {loss}",
        file=stream,
    )
    print(f"  output: {out}", file=stream, flush=True)


def _epochs(count: int) -> str:
    return f"{count} epoch" if count == 1 else f"{count} epochs"


def _title(config: TrainConfig, name: str) -> str:
    return f"{config.dataset}: {name}, lr {config.lr:g}, batch size {config.batch_size}"


@dataclass(frozen=True)
class _Session:
    """What every optimizer of one invocation shares."""

    config: TrainConfig
    tensors: tuple[Any, ...]  # x_train, y_train, x_test, y_test
    image_shape: tuple[int, ...]
    document: dict[str, Any]  # config.json content
    versions: dict[str, str]
    payload: dict[str, Any] | None  # the checkpoint being resumed
    resume: str | None
    stdout: TextIO


def _train_one(session: _Session, name: str, run_dir: Path, prefix: str) -> Any:
    """Train optimizer ``name`` into ``run_dir``; return the finished ``Trainer``.

    Raises ``TrainingInterrupted`` (Ctrl-C, checkpoint written) or ``KeyboardInterrupt``.
    """
    if session.config.framework == "keras":
        from adamkit.app.keras_train import build_trainer

        keras_trainer = build_trainer(session, name, run_dir, prefix)
        with _stop_on_sigint(keras_trainer.request_stop), _torch_threads(1):
            keras_trainer.run()
        return keras_trainer
    if session.config.nproc > 1:
        from adamkit.app.parallel import train_parallel

        return train_parallel(session, name, run_dir, prefix)
    trainer = build_torch_trainer(session, name, run_dir, prefix)
    with _stop_on_sigint(trainer.request_stop), _torch_threads(1):
        trainer.run()
    return trainer


def build_torch_trainer(
    session: _Session,
    name: str,
    run_dir: Path,
    prefix: str,
    *,
    make_trainer: Callable[..., Any] | None = None,
    primary: bool = True,
) -> Any:
    """The ``Trainer`` of optimizer ``name``, resumed if the session has a checkpoint.

    ``make_trainer`` (default :class:`adamkit.app.loop.Trainer`) is called like ``Trainer``;
    ``parallel.py`` passes its data-parallel subclass.  Only the ``primary`` process writes
    ``config.json`` and subscribes the progress, ``metrics.csv``, checkpoint and plot writers.
    """
    import torch

    from adamkit.app.checkpoint import CheckpointWriter, restore_training
    from adamkit.app.loop import Trainer
    from adamkit.app.model import build_mlp
    from adamkit.app.optimizers import describe_guard, make_optimizer
    from adamkit.app.plots import plot_curves
    from adamkit.app.report import CsvWriter, make_progress, write_config_json

    config = session.config
    run_config = config.replace(optimizer=name, compare=(), out=str(run_dir))
    _seed_everything(config.seed)  # the same initial weights for every optimizer
    model = build_mlp(session.image_shape, config.hidden)
    try:
        optimizer = make_optimizer(name, model.parameters(), run_config)
    except ImportError as exc:
        raise UsageError(f"--optimizer {name} is not available: {exc}") from None
    trainer = (make_trainer or Trainer)(
        model,
        optimizer,
        *session.tensors,
        epochs=config.epochs,
        batch_size=config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),  # the same data order
    )
    if session.payload is not None and session.resume is not None:
        restore_training(session.payload, model, optimizer, trainer, session.resume)
    document = {
        **session.document,
        "settings": run_config.to_dict(),
        "guard": describe_guard(optimizer, config.guard),
        "state": config.state,
        "nproc": config.nproc,
    }
    if not primary:
        return trainer
    write_config_json(run_dir / "config.json", document)
    make_progress(session.stdout, prefix).attach(trainer)
    CsvWriter(run_dir / "metrics.csv").attach(trainer)
    CheckpointWriter(run_dir / "checkpoint.pt", run_config.to_dict(), session.versions).attach(
        trainer
    )

    def draw(t: Trainer) -> None:
        if t.history:
            plot_curves({name: t.history}, run_dir / "curves.png", title=_title(config, name))

    trainer.add_callback("train_end", draw)
    trainer.add_callback("interrupt", draw)
    return trainer


def run(
    explicit: dict[str, Any],
    *,
    resume: str | None = None,
    argv: Sequence[str] = (),
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``adamkit train`` with the settings the user gave (``None`` = default).

    Returns the exit status: 0 on success, 130 when interrupted (after writing the checkpoint).
    Raises ``AppError`` subclasses (exit 2 in the CLI) for bad settings, data or checkpoints;
    all settings are checked, and the output folder created, before the data is read.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    payload = None
    if resume is not None:
        if Path(resume).suffix == ".keras":
            from adamkit.app.keras_train import read_checkpoint as load_checkpoint
        else:
            from adamkit.app.checkpoint import load_checkpoint

        payload = load_checkpoint(resume)
        config = resume_config(payload["config"], explicit)
        done = payload["trainer"]["epoch"]
        if done >= config.epochs:
            raise UsageError(
                f"--resume {resume}: the checkpoint has finished {_epochs(done)}; pass "
                f"--epochs N with N > {done} to train further"
            )
        if explicit.get("out") is None:
            config = config.replace(out=str(Path(resume).parent))
    else:
        config = build_config(explicit)
        if not config.out:
            config = config.replace(out=default_out(config))
    if config.framework == "keras":
        from adamkit.app.keras_train import require_keras

        require_keras()  # exit 2 naming what to install, before any folder is made
    created = prepare_out(config.out, _run_dirs(config), resuming=resume is not None)
    try:
        return _run_all(config, payload, resume, argv, stdout, stderr)
    except BaseException:
        _remove_if_empty(created)  # e.g. the data set was missing: leave no empty run folder
        raise


def _run_dirs(config: TrainConfig) -> list[Path]:
    out = Path(config.out)
    return [out / name for name in config.compare] if config.compare else [out]


def _run_all(
    config: TrainConfig,
    payload: dict[str, Any] | None,
    resume: str | None,
    argv: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    import torch

    from adamkit.app.data import load_dataset
    from adamkit.app.loop import TrainingInterrupted
    from adamkit.app.plots import plot_curves
    from adamkit.app.report import guard_summary, write_config_json
    from adamkit.app.report import versions as get_versions

    dataset = load_dataset(config.dataset, config.data_dir)
    tensors = (
        torch.from_numpy(dataset.x_train),
        torch.from_numpy(dataset.y_train),
        torch.from_numpy(dataset.x_test),
        torch.from_numpy(dataset.y_test),
    )
    versions = get_versions()
    if config.framework == "keras":
        from adamkit.app.keras_train import keras_versions

        versions.update(keras_versions())
    document = _config_document(config, dataset, versions, argv, resume)
    session = _Session(
        config, tensors, dataset.image_shape, document, versions, payload, resume, stdout
    )
    _print_header(config, dataset, config.out, stdout)
    if payload is not None:
        position = payload["trainer"]
        print(
            f"  resuming {resume}: {_epochs(position['epoch'])} done"
            + (f", {position['batch']} batches into the next" if position["batch"] else ""),
            file=stdout,
            flush=True,
        )
    out = Path(config.out)
    names = config.compare or (config.optimizer,)
    if config.compare:
        write_config_json(out / "config.json", document)
    histories: dict[str, Any] = {}
    for name, run_dir in zip(names, _run_dirs(config), strict=True):
        prefix = f"[{name}] " if config.compare else ""
        try:
            trainer = _train_one(session, name, run_dir, prefix)
        except (TrainingInterrupted, KeyboardInterrupt) as exc:
            rest = [n for n in names if n != name and n not in histories]
            checkpoint = run_dir / CHECKPOINT_FILES[config.framework]
            return _interrupted(exc, checkpoint, rest, stderr)
        histories[name] = trainer.history
        final = trainer.history[-1]
        print(
            f"{prefix}final test accuracy {final.test_acc:.4f} (test loss "
            f"{final.test_loss:.4f}) after {final.epoch} epochs",
            file=stdout,
            flush=True,
        )
        summary = guard_summary(trainer.history, config.guard)
        if summary is not None:
            print(f"{prefix}{summary}", file=stdout, flush=True)
    if config.compare:
        plot_curves(histories, out / "curves.png", title=_title(config, ", ".join(names)))
    print(f"results in {config.out}", file=stdout, flush=True)
    return EXIT_OK


def _interrupted(
    exc: BaseException, checkpoint: Path, not_trained: Sequence[str], stderr: TextIO
) -> int:
    from adamkit.app.loop import TrainingInterrupted

    if isinstance(exc, TrainingInterrupted):
        print(f"\ninterrupted: {exc}; checkpoint written to {checkpoint}", file=stderr)
    elif checkpoint.exists():
        print(f"\ninterrupted at once; the last finished epoch is in {checkpoint}", file=stderr)
    else:
        print("\ninterrupted before the first checkpoint; nothing to resume", file=stderr)
        return EXIT_INTERRUPTED
    print(f"resume with: adamkit train --resume {shlex.quote(str(checkpoint))}", file=stderr)
    if not_trained:
        print(f"not yet trained in this comparison: {', '.join(not_trained)}", file=stderr)
    stderr.flush()
    return EXIT_INTERRUPTED
