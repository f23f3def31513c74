"""Data sets for ``adamkit train``: bundled digits, MNIST-format IDX files, Keras ``.npz`` files.

Every loader returns a :class:`Dataset` of float32 images in [0, 1] with shape ``(N, H, W)`` and
int64 labels in ``0..9`` with shape ``(N,)``.  Every problem with a file (missing, truncated,
corrupt, wrong magic number, inconsistent sizes, labels out of range) raises
:class:`~adamkit.app.errors.DataError` with one line naming the file and what is wrong.

Where MNIST-format data is looked for, in order (the first place that has it wins):

1. ``--data-dir DIR`` (a folder, or an ``.npz`` file); nothing else is searched when it is given;
2. ``$ADAMKIT_DATA/<dataset>/`` (a root holding one folder per data set, like Debian's);
3. ``/usr/share/datasets/<dataset>/`` (Debian's ``dataset-fashion-mnist`` installs there);
4. ``$ADAMKIT_CACHE/<dataset>/`` or ``~/.cache/adamkit/<dataset>/`` (where downloads go);
5. for ``mnist`` only: a download into 4 (see ``download.py``).

A folder holds either the four IDX files (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or
``.gz``) or ``<dataset>.npz`` with arrays ``x_train, y_train, x_test, y_test`` (Keras's layout;
``mnist.npz`` is Keras's own file name).
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from adamkit.app.errors import DataError, UsageError

__all__ = [
    "IDX_FILES",
    "IMAGE_MAGIC",
    "LABEL_MAGIC",
    "NUM_CLASSES",
    "SYSTEM_DATA_DIR",
    "Dataset",
    "cache_root",
    "find_data",
    "load_dataset",
    "load_digits",
    "load_idx_dir",
    "load_npz",
    "read_idx",
]

IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions (count, rows, columns)
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension (count)
NUM_CLASSES = 10

#: The four IDX files of an MNIST-format data set: (split, kind) -> file name without ``.gz``.
IDX_FILES: dict[tuple[str, str], str] = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

#: Debian's root for data-set packages (``dataset-fashion-mnist`` -> ``<root>/fashion-mnist``).
SYSTEM_DATA_DIR = "/usr/share/datasets"

_GZIP_MAGIC = b"\x1f\x8b"
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0  # fixed: the split is part of the data set, not of the run's --seed


class Dataset(NamedTuple):
    """A train/test split ready for training.

    ``x_*``: float32, shape ``(N, H, W)``, values in [0, 1].  ``y_*``: int64, shape ``(N,)``,
    values in ``0..9``.  ``source`` says where the data came from (a path or a description).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(H, W)`` of one image."""
        return tuple(self.x_train.shape[1:])

    def summary(self) -> str:
        """One line: name, sizes and image shape."""
        shape = "x".join(str(n) for n in self.image_shape)
        return f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test images of {shape}"


# --------------------------------------------------------------------------- IDX files


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if it starts with the gzip magic (whatever its name)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] != _GZIP_MAGIC:
        if path.suffix == ".gz":
            raise DataError(f"{path}: not a gzip file (named .gz but has no gzip header)")
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None


def read_idx(path: str | os.PathLike[str], kind: str) -> np.ndarray:
    """Parse one IDX file of unsigned bytes; return a uint8 array.

    ``kind`` is ``"images"`` (magic 0x00000803, shape ``(N, rows, cols)``) or ``"labels"``
    (magic 0x00000801, shape ``(N,)``, values checked to be in ``0..9``).  The file may be raw or
    gzip-compressed.  Raises ``DataError`` naming the file for a wrong magic number, a zero
    dimension, a file shorter or longer than its header says, or a label out of range.
    """
    if kind not in ("images", "labels"):
        raise ValueError(f"kind must be 'images' or 'labels', got {kind!r}")
    path = Path(path)
    data = _read_bytes(path)
    expected_magic, ndim = (IMAGE_MAGIC, 3) if kind == "images" else (LABEL_MAGIC, 1)
    header_size = 4 + 4 * ndim
    if len(data) < 4:
        raise DataError(f"{path}: truncated: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        other = {IMAGE_MAGIC: "an image file", LABEL_MAGIC: "a label file"}.get(magic)
        found = f" (it is {other})" if other else ""
        raise DataError(
            f"{path}: bad magic number 0x{magic:08x}{found}; expected 0x{expected_magic:08x} "
            f"for IDX {kind}"
        )
    if len(data) < header_size:
        raise DataError(
            f"{path}: truncated: {len(data)} bytes, the IDX {kind} header needs {header_size}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if 0 in dims:
        raise DataError(f"{path}: header has a zero dimension {dims}")
    payload = int(np.prod(dims, dtype=np.int64))
    have = len(data) - header_size
    if have < payload:
        raise DataError(
            f"{path}: truncated: header says {' x '.join(map(str, dims))} = {payload} bytes of "
            f"data, file has {have}"
        )
    if have > payload:
        raise DataError(
            f"{path}: {have - payload} unexpected bytes after the {payload} bytes of data that "
            f"the header {dims} announces"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)
    if kind == "labels":
        _check_labels(array, str(path))
    return array


def _check_labels(labels: np.ndarray, where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        index = int(bad[0])
        raise DataError(
            f"{where}: label {int(labels[index])} at index {index} is out of range "
            f"0..{NUM_CLASSES - 1} ({bad.size} such labels)"
        )


def _check_split(images: np.ndarray, labels: np.ndarray, where: str, split: str) -> None:
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{where}: {split} image/label count mismatch: {images.shape[0]} images, "
            f"{labels.shape[0]} labels"
        )


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def load_idx_dir(folder: str | os.PathLike[str], name: str = "idx") -> Dataset:
    """Load the four IDX files from ``folder`` (raw or ``.gz``) as a :class:`Dataset`.

    Raises ``DataError`` if a file is missing or invalid (see :func:`read_idx`), if image and
    label counts differ, or if train and test images differ in size.
    """
    folder = Path(folder)
    paths = {key: _idx_path(folder, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise DataError(f"{folder}: missing IDX file(s): {', '.join(missing)} (raw or .gz)")
    arrays = {key: read_idx(path, key[1]) for key, path in paths.items() if path is not None}
    for split in ("train", "test"):
        images, labels = arrays[(split, "images")], arrays[(split, "labels")]
        where = f"{paths[(split, 'images')]} / {paths[(split, 'labels')]}"
        _check_split(images, labels, where, split)
    train_shape, test_shape = arrays[("train", "images")].shape, arrays[("test", "images")].shape
    if train_shape[1:] != test_shape[1:]:
        raise DataError(
            f"{folder}: train images are {train_shape[1]}x{train_shape[2]} but test images are "
            f"{test_shape[1]}x{test_shape[2]}"
        )
    return _as_dataset(name, arrays, 255.0, str(folder))


def _as_dataset(
    name: str, arrays: Mapping[tuple[str, str], np.ndarray], scale: float, source: str
) -> Dataset:
    def images(split: str) -> np.ndarray:
        return (arrays[(split, "images")].astype(np.float32) / np.float32(scale)).astype(np.float32)

    def labels(split: str) -> np.ndarray:
        return arrays[(split, "labels")].astype(np.int64)

    return Dataset(name, images("train"), labels("train"), images("test"), labels("test"), source)


# --------------------------------------------------------------------------- npz files

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str | os.PathLike[str], name: str = "npz") -> Dataset:
    """Load Keras's ``mnist.npz`` layout: ``x_train, y_train, x_test, y_test``.

    Images must be uint8 with shape ``(N, H, W)`` (scaled by 1/255); labels integers in ``0..9``
    with shape ``(N,)``.  Raises ``DataError`` naming the file for anything else, for a corrupt
    archive, or for mismatched counts or image sizes.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in _NPZ_KEYS if key not in archive.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}")
            loaded = {key: archive[key] for key in _NPZ_KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: cannot read as .npz ({exc})") from None
    arrays: dict[tuple[str, str], np.ndarray] = {}
    for split in ("train", "test"):
        x, y = loaded[f"x_{split}"], loaded[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3 or 0 in x.shape:
            raise DataError(
                f"{path}: x_{split} must be uint8 images of shape (N, H, W), "
                f"got {x.dtype} {x.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise DataError(
                f"{path}: y_{split} must be integer labels of shape (N,), got {y.dtype} {y.shape}"
            )
        _check_labels(y, f"{path} (y_{split})")
        _check_split(x, y, str(path), split)
        arrays[(split, "images")], arrays[(split, "labels")] = x, y
    if arrays[("train", "images")].shape[1:] != arrays[("test", "images")].shape[1:]:
        raise DataError(f"{path}: x_train and x_test images differ in size")
    return _as_dataset(name, arrays, 255.0, str(path))


# --------------------------------------------------------------------------- digits


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1] (pixel values 0..16 divided by 16).

    A fixed stratified 80/20 split (``random_state=0``): 1437 train and 360 test images.
    Raises ``DataError`` if scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError("--dataset digits needs scikit-learn: pip install adamkit[app]") from None
    x, y = sk_load_digits(return_X_y=True)
    x = (x.reshape(-1, 8, 8) / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x,
        y.astype(np.int64),
        test_size=_DIGITS_TEST_FRACTION,
        stratify=y,
        random_state=_DIGITS_SPLIT_SEED,
    )
    source = "sklearn.datasets.load_digits (stratified 80/20 split, random_state=0)"
    return Dataset("digits", x_train, y_train, x_test, y_test, source)


# --------------------------------------------------------------------------- discovery


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """``$ADAMKIT_CACHE`` if set, else ``~/.cache/adamkit``."""
    env = os.environ if env is None else env
    root = env.get("ADAMKIT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "adamkit"


def _npz_names(dataset: str) -> list[str]:
    names = [f"{dataset}.npz", f"{dataset.replace('-', '_')}.npz"]
    return list(dict.fromkeys(names))


def _holds_data(folder: Path, dataset: str) -> Path | None:
    """``folder`` itself if it has any IDX file, an ``.npz`` file in it, or ``None``."""
    if not folder.is_dir():
        return None
    if any(_idx_path(folder, stem) for stem in IDX_FILES.values()):
        return folder
    for name in _npz_names(dataset):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_path(path: Path, dataset: str) -> Dataset:
    return load_npz(path, dataset) if path.is_file() else load_idx_dir(path, dataset)


def _search_dirs(dataset: str, env: Mapping[str, str]) -> list[Path]:
    dirs = []
    if env.get("ADAMKIT_DATA"):
        dirs.append(Path(env["ADAMKIT_DATA"]) / dataset)
    dirs.append(Path(SYSTEM_DATA_DIR) / dataset)
    dirs.append(cache_root(env) / dataset)
    return dirs


def find_data(
    dataset: str, data_dir: str | None = None, env: Mapping[str, str] | None = None
) -> Path | None:
    """Where ``dataset`` lies (a folder of IDX files or an ``.npz`` file), or ``None``.

    With ``data_dir`` only that is looked at: a missing folder or one without the data raises
    ``DataError`` saying what was expected there.  Otherwise the places listed in the module
    docstring are searched.
    """
    env = os.environ if env is None else env
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if path.is_file():
            return path
        if not path.exists():
            raise DataError(f"--data-dir {path}: no such file or folder")
        found = _holds_data(path, dataset)
        if found is None:
            idx = ", ".join(IDX_FILES.values())
            npz = " / ".join(_npz_names(dataset))
            raise DataError(
                f"--data-dir {path}: holds neither the IDX files ({idx}, raw or .gz) nor {npz}"
            )
        return found
    for folder in _search_dirs(dataset, env):
        found = _holds_data(folder, dataset)
        if found is not None:
            return found
    return None


def _how_to_get(dataset: str, looked: list[Path]) -> str:
    where = ", ".join(str(p) for p in looked)
    if dataset == "fashion-mnist":
        how = (
            "install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu, "
            f"installs to {SYSTEM_DATA_DIR}/fashion-mnist), or pass --data-dir DIR with the four "
            "IDX files (train-images-idx3-ubyte.gz, ...) or fashion-mnist.npz"
        )
    else:
        how = (
            "pass --data-dir DIR with the four IDX files (train-images-idx3-ubyte.gz, ...) or "
            "mnist.npz, or set ADAMKIT_DATA to a folder holding mnist/"
        )
    return f"{dataset} data not found (looked in {where}); {how}"


def load_dataset(
    dataset: str,
    data_dir: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    allow_download: bool = True,
) -> Dataset:
    """Load ``dataset`` (``digits``, ``fashion-mnist`` or ``mnist``) as a :class:`Dataset`.

    ``mnist`` not found anywhere is downloaded into the cache when ``allow_download`` (see
    ``download.py``).  Raises ``DataError`` with instructions if the data cannot be had, and
    ``UsageError`` for an unknown name.
    """
    env = os.environ if env is None else env
    if dataset == "digits":
        return load_digits()
    if dataset not in ("fashion-mnist", "mnist"):
        raise UsageError(f"--dataset: unknown data set {dataset!r}")
    found = find_data(dataset, data_dir, env)
    if found is not None:
        return _load_path(found, dataset)
    looked = _search_dirs(dataset, env)
    if dataset == "mnist" and allow_download:
        from adamkit.app.download import download_mnist

        folder = download_mnist(cache_root(env) / dataset, hint=_how_to_get(dataset, looked))
        return load_idx_dir(folder, dataset)
    raise DataError(_how_to_get(dataset, looked))
