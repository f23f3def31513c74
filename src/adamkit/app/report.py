"""Subscribers that report a run: progress on the terminal, ``metrics.csv``, ``config.json``.

Every file is written whole through a temporary file and ``os.replace`` (:func:`atomic_write_text`),
so a reader never sees a half-written result, even after Ctrl-C or a crash.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, TextIO

from adamkit.app.files import atomic_write
from adamkit.app.loop import COLUMNS, EpochRecord, Trainer

__all__ = [
    "CsvWriter",
    "PlainProgress",
    "TqdmProgress",
    "atomic_write_text",
    "guard_summary",
    "make_progress",
    "versions",
    "write_config_json",
]


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``files.atomic_write``)."""
    with atomic_write(path, binary=False) as handle:
        handle.write(text)


def versions() -> dict[str, str]:
    """Versions of Python, torch, NumPy and adamkit (and the platform) for ``config.json``."""
    import numpy
    import torch

    import adamkit

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a str subclass that torch.load(weights_only) rejects
        "numpy": str(numpy.__version__),
        "adamkit": adamkit.__version__,
        "platform": platform.platform(),
    }


def write_config_json(path: str | os.PathLike[str], document: dict[str, Any]) -> None:
    """Write ``document`` as indented JSON (atomically)."""
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=False) + "\n")


class CsvWriter:
    """Subscriber that rewrites ``metrics.csv`` from the trainer's history at every epoch end.

    Columns: ``epoch, step, train_loss, train_acc, test_loss, test_acc, lr, seconds`` (floats at
    full precision, so a resumed run can be compared exactly), then the stability guard's
    ``grad_norm, grad_norm_max, update_norm, update_ratio, skipped_nonfinite,
    skipped_loss_spike, rollbacks, grad_clipped, update_clipped`` (see
    :class:`~adamkit.app.loop.EpochRecord`; empty cells where the optimizer has no guard or the
    guard did not measure a value).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def attach(self, trainer: Trainer) -> None:
        """Subscribe to ``epoch_end``."""
        trainer.add_callback("epoch_end", self.write)

    def write(self, trainer: Trainer) -> None:
        """Write all epochs of ``trainer.history``."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for record in trainer.history:
            writer.writerow(record.as_dict())
        atomic_write_text(self.path, buffer.getvalue())


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def guard_summary(records: list[EpochRecord], setting: str = "") -> str | None:
    """One line on what the stability guard did over ``records``; ``None`` without a guard.

    ``"guard (all): 3 steps skipped (non-finite), 1 rollback, 17 gradients clipped in 940
    steps"``, or ``"guard (default): nothing skipped, clipped or rolled back in 940 steps"``.
    ``setting`` (the ``--guard`` value) goes in the brackets.  Epochs recorded without a guard
    (``None`` counts) are left out.
    """
    guarded = [r for r in records if r.skipped_nonfinite is not None]
    if not guarded:
        return None

    def total(name: str) -> int:
        return sum(int(getattr(r, name) or 0) for r in guarded)

    parts = []
    if n := total("skipped_nonfinite"):
        parts.append(_count(n, "step") + " skipped (non-finite)")
    if n := total("skipped_loss_spike"):
        parts.append(_count(n, "step") + " skipped (loss spike)")
    if n := total("rollbacks"):
        parts.append(_count(n, "rollback"))
    if n := total("grad_clipped"):
        parts.append(_count(n, "gradient") + " clipped (spike)")
    if n := total("update_clipped"):
        parts.append(_count(n, "update") + " clipped")
    what = ", ".join(parts) if parts else "nothing skipped, clipped or rolled back"
    label = f"guard ({setting})" if setting else "guard"
    return f"{label}: {what} in {_count(guarded[-1].step, 'step')}"


def _epoch_line(trainer: Trainer, prefix: str) -> str:
    record = trainer.history[-1]
    width = len(str(trainer.epochs))
    return (
        f"{prefix}epoch {record.epoch:>{width}}/{trainer.epochs}  "
        f"loss {record.train_loss:.4f}  acc {record.train_acc:.4f}  "
        f"test_loss {record.test_loss:.4f}  test_acc {record.test_acc:.4f}  "
        f"({record.seconds:.1f}s)"
    )


class PlainProgress:
    """Subscriber printing one line per finished epoch (for logs and pipes)."""

    def __init__(self, stream: TextIO | None = None, prefix: str = "") -> None:
        self.stream = stream
        self.prefix = prefix

    def attach(self, trainer: Trainer) -> None:
        """Subscribe to ``epoch_end``."""
        trainer.add_callback("epoch_end", self.epoch_end)

    def epoch_end(self, trainer: Trainer) -> None:
        """Print the epoch's metrics."""
        print(_epoch_line(trainer, self.prefix), file=self.stream or sys.stdout, flush=True)


class TqdmProgress:
    """Subscriber showing a tqdm bar per epoch with the running loss and accuracy."""

    def __init__(self, stream: TextIO | None = None, prefix: str = "") -> None:
        self.stream = stream
        self.prefix = prefix
        self.bar: Any = None

    def attach(self, trainer: Trainer) -> None:
        """Subscribe to ``epoch_start``, ``batch_end``, ``epoch_end`` and ``interrupt``."""
        trainer.add_callback("epoch_start", self.epoch_start)
        trainer.add_callback("batch_end", self.batch_end)
        trainer.add_callback("epoch_end", self.epoch_end)
        trainer.add_callback("interrupt", self.close)

    def epoch_start(self, trainer: Trainer) -> None:
        """Open the bar (starting where a resumed epoch left off)."""
        from tqdm import tqdm

        stream = self.stream or sys.stdout
        # A pseudo-terminal without a size (e.g. under `script`) reports 0 x 0, which makes
        # tqdm draw nothing: fall back to a fixed size then.
        sized = _columns(stream) >= 40
        self.bar = tqdm(
            total=trainer.batches_per_epoch,
            initial=trainer.batch,
            desc=f"{self.prefix}epoch {trainer.epoch + 1}/{trainer.epochs}",
            unit="batch",
            file=stream,
            dynamic_ncols=sized,
            ncols=None if sized else 140,
            nrows=None if sized else 24,
            leave=True,
        )

    def batch_end(self, trainer: Trainer) -> None:
        """Advance the bar and show the epoch's running loss and accuracy."""
        if self.bar is not None:
            postfix = {"loss": f"{trainer.running_loss:.4f}", "acc": f"{trainer.running_acc:.4f}"}
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def epoch_end(self, trainer: Trainer) -> None:
        """Show the epoch's final numbers, test accuracy included, and close the bar."""
        if self.bar is not None:
            record = trainer.history[-1]
            postfix = {
                "loss": f"{record.train_loss:.4f}",
                "acc": f"{record.train_acc:.4f}",
                "test_loss": f"{record.test_loss:.4f}",
                "test_acc": f"{record.test_acc:.4f}",
            }
            self.bar.set_postfix(postfix)
        self.close(trainer)

    def close(self, trainer: Trainer) -> None:
        """Close the bar if one is open."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


def make_progress(stream: TextIO | None = None, prefix: str = "") -> PlainProgress | TqdmProgress:
    """A tqdm bar when ``stream`` (default stdout) is a terminal, else one line per epoch."""
    target = stream or sys.stdout
    isatty = getattr(target, "isatty", None)
    if callable(isatty) and isatty():
        return TqdmProgress(stream, prefix)
    return PlainProgress(stream, prefix)
