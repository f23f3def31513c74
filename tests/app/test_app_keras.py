"""``adamkit train --framework keras``: the same outputs as the torch path, exact resume, errors."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from matplotlib import image as mpimg

from adamkit.app import keras_train, loop
from adamkit.app.cli import main
from adamkit.app.data import load_digits
from adamkit.app.plots import PIXELS

pytestmark = pytest.mark.filterwarnings(
    # Keras's torch backend calls np.array() on tensors; NumPy 2 warns about torch's __array__.
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

BATCHES = 45  # ceil(1437 digits training images / batch 32)
FILES = ["checkpoint.keras", "config.json", "curves.png", "metrics.csv"]


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _header(path):
    with open(path, newline="") as handle:
        return next(csv.reader(handle))


def _without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def keras():
    if importlib.util.find_spec("keras") is None:
        pytest.skip("--framework keras needs Keras 3: pip install adamkit[keras]")
    return keras_train.require_keras()  # as the app does: KERAS_BACKEND defaults to torch


@pytest.fixture(scope="module")
def three_epochs(keras, tmp_path_factory):
    """One uninterrupted 3-epoch Keras run on digits, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("keras-run") / "full"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", "--framework", "keras", "--epochs", "3", "--out", str(out)])
    assert code == 0
    return out, stdout.getvalue()


def test_keras_run_writes_the_same_files_and_columns_as_torch(isolated, run_cli, three_epochs):
    out, text = three_epochs
    assert sorted(p.name for p in out.iterdir()) == FILES
    code, _out, err = run_cli("train", "--epochs", "1", "--out", "torch-run")
    assert code == 0, err
    assert _header(out / "metrics.csv") == _header(isolated / "torch-run" / "metrics.csv")
    assert _header(out / "metrics.csv") == list(loop.COLUMNS)
    rows = _rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["step"]) for r in rows] == [BATCHES, 2 * BATCHES, 3 * BATCHES]
    assert all(float(r["lr"]) == 0.001 and float(r["seconds"]) > 0 for r in rows)
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[0] > losses[1] > losses[2]
    assert float(rows[-1]["test_acc"]) > 0.8
    # Plain progress (stdout is not a terminal): the torch path's line per epoch.
    assert "framework: Keras" in text and "softmax, sparse categorical cross-entropy" in text
    assert [line.split("  ")[0] for line in text.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    assert mpimg.imread(out / "curves.png").shape[:2] == (PIXELS[1], PIXELS[0])
    document = json.loads((out / "config.json").read_text())
    assert document["settings"]["framework"] == "keras"
    assert document["settings"]["optimizer"] == "adamkit"
    assert document["versions"]["keras"].startswith("3.")
    assert document["versions"]["keras_backend"] in ("torch", "jax")


def test_keras_test_metrics_and_checkpoint_are_the_final_model(keras, three_epochs):
    out, _text = three_epochs
    model = keras.models.load_model(out / "checkpoint.keras")
    assert type(model.optimizer).__module__ == "adamkit.keras.optimizers"
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3 * BATCHES
    # Recompute the test metrics from the saved model, in NumPy, independently of Keras's.
    digits = load_digits()
    probabilities = np.asarray(keras.ops.convert_to_numpy(model(digits.x_test)), np.float64)
    loss = -np.mean(
        np.log(np.clip(probabilities[np.arange(len(digits.y_test)), digits.y_test], 1e-7, 1.0))
    )
    accuracy = np.mean(probabilities.argmax(axis=1) == digits.y_test)
    last = _rows(out / "metrics.csv")[-1]
    assert float(last["test_acc"]) == pytest.approx(accuracy, abs=1e-6)
    assert float(last["test_loss"]) == pytest.approx(loss, rel=1e-5)
    run_state = json.loads(zipfile.ZipFile(out / "checkpoint.keras").read(keras_train.RUN_MEMBER))
    assert run_state["format"] == keras_train.FORMAT and run_state["version"] == 1
    assert run_state["trainer"]["epoch"] == 3
    assert run_state["config"]["framework"] == "keras"


def test_keras_resume_ends_where_an_uninterrupted_run_ends(keras, isolated, run_cli, three_epochs):
    full, _text = three_epochs
    assert run_cli("train", "--framework", "keras", "--epochs", "2", "--out", "part")[0] == 0
    code, out, err = run_cli("train", "--resume", "part/checkpoint.keras", "--epochs", "3")
    assert code == 0, err
    assert "resuming part/checkpoint.keras: 2 epochs done" in out
    assert _without_seconds(_rows("part/metrics.csv")) == _without_seconds(
        _rows(full / "metrics.csv")
    )
    resumed = keras.models.load_model(isolated / "part" / "checkpoint.keras")
    uninterrupted = keras.models.load_model(full / "checkpoint.keras")
    for a, b in zip(resumed.weights, uninterrupted.weights, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), err_msg=a.path
        )
    for a, b in zip(resumed.optimizer.variables, uninterrupted.optimizer.variables, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), err_msg=a.path
        )


