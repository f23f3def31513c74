"""End-to-end runs of ``adamkit train``: the default run, resume, Ctrl-C, --compare, checkpoints."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib import image as mpimg

from adamkit.app import checkpoint as ckpt
from adamkit.app import loop
from adamkit.app.config import DATASET_DEFAULTS
from adamkit.app.plots import PIXELS


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            _assert_same_state(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_default_run_end_to_end(isolated, run_cli):
    code, out, err = run_cli("train")
    assert code == 0, err
    defaults = DATASET_DEFAULTS["digits"]
    assert f"epochs {defaults['epochs']}, batch size {defaults['batch_size']}" in out
    (run_dir,) = (isolated / "runs").iterdir()
    assert run_dir.name.startswith("digits-adamkit-")
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "curves.png",
        "metrics.csv",
    ]
    rows = _rows(run_dir / "metrics.csv")
    assert list(rows[0]) == list(loop.COLUMNS)
    assert [int(r["epoch"]) for r in rows] == list(range(1, defaults["epochs"] + 1))
    assert float(rows[-1]["test_acc"]) >= 0.95
    assert int(rows[-1]["step"]) == defaults["epochs"] * 45  # ceil(1437 / 32) batches per epoch
    picture = mpimg.imread(run_dir / "curves.png")
    assert picture.shape[:2] == (PIXELS[1], PIXELS[0])
    document = json.loads((run_dir / "config.json").read_text())
    assert document["settings"] == {
        "dataset": "digits",
        "data_dir": None,
        "optimizer": "adamkit",
        "lr": 0.001,
        "epochs": defaults["epochs"],
        "batch_size": defaults["batch_size"],
        "hidden": 128,
        "seed": 0,
        "out": str(run_dir.relative_to(isolated)),
        "compare": [],
        "framework": "torch",
    }
    assert set(document["versions"]) >= {"python", "torch", "numpy", "adamkit"}
    assert document["data"]["train_size"] == 1437 and document["data"]["test_size"] == 360
    payload = ckpt.load_checkpoint(run_dir / "checkpoint.pt")
    assert payload["trainer"]["epoch"] == defaults["epochs"]
    assert f"final test accuracy {float(rows[-1]['test_acc']):.4f}" in out


def test_resume_is_bit_identical(isolated, run_cli):
    assert run_cli("train", "--epochs", "5", "--out", "full")[0] == 0
    assert run_cli("train", "--epochs", "3", "--out", "part")[0] == 0
    code, out, err = run_cli("train", "--resume", "part/checkpoint.pt", "--epochs", "5")
    assert code == 0, err
    assert "resuming part/checkpoint.pt: 3 epochs done" in out
    full, part = _load("full/checkpoint.pt"), _load("part/checkpoint.pt")
    _assert_same_state(full["model"], part["model"])
    _assert_same_state(full["optimizer"], part["optimizer"])
    assert _without_seconds(_rows("full/metrics.csv")) == _without_seconds(
        _rows("part/metrics.csv")
    )
    assert json.loads((isolated / "part" / "config.json").read_text())["resumed_from"]


def test_mid_epoch_interrupt_and_resume_is_bit_identical(isolated, run_cli, monkeypatch):
    assert run_cli("train", "--epochs", "4", "--seed", "3", "--out", "full")[0] == 0
    original = loop.Trainer._train_batch

    def press_ctrl_c_at_step_100(self, x, y):
        original(self, x, y)
        if self.step == 100:  # epoch 3, batch 10 of 45
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(loop.Trainer, "_train_batch", press_ctrl_c_at_step_100)
    code, _out, err = run_cli("train", "--epochs", "4", "--seed", "3", "--out", "cut")
    assert code == 130
    assert "in epoch 3 of 4, after batch 10/45" in err
    assert "resume with: adamkit train --resume cut/checkpoint.pt" in err
    assert len(_rows(isolated / "cut" / "metrics.csv")) == 2
    monkeypatch.setattr(loop.Trainer, "_train_batch", original)
    code, _out, err = run_cli("train", "--resume", "cut/checkpoint.pt")
    assert code == 0, err
    _assert_same_state(_load("full/checkpoint.pt")["model"], _load("cut/checkpoint.pt")["model"])
    assert _without_seconds(_rows("full/metrics.csv")) == _without_seconds(_rows("cut/metrics.csv"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_subprocess_writes_checkpoint_and_resumes(isolated, run_cli):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "adamkit", "train", "--epochs", "100000", "--out", "s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=isolated,
    )
    try:
        for line in process.stdout:  # wait until training runs (the handler is installed)
            if line.startswith("epoch"):
                break
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "interrupted: stopped" in err
    assert "resume with: adamkit train --resume s/checkpoint.pt" in err
    done = len(_rows(isolated / "s" / "metrics.csv"))
    assert done >= 1 and (isolated / "s" / "checkpoint.pt").exists()
    code, _out, err = run_cli("train", "--resume", "s/checkpoint.pt", "--epochs", done + 2)
    assert code == 0, err
    assert [int(r["epoch"]) for r in _rows(isolated / "s" / "metrics.csv")] == list(
        range(1, done + 3)
    )


def test_compare_same_start_and_order(isolated, run_cli):
    code, _out, err = run_cli("train", "--compare", "torch-adam,sgd", "--epochs", "2", "--out", "c")
    assert code == 0, err
    for name in ("torch-adam", "sgd"):
        assert sorted(p.name for p in (isolated / "c" / name).iterdir()) == [
            "checkpoint.pt",
            "config.json",
            "curves.png",
            "metrics.csv",
        ]
    assert mpimg.imread(isolated / "c" / "curves.png").shape[:2] == (PIXELS[1], PIXELS[0])
    top = json.loads((isolated / "c" / "config.json").read_text())
    assert top["settings"]["compare"] == ["torch-adam", "sgd"]
    # Each sub-run is exactly the single run with that optimizer: same weights, same data order.
    assert run_cli("train", "--optimizer", "sgd", "--epochs", "2", "--out", "single")[0] == 0
    assert _without_seconds(_rows("c/sgd/metrics.csv")) == _without_seconds(
        _rows("single/metrics.csv")
    )
    assert (
        _rows("c/sgd/metrics.csv")[-1]["train_loss"]
        != _rows("c/torch-adam/metrics.csv")[-1]["train_loss"]
    )


def test_seed_changes_the_run(run_cli):
    assert run_cli("train", "--epochs", "1", "--seed", "1", "--out", "a")[0] == 0
    assert run_cli("train", "--epochs", "1", "--seed", "2", "--out", "b")[0] == 0
    assert _rows("a/metrics.csv")[0]["train_loss"] != _rows("b/metrics.csv")[0]["train_loss"]


# --------------------------------------------------------------------------- bad checkpoints


@pytest.fixture
def small_checkpoint(isolated, run_cli):
    code, _out, err = run_cli("train", "--epochs", "1", "--hidden", "16", "--out", "base")
    assert code == 0, err
    return isolated / "base" / "checkpoint.pt"


def _expect_error(run_cli, message, *argv):
    code, _out, err = run_cli("train", *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_corrupt_checkpoints(isolated, run_cli, small_checkpoint):
    junk = isolated / "junk.pt"
    junk.write_bytes(os.urandom(2000))
    _expect_error(run_cli, "not a readable checkpoint", "--resume", junk)
    cut = isolated / "cut.pt"
    cut.write_bytes(small_checkpoint.read_bytes()[:5000])
    _expect_error(run_cli, "not a readable checkpoint", "--resume", cut)
    other = isolated / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    _expect_error(run_cli, "not an adamkit training checkpoint", "--resume", other)


def test_mismatched_checkpoints(isolated, run_cli, small_checkpoint):
    payload = _load(small_checkpoint)
    future = isolated / "future.pt"
    torch.save({**payload, "version": 99}, future)
    _expect_error(run_cli, "checkpoint version 99 is not supported", "--resume", future)
    wider = isolated / "wider.pt"
    torch.save({**payload, "config": {**payload["config"], "hidden": 32}}, wider)
    _expect_error(run_cli, "model state does not fit", "--resume", wider, "--epochs", "3")
    _expect_error(
        run_cli,
        "--lr 0.01 differs from the checkpoint's 0.001",
        *("--resume", small_checkpoint, "--lr", "0.01", "--epochs", "3"),
    )
    _expect_error(
        run_cli,
        "--compare cannot be combined with --resume",
        *("--resume", small_checkpoint, "--compare", "sgd,torch-adam"),
    )
    _expect_error(run_cli, "has finished 1 epoch;", "--resume", small_checkpoint)


def test_checkpoint_from_an_earlier_release_still_resumes(isolated, run_cli):
    # Written by adamkit 0.1.0 (checkpoint format version 1): `adamkit train --optimizer
    # torch-adam --hidden 4 --epochs 1`.  Keep it: it guards the on-disk format.
    fixture = Path(__file__).parent / "data" / "checkpoint-v1-torch-adam-h4.pt"
    (isolated / "old").mkdir()
    shutil.copy(fixture, isolated / "old" / "checkpoint.pt")
    code, out, err = run_cli("train", "--resume", "old/checkpoint.pt", "--epochs", "2")
    assert code == 0, err
    assert "resuming old/checkpoint.pt: 1 epoch done" in out
    assert [r["epoch"] for r in _rows(isolated / "old" / "metrics.csv")] == ["1", "2"]
    assert _load(isolated / "old" / "checkpoint.pt")["model"]["1.weight"].shape == (4, 64)
