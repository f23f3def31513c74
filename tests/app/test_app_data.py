"""IDX / npz parsing and data discovery, on small files written by the tests."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest
from _app_helpers import idx_bytes, make_split, write_idx, write_mnist_dir

from adamkit.app import data
from adamkit.app.errors import DataError

# --------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng()
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    got_images = data.read_idx(write_idx(tmp_path / "img", images, gz=gz), "images")
    got_labels = data.read_idx(write_idx(tmp_path / "lab", labels, gz=gz), "labels")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 5, 3)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_idx_dir_scales_and_types(tmp_path, gz):
    arrays = write_mnist_dir(tmp_path / "d", gz=gz, n_train=20, n_test=10)
    ds = data.load_idx_dir(tmp_path / "d", "mnist")
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.shape == (20, 6, 6) and ds.x_test.shape == (10, 6, 6)
    np.testing.assert_allclose(ds.x_train, arrays["train"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["test"][1])
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0


def _error(path, kind):
    with pytest.raises(DataError) as info:
        data.read_idx(path, kind)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_images(tmp_path, gz):
    payload = idx_bytes(np.zeros((4, 3, 3), np.uint8))[:-5]
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(payload) if gz else payload)
    message = _error(path, "images")
    assert "truncated" in message and "36 bytes" in message and "31" in message


def test_truncated_header(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.zeros((4, 3, 3), np.uint8))[:9])
    assert "header" in _error(path, "images")
    path.write_bytes(b"\x00\x00")
    assert "too short" in _error(path, "images")


def test_trailing_bytes(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.zeros(5, np.uint8)) + b"\x01\x02")
    assert "2 unexpected bytes" in _error(path, "labels")


def test_corrupt_and_truncated_gzip(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8).reshape(4, 5, 5)))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(compressed[: len(compressed) // 2])
    assert "gzip" in _error(cut, "images")
    garbled = bytearray(compressed)
    garbled[20:30] = b"\xff" * 10
    bad = tmp_path / "bad.gz"
    bad.write_bytes(bytes(garbled))
    assert "gzip" in _error(bad, "images")
    fake = tmp_path / "fake.gz"
    fake.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    assert "no gzip header" in _error(fake, "labels")


def test_wrong_magic(tmp_path):
    labels = write_idx(tmp_path / "labels", np.zeros(5, np.uint8), gz=False)
    message = _error(labels, "images")
    assert "0x00000801" in message and "label file" in message and "0x00000803" in message
    odd = write_idx(tmp_path / "odd", np.zeros((2, 2, 2), np.uint8), gz=True, magic=0x0D03)
    assert "bad magic number 0x00000d03" in _error(odd, "images")


def test_zero_dimension(tmp_path):
    path = write_idx(tmp_path / "z", np.zeros((0, 4, 4), np.uint8), gz=False)
    assert "zero dimension" in _error(path, "images")


def test_label_out_of_range(tmp_path):
    labels = np.array([1, 2, 12, 3, 10], np.uint8)
    message = _error(write_idx(tmp_path / "l", labels, gz=True), "labels")
    assert "label 12 at index 2" in message and "0..9" in message and "2 such" in message


def test_count_mismatch(tmp_path):
    write_mnist_dir(tmp_path, gz=False, n_train=10, n_test=5)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=False)
    with pytest.raises(DataError, match=r"test image/label count mismatch: 5 images, 4 labels"):
        data.load_idx_dir(tmp_path)


def test_train_test_image_sizes_differ(tmp_path):
    write_mnist_dir(tmp_path, gz=False, n_train=10, n_test=5)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 7, 7), np.uint8), gz=False)
    with pytest.raises(DataError, match="6x6 but test images are 7x7"):
        data.load_idx_dir(tmp_path)


def test_missing_idx_file_is_named(tmp_path):
    write_mnist_dir(tmp_path, gz=True, n_train=10, n_test=5)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing IDX file.*train-labels-idx1-ubyte"):
        data.load_idx_dir(tmp_path)


# --------------------------------------------------------------------------- npz


def _npz(path, **overrides):
    rng = np.random.default_rng()
    x_train, y_train = make_split(rng, 12)
    x_test, y_test = make_split(rng, 6)
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def test_npz_round_trip(tmp_path):
    arrays = _npz(tmp_path / "mnist.npz")
    ds = data.load_npz(tmp_path / "mnist.npz", "mnist")
    np.testing.assert_allclose(ds.x_test, arrays["x_test"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"y_test": None}, "missing array(s) y_test"),
        ({"x_train": np.zeros((12, 6, 6), np.float32)}, "x_train must be uint8"),
        ({"y_train": np.full(12, 11)}, "label 11 at index 0"),
        ({"y_train": np.zeros(11, np.int64)}, "train image/label count mismatch"),
        ({"x_test": np.zeros((6, 5, 5), np.uint8)}, "differ in size"),
    ],
)
def test_npz_errors(tmp_path, overrides, expected):
    _npz(tmp_path / "mnist.npz", **overrides)
    with pytest.raises(DataError, match=re.escape(expected)):
        data.load_npz(tmp_path / "mnist.npz")


def test_npz_corrupt(tmp_path):
    _npz(tmp_path / "mnist.npz")
    raw = (tmp_path / "mnist.npz").read_bytes()
    (tmp_path / "mnist.npz").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataError, match=r"cannot read as \.npz"):
        data.load_npz(tmp_path / "mnist.npz")


# --------------------------------------------------------------------------- digits, discovery


def test_digits_split_is_fixed_and_stratified():
    a, b = data.load_digits(), data.load_digits()
    assert a.x_train.shape == (1437, 8, 8) and a.x_test.shape == (360, 8, 8)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert a.x_train.dtype == np.float32 and a.x_train.max() == 1.0 and a.x_train.min() == 0.0
    test_share = np.bincount(a.y_test, minlength=10) / np.bincount(
        np.concatenate([a.y_train, a.y_test]), minlength=10
    )
    assert np.all(np.abs(test_share - 0.2) < 0.02)


def test_discovery_order(isolated, monkeypatch):
    cache = isolated / "cache" / "fashion-mnist"
    system = isolated / "system-datasets" / "fashion-mnist"
    user = isolated / "user-data" / "fashion-mnist"
    for folder in (cache, system, user):
        write_mnist_dir(folder, n_train=8, n_test=4)
    assert data.find_data("fashion-mnist") == system
    monkeypatch.setenv("ADAMKIT_DATA", str(isolated / "user-data"))
    assert data.find_data("fashion-mnist") == user
    explicit = isolated / "mine"
    _npz_file = explicit / "fashion-mnist.npz"
    explicit.mkdir()
    _npz(_npz_file)
    assert data.find_data("fashion-mnist", str(explicit)) == _npz_file
    assert data.find_data("fashion-mnist", str(_npz_file)) == _npz_file


def test_missing_fashion_mnist_says_how_to_get_it():
    with pytest.raises(DataError) as info:
        data.load_dataset("fashion-mnist")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message


def test_data_dir_without_data(isolated):
    (isolated / "empty").mkdir()
    with pytest.raises(DataError, match="holds neither the IDX files"):
        data.load_dataset("mnist", str(isolated / "empty"))
    with pytest.raises(DataError, match="no such file or folder"):
        data.load_dataset("mnist", str(isolated / "nope"))


# --------------------------------------------------------------------------- through the CLI


def test_cli_reports_corrupt_file_in_one_line(isolated, run_cli):
    folder = isolated / "d"
    write_mnist_dir(folder, gz=True, n_train=16, n_test=8)
    raw = (folder / "train-images-idx3-ubyte.gz").read_bytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(raw[:-40])
    code, _out, err = run_cli("train", "--dataset", "mnist", "--data-dir", folder, "--out", "o")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "train-images-idx3-ubyte.gz" in lines[0]
    assert "Traceback" not in err
    assert not (isolated / "o" / "metrics.csv").exists()


def test_cli_missing_dataset(isolated, run_cli):
    code, _out, err = run_cli("train", "--dataset", "fashion-mnist", "--out", "o")
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in err and len(err.strip().splitlines()) == 1
    assert not (isolated / "o").exists()  # no empty run folder left behind


def test_cli_trains_on_idx_files(isolated, run_cli):
    write_mnist_dir(isolated / "d", gz=False, n_train=200, n_test=100)
    code, out, err = run_cli(
        "train", "--dataset", "mnist", "--data-dir", isolated / "d", "--epochs", "8",
        "--batch-size", "16", "--lr", "0.01", "--out", "o",
    )  # fmt: skip
    assert code == 0, err
    assert "mnist: 200 train / 100 test images of 6x6" in out
    # The toy classes are separable; a working pipeline learns them.
    final = (isolated / "o" / "metrics.csv").read_text().strip().splitlines()[-1].split(",")
    assert float(final[5]) >= 0.9
