"""The Keras side of ``adamkit train --framework keras``: the model, the data order and the loop.

Imports Keras: reach it through ``keras_train``, whose ``require_keras()`` chooses the backend
first.  :class:`KerasTrainer` runs ``model.fit`` and emits ``loop.Trainer``'s
events with the same attributes, so the app's subscribers (progress lines, ``metrics.csv``,
``curves.png``) work unchanged; ``keras_train.py`` lists how this path differs from torch's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from adamkit.app.errors import CheckpointError
from adamkit.app.loop import EpochRecord, EventSource, TrainingInterrupted

__all__ = ["EpochBatches", "KerasTrainer", "build_model", "load_checkpoint_model"]


def build_model(image_shape: Sequence[int], hidden: int, classes: int = 10) -> keras.Sequential:
    """``Flatten -> Dense(hidden, relu) -> Dense(classes, softmax)`` for images of ``image_shape``.

    Input float32 ``(N, *image_shape)``; output class probabilities ``(N, classes)``.  Weights use
    Keras's default initialisers, drawn from Keras's global seed (set it first).  Raises
    ``ValueError`` for a non-positive size.
    """
    sizes = (("input size", math.prod(image_shape)), ("hidden", hidden), ("classes", classes))
    for what, value in sizes:
        if value < 1:
            raise ValueError(f"{what} must be >= 1, got {value}")
    # Fixed layer names keep the variable paths in checkpoint.keras the same in every process.
    return keras.Sequential(
        [
            keras.Input(shape=tuple(image_shape)),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dense(classes, activation="softmax", name="output"),
        ],
        name="mlp",
    )


def load_checkpoint_model(path: str, image_shape: Sequence[int]) -> keras.Model:
    """The compiled model, with its optimizer state, saved in ``path`` (a ``checkpoint.keras``).

    Raises ``CheckpointError`` if Keras cannot load it, or its input shape is not
    ``image_shape``.
    """
    try:
        model = keras.models.load_model(path)
    except Exception as exc:  # Keras raises many types for a damaged archive; report one line
        text = str(exc).strip().splitlines()
        raise CheckpointError(
            f"--resume {path}: Keras cannot load the model ({text[0] if text else exc!r})"
        ) from None
    saved = tuple(model.input_shape[1:])
    if saved != tuple(image_shape):
        raise CheckpointError(
            f"--resume {path}: the saved model takes images of shape {saved}, the data set has "
            f"{tuple(image_shape)}"
        )
    if model.optimizer is None:
        raise CheckpointError(f"--resume {path}: the saved model has no optimizer state")
    return model


def _shortest(value: Any) -> float:
    # The learning rate is a float32 variable: report the shortest decimal that is that float32
    # (0.001, not 0.0010000000474974513), as the torch path reports the lr it was given.
    return float(str(np.asarray(value)[()]))


class EpochBatches(keras.utils.PyDataset):
    """Mini-batches ``(x[rows], y[rows])`` of one epoch, in an order fixed by seed and epoch.

    Epoch ``e`` visits the rows in ``numpy.random.default_rng([seed, e]).permutation(len(x))``
    order, ``batch_size`` at a time (the last batch is smaller if it does not divide).  Set
    :attr:`epoch` before an epoch starts, and call ``fit`` with ``shuffle=False`` (otherwise
    Keras shuffles the batches again with Python's ``random``).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> None:
        super().__init__()  # one worker, no processes: batches are cut in order, when asked for
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.epoch = 0
        self._rows = np.arange(0)
        self._rows_epoch = -1

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of the training rows in epoch ``epoch``."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.x))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._rows_epoch != self.epoch:
            self._rows, self._rows_epoch = self.order(self.epoch), self.epoch
        rows = self._rows[index * self.batch_size : (index + 1) * self.batch_size]
        return self.x[rows], self.y[rows]


class _Events(keras.callbacks.Callback):
    """Turns Keras's callback hooks into :class:`KerasTrainer`'s events."""

    def __init__(self, trainer: KerasTrainer) -> None:
        super().__init__()
        self.trainer = trainer

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.trainer.trigger("train_start")

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.trainer._epoch_begin(epoch)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.trainer._batch_end(batch)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.trainer._epoch_end(logs or {})


class KerasTrainer(EventSource):
    """``model.fit`` over :class:`EpochBatches` with the test set as validation data, emitting
    ``loop.Trainer``'s events (``train_start, (epoch_start, batch_end * n, epoch_end) * epochs,
    train_end``; ``interrupt`` after :meth:`request_stop`).

    ``model`` is a compiled Keras classifier with ``loss`` and ``accuracy`` metrics; ``x_*`` are
    float32 ``(N, ...)`` arrays, ``y_*`` integer ``(N,)`` arrays; ``epochs`` is the total (a
    resumed trainer continues up to it).  Attributes subscribers read, as on ``loop.Trainer``:
    ``model``, ``epoch`` (epochs finished), ``batch`` (batches finished in the current epoch),
    ``batches_per_epoch``, ``step`` (optimizer steps), ``epochs``, ``history``.
    """

    def __init__(
        self,
        model: keras.Model,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        seed: int,
        verbose: int = 0,
        eval_batch_size: int = 4096,
    ) -> None:
        if epochs < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError(
                f"epochs, batch_size and eval_batch_size must be >= 1, got "
                f"{epochs}, {batch_size}, {eval_batch_size}"
            )
        if len(x_train) != len(y_train) or len(x_test) != len(y_test) or len(x_train) == 0:
            raise ValueError("x/y sizes must match and the training set must not be empty")
        self.model = model
        self.data = EpochBatches(x_train, y_train, batch_size, seed)
        self.x_test, self.y_test = x_test, y_test
        self.epochs, self.batch_size, self.eval_batch_size = epochs, batch_size, eval_batch_size
        self.verbose = verbose
        self.batches_per_epoch = len(self.data)
        self.epoch = 0
        self.batch = 0
        self.step = 0
        self.history: list[EpochRecord] = []
        self._started = 0.0
        self._init_events()

    def request_stop(self) -> None:
        """Ask ``fit`` to stop after the current batch (safe from a signal handler)."""
        super().request_stop()
        self.model.stop_training = True

    @property
    def finished(self) -> bool:
        """Whether all ``epochs`` are done."""
        return self.epoch >= self.epochs

    # ------------------------------------------------------------------ training

    def run(self) -> list[EpochRecord]:
        """Train until ``epochs`` epochs are done; return the history.

        Raises ``TrainingInterrupted`` (after the ``interrupt`` event) when a stop was requested
        before the end and at least one epoch is saved, ``KeyboardInterrupt`` when none is.
        """
        self.model.fit(
            self.data,
            epochs=self.epochs,
            initial_epoch=self.epoch,
            shuffle=False,  # the order is EpochBatches's
            validation_data=(self.x_test, self.y_test),
            validation_batch_size=self.eval_batch_size,
            verbose=self.verbose,
            callbacks=[_Events(self)],
        )
        if not self.finished:
            self.trigger("interrupt")
            if self.epoch == 0:  # no checkpoint yet: the same as an immediate interrupt
                raise KeyboardInterrupt
            where = f"after epoch {self.epoch} of {self.epochs}"
            if self.batch:
                where = (
                    f"in epoch {self.epoch + 1} of {self.epochs}, after batch "
                    f"{self.batch}/{self.batches_per_epoch} (--resume repeats that epoch)"
                )
            raise TrainingInterrupted(f"stopped {where}")
        self.trigger("train_end")
        return self.history

    def _epoch_begin(self, epoch: int) -> None:
        self.data.epoch = epoch
        self.batch = 0
        self.trigger("epoch_start")
        self._started = time.perf_counter()

    def _batch_end(self, batch: int) -> None:
        self.batch = batch + 1
        if self._stop_requested:  # fit clears stop_training when it starts
            self.model.stop_training = True
        self.trigger("batch_end")

    def _epoch_end(self, logs: dict[str, Any]) -> None:
        if self.batch < self.batches_per_epoch:  # stopped mid-epoch: nothing to record
            return
        seconds = time.perf_counter() - self._started
        optimizer = self.model.optimizer
        self.step = int(keras.ops.convert_to_numpy(optimizer.iterations))
        self.history.append(
            EpochRecord(
                epoch=self.epoch + 1,
                step=self.step,
                train_loss=float(logs["loss"]),
                train_acc=float(logs["accuracy"]),
                test_loss=float(logs["val_loss"]),
                test_acc=float(logs["val_accuracy"]),
                lr=_shortest(keras.ops.convert_to_numpy(optimizer.learning_rate)),
                seconds=seconds,
            )
        )
        self.epoch += 1
        self.batch = 0
        self.trigger("epoch_end")

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """The loop's position, JSON-ready: epochs done, optimizer steps, history."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "history": [record.as_dict() for record in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (the model carries its own state).

        Raises ``ValueError``/``TypeError``/``KeyError`` if it is incomplete or inconsistent.
        """
        history = [EpochRecord(**record) for record in state["history"]]
        if len(history) != state["epoch"]:
            raise ValueError(f"history has {len(history)} epochs, position says {state['epoch']}")
        self.epoch, self.step, self.batch = state["epoch"], state["step"], 0
        self.history = history
