"""The training loop.  It trains and evaluates, and otherwise only emits events.

Progress bars, the CSV log, checkpoints and plots are subscribers (``trainer.add_callback(event,
fn)``, minGPT-style); each callback receives the :class:`Trainer` and reads what it needs from it.
Events, in order::

    train_start, (epoch_start, batch_end * n, epoch_end) * epochs, train_end
    interrupt    -- after request_stop(), at the next batch boundary, instead of continuing

Determinism: the only randomness is the order of the training examples, drawn per epoch with
``torch.randperm`` from ``generator``.  The generator's state at the start of the current epoch
is part of :meth:`Trainer.state_dict`, together with the position inside the epoch, so a run that
is stopped (at an epoch end or mid-epoch) and resumed replays the same batches in the same order
and ends bit-identical to an uninterrupted run on CPU.

Train loss and accuracy of an epoch are means over that epoch's batches as they were trained
(weighted by batch size, as Keras reports them); test loss and accuracy are computed on the whole
test set after the epoch.

Stability guard: when the optimizer has one (``optimizer.guard`` is not ``None``: adamkit's
optimizers, ``adamkit.torch.GuardedOptimizer``), each step gets the batch loss
(``step(loss=...)``) for loss-spike handling, and the epoch's :class:`EpochRecord` carries the
guard's diagnostics (:data:`GUARD_COLUMNS`); without one those fields are ``None``.  A skipped
step still counts in ``step`` (it is a batch trained on, not an update applied).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BASE_COLUMNS",
    "COLUMNS",
    "EVENTS",
    "GUARD_COLUMNS",
    "EpochRecord",
    "Trainer",
    "TrainingInterrupted",
]

EVENTS = ("train_start", "epoch_start", "batch_end", "epoch_end", "interrupt", "train_end")

Callback = Callable[["Trainer"], None]


@dataclass(frozen=True)
class EpochRecord:
    """Metrics of one finished epoch (``epoch`` counts from 1; ``step`` = optimizer steps so far;
    ``seconds`` = wall time of that epoch, training and evaluation).

    Guard diagnostics of the epoch (``None`` when the optimizer has no guard, or where the guard
    did not measure them): ``grad_norm`` mean and ``grad_norm_max`` of the finite global gradient
    norms (before any clipping); ``update_norm`` and ``update_ratio`` means of the applied
    updates' L2 norm and of update norm / parameter norm (``"all"`` measures them); counts of
    steps ``skipped_nonfinite`` (NaN/Inf gradients), ``skipped_loss_spike``, ``rollbacks`` (to
    the last snapshot), ``grad_clipped`` (gradient-spike clipping) and ``update_clipped`` (at
    least one tensor's update clipped).
    """

    epoch: int
    step: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    seconds: float
    grad_norm: float | None = None
    grad_norm_max: float | None = None
    update_norm: float | None = None
    update_ratio: float | None = None
    skipped_nonfinite: int | None = None
    skipped_loss_spike: int | None = None
    rollbacks: int | None = None
    grad_clipped: int | None = None
    update_clipped: int | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        """Field name -> value, in CSV column order."""
        return asdict(self)


#: Every CSV column: :data:`BASE_COLUMNS` (the first release's, unchanged) + :data:`GUARD_COLUMNS`.
COLUMNS = tuple(f.name for f in fields(EpochRecord))
BASE_COLUMNS = COLUMNS[: COLUMNS.index("seconds") + 1]
GUARD_COLUMNS = COLUMNS[len(BASE_COLUMNS) :]

# Guard action -> the per-epoch counter it increments; flags of the diagnostics -> counter.
_ACTION_COUNTS = {
    "skip_nonfinite": "skipped_nonfinite",
    "skip_loss_spike": "skipped_loss_spike",
    "rollback": "rollbacks",
}
_FLAG_COUNTS = {"grad_clipped": "grad_clipped", "update_clipped": "update_clipped"}


def _fresh_sums() -> dict[str, Any]:
    # Everything an epoch accumulates, as plain numbers (saved in checkpoints mid-epoch).
    return {
        "loss": 0.0,
        "correct": 0,
        "seen": 0,
        "seconds": 0.0,
        "grad_norm_sum": 0.0,
        "grad_norm_n": 0,
        "grad_norm_max": 0.0,
        "update_norm_sum": 0.0,
        "update_ratio_sum": 0.0,
        "update_n": 0,
        **dict.fromkeys((*_ACTION_COUNTS.values(), *_FLAG_COUNTS.values()), 0),
    }


class TrainingInterrupted(Exception):
    """Raised by :meth:`Trainer.run` after the ``interrupt`` event (a stop was requested)."""


class EventSource:
    """Callbacks by event name and a stop flag: what the app's trainers (torch, Keras) share.

    The loop only emits events; progress, CSV, checkpoints and plots subscribe to them.
    """

    def _init_events(self) -> None:
        self._callbacks: dict[str, list[Callback]] = defaultdict(list)
        self._stop_requested = False

    def add_callback(self, event: str, callback: Callback) -> None:
        """Call ``callback(trainer)`` on ``event`` (one of :data:`EVENTS`)."""
        if event not in EVENTS:
            raise ValueError(f"event must be one of {', '.join(EVENTS)}, got {event!r}")
        self._callbacks[event].append(callback)

    def trigger(self, event: str) -> None:
        """Run the callbacks of ``event`` in the order they were added."""
        for callback in self._callbacks.get(event, []):
            callback(self)

    def request_stop(self) -> None:
        """Ask the loop to stop at the next batch boundary (safe from a signal handler)."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`request_stop` was called."""
        return self._stop_requested


class Trainer(EventSource):
    """Mini-batch training of a classifier with cross-entropy on logits.

    ``x_*``: float tensors ``(N, ...)``; ``y_*``: int64 tensors ``(N,)``.  ``epochs`` is the
    total number of epochs (a resumed trainer continues up to it).  Public attributes that
    callbacks read: ``epoch`` (epochs finished), ``batch`` (batches finished in the current
    epoch), ``batches_per_epoch``, ``step``, ``last_loss``/``last_acc`` (of the latest batch),
    ``running_loss``/``running_acc`` (current epoch so far), ``history`` (``EpochRecord`` list),
    ``guarded`` (whether the optimizer has a stability guard; see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        *,
        epochs: int,
        batch_size: int,
        generator: torch.Generator,
        eval_batch_size: int = 4096,
    ) -> None:
        if epochs < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError(
                f"epochs, batch_size and eval_batch_size must be >= 1, got "
                f"{epochs}, {batch_size}, {eval_batch_size}"
            )
        if len(x_train) != len(y_train) or len(x_test) != len(y_test) or len(x_train) == 0:
            raise ValueError("x/y sizes must match and the training set must not be empty")
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.epochs, self.batch_size, self.eval_batch_size = epochs, batch_size, eval_batch_size
        self.batches_per_epoch = math.ceil(len(x_train) / batch_size)
        self.epoch = 0
        self.batch = 0
        self.step = 0
        self.history: list[EpochRecord] = []
        self.last_loss = math.nan
        self.last_acc = math.nan
        self._epoch_start_rng = generator.get_state()
        self._sums = _fresh_sums()
        self.guarded = getattr(optimizer, "guard", None) is not None
        self._init_events()

    @property
    def finished(self) -> bool:
        """Whether all ``epochs`` are done."""
        return self.epoch >= self.epochs and self.batch == 0

    @property
    def running_loss(self) -> float:
        """Mean training loss over the current epoch's batches so far (nan before the first)."""
        seen = self._sums["seen"]
        return self._sums["loss"] / seen if seen else math.nan

    @property
    def running_acc(self) -> float:
        """Training accuracy over the current epoch's batches so far (nan before the first)."""
        seen = self._sums["seen"]
        return self._sums["correct"] / seen if seen else math.nan

    # ------------------------------------------------------------------ training

    def run(self) -> list[EpochRecord]:
        """Train until ``epochs`` epochs are done; return the history.

        Raises :class:`TrainingInterrupted` (after the ``interrupt`` event) when a stop was
        requested before the end.
        """
        self.trigger("train_start")
        while self.epoch < self.epochs:
            self._check_stop()
            self._run_epoch()
        self.trigger("train_end")
        return self.history

    def _check_stop(self) -> None:
        if self._stop_requested:
            self.trigger("interrupt")
            if self.batch == 0:
                where = f"after epoch {self.epoch} of {self.epochs}"
            else:
                where = (
                    f"in epoch {self.epoch + 1} of {self.epochs}, after batch "
                    f"{self.batch}/{self.batches_per_epoch}"
                )
            raise TrainingInterrupted(f"stopped {where}")

    def _run_epoch(self) -> None:
        # Replaying from the epoch's start state gives the same permutation after a resume.
        self.generator.set_state(self._epoch_start_rng)
        order = torch.randperm(len(self.x_train), generator=self.generator)
        self.trigger("epoch_start")
        started = time.perf_counter()
        self.model.train()
        for index in range(self.batch, self.batches_per_epoch):
            batch = order[index * self.batch_size : (index + 1) * self.batch_size]
            self._train_batch(self.x_train[batch], self.y_train[batch])
            self.batch = index + 1
            self.trigger("batch_end")
            if self._stop_requested and self.batch < self.batches_per_epoch:
                self._sums["seconds"] += time.perf_counter() - started
                self._check_stop()
        test_loss, test_acc = self.evaluate(self.x_test, self.y_test)
        seconds = self._sums["seconds"] + time.perf_counter() - started
        self.history.append(
            EpochRecord(
                epoch=self.epoch + 1,
                step=self.step,
                train_loss=self.running_loss,
                train_acc=self.running_acc,
                test_loss=test_loss,
                test_acc=test_acc,
                lr=float(self.optimizer.param_groups[0]["lr"]),
                seconds=seconds,
                **self._guard_summary(),
            )
        )
        self.epoch += 1
        self.batch = 0
        self._sums = _fresh_sums()
        self._epoch_start_rng = self.generator.get_state()
        self.trigger("epoch_end")

    def _train_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.guarded:
            self.optimizer.step(loss=loss.detach())
            self._record_guard(self.optimizer.guard_diagnostics)
        else:
            self.optimizer.step()
        self.step += 1
        count = len(y)
        self.last_loss = float(loss.item())
        correct = int((logits.detach().argmax(dim=1) == y).sum().item())
        self.last_acc = correct / count
        self._sums["loss"] += self.last_loss * count
        self._sums["correct"] += correct
        self._sums["seen"] += count

    def _record_guard(self, diag: dict[str, Any]) -> None:
        sums = self._sums
        norm = diag.get("grad_norm")
        if norm is not None and math.isfinite(norm):
            sums["grad_norm_sum"] += norm
            sums["grad_norm_n"] += 1
            sums["grad_norm_max"] = max(sums["grad_norm_max"], norm)
        update, ratio = diag.get("update_norm"), diag.get("update_ratio")
        if diag.get("applied") and update is not None and ratio is not None:
            sums["update_norm_sum"] += update
            sums["update_ratio_sum"] += ratio
            sums["update_n"] += 1
        counter = _ACTION_COUNTS.get(diag.get("action"))
        if counter is not None:
            sums[counter] += 1
        for flag, name in _FLAG_COUNTS.items():
            if diag.get(flag):
                sums[name] += 1

    def _guard_summary(self) -> dict[str, Any]:
        # The guard fields of this epoch's EpochRecord (empty dict: all None, no guard).
        sums = self._sums
        if not self.guarded:
            return {}
        out: dict[str, Any] = {
            name: int(sums[name]) for name in (*_ACTION_COUNTS.values(), *_FLAG_COUNTS.values())
        }
        if sums["grad_norm_n"]:
            out["grad_norm"] = sums["grad_norm_sum"] / sums["grad_norm_n"]
            out["grad_norm_max"] = sums["grad_norm_max"]
        if sums["update_n"]:
            out["update_norm"] = sums["update_norm_sum"] / sums["update_n"]
            out["update_ratio"] = sums["update_ratio_sum"] / sums["update_n"]
        return out

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Mean cross-entropy and accuracy of the model on ``(x, y)``, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        loss_sum, correct = 0.0, 0
        for start in range(0, len(x), self.eval_batch_size):
            xb, yb = (
                x[start : start + self.eval_batch_size],
                y[start : start + self.eval_batch_size],
            )
            logits = self.model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum").item())
            correct += int((logits.argmax(dim=1) == yb).sum().item())
        self.model.train(was_training)
        return loss_sum / len(x), correct / len(x)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """The loop's position: epoch, batch, step, this epoch's sums, history, shuffle RNG."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "sums": dict(self._sums),
            "history": [record.as_dict() for record in self.history],
            "epoch_start_rng": self._epoch_start_rng.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`.

        Raises ``ValueError`` if keys are missing or the position does not fit this trainer
        (batch beyond the epoch's batches, e.g. because the batch size changed).
        """
        keys = {"epoch", "batch", "step", "sums", "history", "epoch_start_rng"}
        missing = keys - set(state)
        if missing:
            raise ValueError(f"trainer state lacks {', '.join(sorted(missing))}")
        if not 0 <= state["batch"] < self.batches_per_epoch:
            raise ValueError(
                f"saved batch position {state['batch']} does not fit "
                f"{self.batches_per_epoch} batches per epoch"
            )
        history = [EpochRecord(**record) for record in state["history"]]
        if len(history) != state["epoch"]:
            raise ValueError(f"history has {len(history)} epochs, position says {state['epoch']}")
        self.generator.set_state(state["epoch_start_rng"])
        self._epoch_start_rng = state["epoch_start_rng"].clone()
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        # Checkpoints from before the guard columns lack their sums: they start at zero.
        self._sums = {**_fresh_sums(), **state["sums"]}
        self.history = history
