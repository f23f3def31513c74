"""Command-line handling: help, bad arguments (exit 2, one clear line, nothing trained), bench."""

from __future__ import annotations

import subprocess
import sys

import pytest

import adamkit.app
from adamkit.app.config import DATASET_DEFAULTS


def test_help_lists_every_flag_and_default(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside the phrases checked
    code, out, _err = run_cli("train", "--help")
    assert code == 0
    flags = ["--dataset", "--data-dir", "--optimizer", "--lr", "--epochs", "--batch-size"]
    flags += ["--hidden", "--seed", "--out", "--resume", "--compare"]
    for flag in flags:
        assert flag in out
    for text in ("default: digits", "default: adamkit", "default: 0.001", "default: 128"):
        assert text in out
    assert f"{DATASET_DEFAULTS['digits']['epochs']} for digits" in out
    assert f"{DATASET_DEFAULTS['mnist']['batch_size']} for fashion-mnist/mnist" in out


def test_no_command_is_usage_error(run_cli):
    code, _out, err = run_cli()
    assert code == 2 and "train" in err and "bench" in err


def test_python_dash_m_and_version():
    result = subprocess.run(
        [sys.executable, "-m", "adamkit", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.startswith("adamkit ")


BAD_ARGUMENTS = [
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "-0.1"], "Invalid learning rate: -0.1 (--lr must be a finite number > 0)"),
    (["--lr", "nan"], "Invalid learning rate: nan"),
    (["--lr", "inf"], "Invalid learning rate: inf"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--epochs", "2.5"], "argument --epochs: invalid int value: '2.5'"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--batch-size", "-3"], "--batch-size must be an integer >= 1, got -3"),
    (["--hidden", "0"], "--hidden must be an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    (["--dataset", "cifar"], "argument --dataset: invalid choice: 'cifar'"),
    (["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion'"),
    (["--compare", "adamkit,lion"], "--compare: unknown optimizer 'lion'"),
    (["--compare", "sgd,sgd"], "--compare lists an optimizer twice: sgd,sgd"),
    (["--compare", ","], "argument --compare: expected a comma-separated list"),
    (["--data-dir", "."], "--data-dir does not apply to --dataset digits"),
    (["--resume", "nothing.pt"], "--resume nothing.pt: no such checkpoint file"),
]


@pytest.mark.parametrize(
    ("argv", "message"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS]
)
def test_bad_argument(isolated, run_cli, argv, message):
    code, out, err = run_cli("train", *argv, "--out", "o")
    assert code == 2
    assert message in err
    last = err.strip().splitlines()[-1]
    assert message in last and "Traceback" not in err
    assert "epoch" not in out  # nothing was trained
    assert not (isolated / "o" / "metrics.csv").exists()


def test_unwritable_out(isolated, run_cli):
    (isolated / "a-file").write_text("not a folder")
    code, _out, err = run_cli("train", "--out", isolated / "a-file" / "run")
    assert code == 2
    assert "cannot write to" in err and len(err.strip().splitlines()) == 1


def test_out_holding_a_run_is_refused(isolated, run_cli):
    (isolated / "o").mkdir()
    (isolated / "o" / "metrics.csv").write_text("epoch\n1\n")
    code, _out, err = run_cli("train", "--out", "o")
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert (isolated / "o" / "metrics.csv").read_text() == "epoch\n1\n"


def test_bench_missing_module(monkeypatch, run_cli):
    # Simulate a build without adamkit/app/bench.py, whether or not it exists here.
    monkeypatch.setitem(sys.modules, "adamkit.app.bench", None)
    monkeypatch.delattr(adamkit.app, "bench", raising=False)
    code, _out, err = run_cli("bench", "--help")
    assert code == 2
    assert err.strip() == "adamkit bench is not available in this build"


def test_bench_is_dispatched_lazily(monkeypatch, run_cli):
    calls = []

    class FakeBench:
        @staticmethod
        def configure_parser(parser):
            parser.add_argument("--quick", action="store_true")

        @staticmethod
        def run(args):
            calls.append(args.quick)
            return 0

    monkeypatch.setitem(sys.modules, "adamkit.app.bench", FakeBench)
    monkeypatch.setattr(adamkit.app, "bench", FakeBench, raising=False)
    code, _out, _err = run_cli("bench", "--quick")
    assert code == 0 and calls == [True]
