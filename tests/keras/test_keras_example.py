"""examples/keras_mnist.py runs end to end on a few hundred samples and draws its PNG.

The example's ``main`` is called in this process (a child interpreter would spend most of the
time importing Keras again); its ``__main__`` block only calls ``sys.exit(main())``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.backend_independent

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "keras_mnist.py"


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(folder: Path, n_train: int, n_test: int) -> None:
    """28x28 images whose label is a bright band of rows (easy to learn), plus noise."""
    rng = np.random.default_rng(7)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for image, label in zip(images, labels, strict=True):
            image[2 + 2 * label : 4 + 2 * label] = 255
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("keras_mnist_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_and_saves_the_accuracy_plot(example, tmp_path, capsys):
    _fake_mnist(tmp_path, 400, 200)
    out = tmp_path / "plots" / "accuracy.png"
    argv = [
        "--data-dir",
        str(tmp_path),
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--limit",
        "300",
        "--out",
        str(out),
    ]
    assert example.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "using 300 train / 200 test" in stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    accuracy = float(stdout.split("test accuracy after 3 epochs: ")[1].split()[0])
    assert accuracy > 0.5, stdout  # chance is 0.1


def test_example_refuses_a_data_dir_without_data(example, tmp_path, capsys):
    assert example.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith(f"keras_mnist: --data-dir {tmp_path}")
    assert not (tmp_path / "x.png").exists()


def test_example_falls_back_to_digits_and_finds_kerass_npz(example, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(example.data, "SYSTEM_DATA_DIR", str(tmp_path / "system"))
    env = {
        "ADAMKIT_DATA": str(tmp_path / "data"),
        "ADAMKIT_CACHE": str(tmp_path / "cache"),
        "KERAS_HOME": str(tmp_path / "keras"),
    }
    dataset = example.load_data(None, env)
    assert dataset.name == "digits" and dataset.image_shape == (8, 8)
    assert "using scikit-learn's 8x8 digits instead" in capsys.readouterr().out

    (tmp_path / "keras" / "datasets").mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 20),
        "x_test": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 5),
    }
    np.savez(tmp_path / "keras" / "datasets" / "mnist.npz", **arrays)
    dataset = example.load_data(None, env)
    assert dataset.x_train.shape == (20, 28, 28)
    np.testing.assert_allclose(dataset.x_train, arrays["x_train"] / 255.0, rtol=1e-6)
