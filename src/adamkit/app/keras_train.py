"""``adamkit train --framework keras``: the same run through Keras 3, with the same outputs.

The model is the torch path's MLP written in Keras (``Flatten -> Dense(hidden, relu) ->
Dense(10, softmax)``, loss ``sparse_categorical_crossentropy``, metric ``accuracy``), trained by
``model.fit`` on the same data (``data.py``) with the same epochs, batch size, learning rate and
seed, and reported by the app's own subscribers: ``metrics.csv`` (the same columns),
``curves.png``, ``config.json`` (``settings.framework = "keras"``; ``versions`` adds ``keras``,
``keras_backend`` and, for a backend other than torch, its version) and one line per epoch when
stdout is not a terminal (on a terminal, Keras's own progress bar).  The pieces that subclass
Keras live in ``keras_loop.py``.

Keras's backend is ``$KERAS_BACKEND`` when set (``jax`` works too), else ``torch``.  Keras reads
it on its first import, which happens here (:func:`require_keras`), only for this framework.

Differences from the torch path, so that the two are compared for what they are:

- **Initial weights**: Keras's defaults (Glorot-uniform kernels, zero biases) drawn after
  ``keras.utils.set_random_seed(seed)``, not torch's (Kaiming-uniform weights, uniform biases).
  The same seed gives the same weights within a framework, not across the two.
- **Loss**: softmax, then cross-entropy of the probabilities clipped to [1e-7, 1 - 1e-7]
  (Keras's way), not cross-entropy of the logits; the two agree unless a probability is < 1e-7.
- **Data order**: epoch ``e`` (from 0) visits the training set in the order
  ``numpy.random.default_rng([seed, e]).permutation(n)``, not ``torch.randperm``'s.  It depends
  only on the seed and the epoch, which is what makes resuming exact.
- **Checkpoint**: ``checkpoint.keras``, Keras's native format (a zip with the model's config,
  weights and optimizer state, which ``keras.models.load_model`` opens once ``adamkit.keras`` is
  imported) plus one member, ``adamkit-run.json``: format, version, settings, epochs done,
  optimizer steps, the metrics history and the versions.  It is written whole (temporary file,
  then ``os.replace``) at the end of every epoch.
- **Ctrl-C** stops after the current batch, as on the torch path, but the checkpoint keeps the
  last *finished* epoch (Keras has no mid-epoch position to save): ``--resume`` repeats the
  interrupted epoch from its start and ends exactly where an uninterrupted run ends.
- **Timing**: ``seconds`` is the wall time from Keras's ``on_epoch_begin`` to ``on_epoch_end``
  (training and evaluation on the test set), like the torch path's; on the torch backend both
  paths run with one intra-op thread.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from adamkit.app.errors import CheckpointError, UsageError
from adamkit.app.files import atomic_write

if TYPE_CHECKING:
    from adamkit.app.keras_loop import KerasTrainer

__all__ = [
    "BACKEND_VARIABLE",
    "CHECKPOINT_NAME",
    "DEFAULT_BACKEND",
    "FORMAT",
    "RUN_MEMBER",
    "VERSION",
    "KerasCheckpointWriter",
    "build_trainer",
    "describe_keras",
    "keras_versions",
    "read_checkpoint",
    "require_keras",
    "save_checkpoint",
]

BACKEND_VARIABLE = "KERAS_BACKEND"
DEFAULT_BACKEND = "torch"  # the backend the app's own dependencies always provide
CHECKPOINT_NAME = "checkpoint.keras"
RUN_MEMBER = "adamkit-run.json"
FORMAT = "adamkit.train-checkpoint-keras"
VERSION = 1
EVAL_BATCH_SIZE = 4096  # the torch path's evaluation batch; it only changes the speed
_INSTALL = "pip install adamkit[keras]"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require_keras() -> ModuleType:
    """Import Keras 3 and ``adamkit.keras``; return the ``keras`` module.

    Sets ``$KERAS_BACKEND`` to ``torch`` first unless the user set it.  Raises ``UsageError``
    (one line) naming what to install when Keras is missing, or Keras's reason when it cannot
    load its backend.
    """
    os.environ.setdefault(BACKEND_VARIABLE, DEFAULT_BACKEND)
    try:
        import keras

        import adamkit.keras  # noqa: F401 - registers adamkit's optimizers for load_model
    except ImportError as exc:
        if importlib.util.find_spec("keras") is None:
            raise UsageError(
                f"--framework keras needs Keras 3 and a backend (torch or jax): {_INSTALL}"
            ) from None
        raise UsageError(f"--framework keras: {_first_line(exc)}") from None
    return keras


def keras_versions() -> dict[str, str]:
    """``keras``, ``keras_backend`` and the backend's version (torch's is already reported)."""
    keras = require_keras()
    backend = keras.backend.backend()
    versions = {"keras": str(keras.__version__), "keras_backend": backend}
    if backend != "torch":
        versions[backend] = str(getattr(importlib.import_module(backend), "__version__", "?"))
    return versions


def describe_keras() -> str:
    """One line for the run's header: Keras's version and backend."""
    keras = require_keras()
    backend = keras.backend.backend()
    return f"Keras {keras.__version__} on the {backend} backend (${BACKEND_VARIABLE})"


def save_checkpoint(model: Any, run_state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``model`` (with its optimizer) in Keras's format plus ``run_state`` as
    :data:`RUN_MEMBER`, atomically: ``path`` is replaced whole or left as it was."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as staging:
        staged = Path(staging) / "model.keras"  # Keras insists on the suffix
        model.save(staged)
        with zipfile.ZipFile(staged, "a", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(RUN_MEMBER, json.dumps(run_state, indent=1))
        with atomic_write(path) as handle, staged.open("rb") as source:
            shutil.copyfileobj(source, handle)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the run state of a ``checkpoint.keras``, without importing Keras.

    Returns the :data:`RUN_MEMBER` dict with ``trainer["batch"] = 0`` (a Keras checkpoint is
    always at an epoch end).  Raises ``CheckpointError`` (one line naming the file) if the file
    is missing, not a zip, not an adamkit training checkpoint, of an unknown version, or lacks an
    entry.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file")
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.read(RUN_MEMBER) if RUN_MEMBER in archive.namelist() else None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(
            f"--resume {path}: not a readable checkpoint ({_first_line(exc)})"
        ) from None
    if member is None:
        raise CheckpointError(
            f"--resume {path}: not an adamkit training checkpoint (a Keras file without "
            f"{RUN_MEMBER})"
        )
    try:
        payload = json.loads(member)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"--resume {path}: unreadable {RUN_MEMBER} ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"--resume {path}: not an adamkit training checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"--resume {path}: checkpoint version {payload.get('version')!r} is not supported "
            f"(this adamkit reads version {VERSION})"
        )
    position = payload.get("trainer")
    if not (
        isinstance(payload.get("config"), dict)
        and isinstance(position, dict)
        and all(isinstance(position.get(key), int) for key in ("epoch", "step"))
        and isinstance(position.get("history"), list)
    ):
        raise CheckpointError(f"--resume {path}: checkpoint has no valid config or position")
    position["batch"] = 0
    return payload


class KerasCheckpointWriter:
    """Subscriber that writes ``checkpoint.keras`` (see :func:`save_checkpoint`) at every
    ``epoch_end``, with ``config`` and ``versions`` stored as they are."""

    def __init__(
        self, path: str | os.PathLike[str], config: dict[str, Any], versions: dict[str, str]
    ) -> None:
        self.path = Path(path)
        self.config = config
        self.versions = versions

    def attach(self, trainer: KerasTrainer) -> None:
        """Subscribe to ``trainer``'s ``epoch_end``."""
        trainer.add_callback("epoch_end", self.write)

    def write(self, trainer: KerasTrainer) -> None:
        """Save ``trainer.model`` and its position."""
        run_state = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config,
            "versions": self.versions,
            "trainer": trainer.state_dict(),
        }
        save_checkpoint(trainer.model, run_state, self.path)