def test_keras_compare_trains_each_optimizer_from_the_same_start(
    keras, isolated, run_cli, three_epochs
):
    full, _text = three_epochs
    code, out, err = run_cli(
        "train",
        "--framework",
        "keras",
        "--compare",
        "adamkit,keras-adam",
        "--epochs",
        "1",
        "--out",
        "cmp",
    )
    assert code == 0, err
    assert "[keras-adam] final test accuracy" in out
    for name in ("adamkit", "keras-adam"):
        assert sorted(p.name for p in (isolated / "cmp" / name).iterdir()) == FILES
    assert (isolated / "cmp" / "curves.png").exists()
    top = json.loads((isolated / "cmp" / "config.json").read_text())
    assert top["settings"]["compare"] == ["adamkit", "keras-adam"]
    first = {n: _rows(isolated / "cmp" / n / "metrics.csv")[0] for n in ("adamkit", "keras-adam")}
    # Each sub-run is the single run with that optimizer (same initial weights and data order).
    assert _without_seconds([first["adamkit"]]) == _without_seconds(_rows(full / "metrics.csv")[:1])
    assert first["adamkit"]["train_loss"] != first["keras-adam"]["train_loss"]
    optimizers = {
        n: keras.models.load_model(isolated / "cmp" / n / "checkpoint.keras").optimizer
        for n in ("adamkit", "keras-adam")
    }
    from adamkit.keras import Adam

    assert isinstance(optimizers["keras-adam"], keras.optimizers.Adam)
    assert not isinstance(optimizers["keras-adam"], Adam)
    assert isinstance(optimizers["adamkit"], Adam)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--framework", "keras", "--optimizer", "torch-adam"],
            "--optimizer: unknown optimizer 'torch-adam' for --framework keras (choose from "
            "adamkit, adamkit-adamw, keras-adam, sgd)",
        ),
        (
            ["--framework", "keras", "--compare", "adamkit,torch-adamw"],
            "--compare: unknown optimizer 'torch-adamw' for --framework keras",
        ),
        (["--optimizer", "keras-adam"], "--optimizer: unknown optimizer 'keras-adam' (choose"),
        (["--framework", "tensorflow"], "argument --framework: invalid choice: 'tensorflow'"),
    ],
)
def test_bad_framework_settings_exit_2_before_anything_is_written(isolated, run_cli, argv, message):
    code, _out, err = run_cli("train", *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (isolated / "runs").exists()


def test_missing_keras_exits_2_with_what_to_install(isolated, run_cli, monkeypatch):
    for name in ("keras", "adamkit.keras"):
        monkeypatch.setitem(sys.modules, name, None)  # `import keras` now raises ImportError
    code, _out, err = run_cli("train", "--framework", "keras", "--out", "k")
    assert code == 2
    assert "pip install adamkit[keras]" in err and len(err.strip().splitlines()) == 1
    assert not (isolated / "k").exists()


def test_keras_backend_defaults_to_torch_and_a_user_choice_is_kept(keras, monkeypatch):
    monkeypatch.delenv(keras_train.BACKEND_VARIABLE, raising=False)
    keras_train.require_keras()
    assert os.environ[keras_train.BACKEND_VARIABLE] == "torch"
    monkeypatch.setenv(keras_train.BACKEND_VARIABLE, "jax")
    keras_train.require_keras()
    assert os.environ[keras_train.BACKEND_VARIABLE] == "jax"


def test_bad_keras_checkpoints(keras, isolated, run_cli, three_epochs):
    full, _text = three_epochs
    junk = isolated / "junk.keras"
    junk.write_bytes(os.urandom(2000))
    cases = [(["--resume", junk], "not a readable checkpoint")]
    plain = isolated / "plain.keras"
    keras.models.load_model(full / "checkpoint.keras").save(plain)  # no adamkit run state
    cases.append((["--resume", plain], "not an adamkit training checkpoint"))
    cases.append(
        (
            ["--resume", full / "checkpoint.keras", "--framework", "torch", "--epochs", "4"],
            "--framework torch differs from the checkpoint's keras",
        )
    )
    cases.append((["--resume", full / "checkpoint.keras"], "has finished 3 epochs;"))
    for argv, message in cases:
        code, _out, err = run_cli("train", *argv)
        assert code == 2, argv
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
def test_user_backend_choice_reaches_keras_in_a_fresh_process(keras, isolated):
    # A fresh interpreter, so that Keras is first imported by the app with the user's choice.
    env = {**os.environ, keras_train.BACKEND_VARIABLE: "jax"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "adamkit",
            "train",
            "--framework",
            "keras",
            "--epochs",
            "1",
            "--hidden",
            "8",
            "--out",
            "jax-run",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((isolated / "jax-run" / "config.json").read_text())
    assert document["versions"]["keras_backend"] == "jax" and "jax" in document["versions"]
    assert _header(isolated / "jax-run" / "metrics.csv") == list(loop.COLUMNS)
