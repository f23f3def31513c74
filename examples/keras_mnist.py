"""The classic Keras MNIST program, done right, with adamkit's Adam.

A Sequential MLP (flatten, Dense 128 ReLU, Dense 10 softmax) trained with
``adamkit.keras.Adam(learning_rate=1e-3)`` on inputs scaled to [0, 1], with the labels given to
``fit`` (``sparse_categorical_crossentropy``), the test set as ``validation_data`` so that the
test accuracy is measured every epoch, and the accuracy curves from the ``History`` object saved
as a PNG.

Data (MNIST-format, the first place that has it wins; nothing is downloaded):

1. ``--data-dir DIR``: the four IDX files (raw or ``.gz``) or an ``.npz`` in Keras's layout;
2. ``$ADAMKIT_DATA/mnist`` or ``$ADAMKIT_DATA/fashion-mnist``, then Debian's
   ``/usr/share/datasets/{mnist,fashion-mnist}`` (package ``dataset-fashion-mnist``), then
   adamkit's cache (see :mod:`adamkit.app.data`);
3. Keras's ``~/.keras/datasets/mnist.npz`` (or under ``$KERAS_HOME``);
4. otherwise scikit-learn's bundled 8x8 digits, and the program says so.

Run::

    KERAS_BACKEND=torch python examples/keras_mnist.py --epochs 5 --out keras_mnist_accuracy.png

The backend is Keras's choice (``KERAS_BACKEND``); when unset, torch or else JAX is used.
Exit status 0 on success, 2 with a one-line message when the data cannot be read.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if "KERAS_BACKEND" not in os.environ:  # must be decided before Keras is imported
    for _backend in ("torch", "jax"):
        if importlib.util.find_spec(_backend) is not None:
            os.environ["KERAS_BACKEND"] = _backend
            break

import keras
import numpy as np

from adamkit.app import data
from adamkit.app.errors import DataError
from adamkit.keras import Adam

NUM_CLASSES = 10


def keras_npz_path(env: Mapping[str, str]) -> Path:
    """Where ``keras.datasets.mnist.load_data`` keeps its file (it is never downloaded here)."""
    home = Path(env["KERAS_HOME"]) if env.get("KERAS_HOME") else Path.home() / ".keras"
    return home / "datasets" / "mnist.npz"


def load_data(data_dir: str | None, env: Mapping[str, str] | None = None) -> data.Dataset:
    """Find MNIST-format data as described in the module docstring; fall back to digits.

    Raises ``DataError`` when ``data_dir`` is given but holds no readable data set, or a file
    found is corrupt.
    """
    env = os.environ if env is None else env
    if data_dir is not None:
        return data.load_dataset("mnist", data_dir, env=env, allow_download=False)
    for name in ("mnist", "fashion-mnist"):
        if data.find_data(name, env=env) is not None:
            return data.load_dataset(name, env=env, allow_download=False)
    npz = keras_npz_path(env)
    if npz.is_file():
        return data.load_npz(npz, "mnist")
    print(
        "No MNIST-format data found (--data-dir, $ADAMKIT_DATA, /usr/share/datasets, "
        f"{npz}); using scikit-learn's 8x8 digits instead."
    )
    return data.load_digits()


def build_model(image_shape: Sequence[int]) -> keras.Sequential:
    """Flatten -> Dense(128, ReLU) -> Dense(10, softmax), for images of ``image_shape``."""
    return keras.Sequential(
        [
            keras.Input(shape=tuple(image_shape)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(NUM_CLASSES, activation="softmax"),
        ]
    )


def plot_accuracy(history: dict[str, list[float]], path: Path, title: str) -> None:
    """Save train and test (validation) accuracy per epoch from ``History.history`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["accuracy"]) + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, history["accuracy"], marker="o", label="train")
    ax.plot(epochs, history["val_accuracy"], marker="o", label="test (validation_data)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_xticks(epochs)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder with the IDX files, or an .npz file")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the data (5)")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per step (256)")
    parser.add_argument(
        "--out", type=Path, default=Path("keras_mnist_accuracy.png"), help="PNG for the plot"
    )
    parser.add_argument("--limit", type=int, help="use only the first N train and test samples")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; return the exit status."""
    args = parse_args(argv)
    try:
        dataset = load_data(args.data_dir)
    except DataError as error:
        print(f"keras_mnist: {error}", file=sys.stderr)
        return 2
    x_train, y_train, x_test, y_test = (
        dataset.x_train,
        dataset.y_train,
        dataset.x_test,
        dataset.y_test,
    )
    if args.limit is not None:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
        x_test, y_test = x_test[: args.limit], y_test[: args.limit]
    print(f"data: {dataset.summary()} from {dataset.source}")
    print(
        f"using {len(y_train)} train / {len(y_test)} test, Keras backend {keras.backend.backend()}"
    )

    keras.utils.set_random_seed(0)
    model = build_model(dataset.image_shape)
    model.compile(
        optimizer=Adam(learning_rate=1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history: Any = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        verbose=2,
    )
    accuracy = history.history["val_accuracy"][-1]
    print(f"test accuracy after {args.epochs} epochs: {accuracy:.4f}")
    plot_accuracy(history.history, args.out, f"{dataset.name}: MLP with adamkit.keras.Adam")
    print(f"accuracy plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
