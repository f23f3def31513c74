"""Helpers for the app tests: small MNIST-format files written on the fly."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes holding ``array`` (magic derived from its rank)."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool, magic: int | None = None) -> Path:
    """Write ``array`` as an IDX file at ``path`` (+ ``.gz`` and compressed when ``gz``)."""
    payload = idx_bytes(array, magic)
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_split(rng: np.random.Generator, n: int, size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy images: noise in 0..79, and class k lights pixels 3k..3k+2 (row-major)."""
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 80, size=(n, size * size)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 3 * label : 3 * label + 3] = 255
    return images.reshape(n, size, size), labels


def write_mnist_dir(
    folder: Path, *, gz: bool = True, n_train: int = 64, n_test: int = 32, seed: int = 0
) -> dict:
    """The four IDX files of a tiny MNIST-format data set in ``folder``; returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images, labels = make_split(rng, n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
        arrays[split] = (images, labels)
    return arrays
