"""``adamkit train --state fp32|bf16|int8``: recorded, trains, resumes exactly, or is refused."""

from __future__ import annotations

import csv
import json

import pytest
import torch


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_identical(a, b, where=""):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _moment_dtypes(checkpoint):
    # param index -> dtype of exp_avg; index 0 is the 128x64 hidden weight (8192 elements).
    return {i: s["exp_avg"].dtype for i, s in checkpoint["optimizer"]["state"].items()}


@pytest.mark.parametrize(
    ("state", "stored"),
    [
        ("bf16", (torch.bfloat16, torch.bfloat16)),
        # int8 keeps float32 for tensors under 4096 elements, like the output layer's bias.
        ("int8", (torch.uint8, torch.float32)),
    ],
)
def test_state_is_recorded_used_and_trains(isolated, run_cli, state, stored):
    code, _out, err = run_cli("train", "--state", state, "--epochs", "5", "--out", state)
    assert code == 0, err
    document = json.loads((isolated / state / "config.json").read_text())
    assert document["settings"]["state"] == state
    assert document["state"] == state
    checkpoint = _load(isolated / state / "checkpoint.pt")
    assert checkpoint["config"]["state"] == state
    dtypes = _moment_dtypes(checkpoint)
    assert (dtypes[0], dtypes[3]) == stored  # the hidden weight, the output bias
    assert float(_rows(isolated / state / "metrics.csv")[-1]["test_acc"]) >= 0.9


def test_default_state_is_not_stored(isolated, run_cli):
    assert run_cli("train", "--epochs", "1", "--out", "d")[0] == 0
    document = json.loads((isolated / "d" / "config.json").read_text())
    assert "state" not in document["settings"] and document["state"] is None
    assert set(_moment_dtypes(_load(isolated / "d" / "checkpoint.pt")).values()) == {torch.float32}


def test_int8_resume_is_bit_identical(isolated, run_cli):
    assert run_cli("train", "--state", "int8", "--epochs", "5", "--out", "full")[0] == 0
    assert run_cli("train", "--state", "int8", "--epochs", "3", "--out", "part")[0] == 0
    code, _out, err = run_cli("train", "--resume", "part/checkpoint.pt", "--epochs", "5")
    assert code == 0, err
    full, part = _load(isolated / "full/checkpoint.pt"), _load(isolated / "part/checkpoint.pt")
    _assert_identical(full["model"], part["model"], "model")
    _assert_identical(full["optimizer"], part["optimizer"], "optimizer")
    assert _without_seconds(_rows(isolated / "full/metrics.csv")) == _without_seconds(
        _rows(isolated / "part/metrics.csv")
    )
    # --state is part of the run: resuming with another format is refused.
    code, _out, err = run_cli("train", "--resume", "part/checkpoint.pt", "--state", "bf16")
    assert code == 2 and "--state bf16 differs from the checkpoint's int8" in err


@pytest.mark.parametrize(
    "argv",
    [
        ("--optimizer", "torch-adam", "--state", "int8"),
        ("--optimizer", "torch-adamw", "--state", "bf16"),
        ("--optimizer", "sgd", "--state", "fp32"),
        ("--compare", "adamkit,torch-adam", "--state", "int8"),
    ],
)
def test_state_refused_for_torch_optimizers(isolated, run_cli, argv):
    code, _out, err = run_cli("train", *argv, "--out", "x")
    assert code == 2
    assert err.count("\n") == 1 and "--state" in err and "adamkit" in err
    assert not (isolated / "x").exists()


def test_state_refused_with_keras_and_unknown_formats(isolated, run_cli):
    code, _out, err = run_cli("train", "--framework", "keras", "--state", "int8", "--out", "x")
    assert code == 2 and err.count("\n") == 1 and "--framework keras" in err
    code, _out, err = run_cli("train", "--state", "int4", "--out", "x")
    assert code == 2 and "invalid choice: 'int4'" in err
    assert not (isolated / "x").exists()