def build_trainer(session: Any, name: str, run_dir: Path, prefix: str) -> KerasTrainer:
    """A ready-to-run Keras trainer for optimizer ``name``, its subscribers attached.

    ``session`` is ``train._Session`` (config, data tensors, config.json document, versions,
    the checkpoint being resumed).  Writes ``run_dir/config.json``.  Raises ``UsageError`` or
    ``CheckpointError``.
    """
    keras = require_keras()
    from adamkit.app import keras_loop
    from adamkit.app.optimizers import KERAS_OPTIMIZERS
    from adamkit.app.plots import plot_curves
    from adamkit.app.report import CsvWriter, PlainProgress, make_progress, write_config_json

    config = session.config
    run_config = config.replace(optimizer=name, compare=(), out=str(run_dir))
    x_train, y_train, x_test, y_test = (t.numpy() for t in session.tensors)
    # JAX has no int64 without x64 mode; labels 0..9 fit any integer type.
    y_train, y_test = y_train.astype("int32"), y_test.astype("int32")
    keras.utils.set_random_seed(config.seed)  # the same initial weights for every optimizer
    resuming = session.payload is not None and session.resume is not None
    if resuming:
        model = keras_loop.load_checkpoint_model(session.resume, session.image_shape)
    else:
        model = keras_loop.build_model(session.image_shape, config.hidden)
        model.compile(
            optimizer=KERAS_OPTIMIZERS[name].factory(run_config),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    progress = make_progress(session.stdout, prefix)
    plain = isinstance(progress, PlainProgress)
    trainer = keras_loop.KerasTrainer(
        model,
        x_train,
        y_train,
        x_test,
        y_test,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        verbose=0 if plain else 1,
        eval_batch_size=EVAL_BATCH_SIZE,
    )
    if resuming:
        try:
            trainer.load_state_dict(session.payload["trainer"])
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(
                f"--resume {session.resume}: training position does not fit ({_first_line(exc)})"
            ) from None
    document = {**session.document, "settings": run_config.to_dict()}
    write_config_json(run_dir / "config.json", document)
    if plain:
        progress.attach(trainer)
    elif prefix:
        trainer.add_callback("train_start", lambda t: print(prefix.strip(), file=session.stdout))
    CsvWriter(run_dir / "metrics.csv").attach(trainer)
    KerasCheckpointWriter(run_dir / CHECKPOINT_NAME, run_config.to_dict(), session.versions).attach(
        trainer
    )
    title = (
        f"{config.dataset}: {name} (Keras, {keras.backend.backend()}), lr {config.lr:g}, "
        f"batch size {config.batch_size}"
    )

    def draw(t: KerasTrainer) -> None:
        if t.history:
            plot_curves({name: t.history}, run_dir / "curves.png", title=title)

    trainer.add_callback("train_end", draw)
    trainer.add_callback("interrupt", draw)
    return trainer
