"""``adamkit train --nproc N``: data-parallel runs equal one process's; Ctrl-C, resume, bad N.

Tolerances: the ranks sum the same numbers in another order (gradients averaged by DDP, metrics
summed in float64), so weights agree with the one-process run to a relative difference
``max|a-b| / max|b|`` of about 1e-6 after a few epochs; the tests allow 1e-3 and 0.01 accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from adamkit.app.cli import main
from adamkit.app.parallel import shard_bounds

RUN_FILES = ["checkpoint.pt", "config.json", "curves.png", "metrics.csv"]


@pytest.fixture
def run_fd(capfd):
    """Call ``adamkit`` in-process, capturing the file descriptors (the workers print there)."""

    def call(*argv):
        code = main([str(a) for a in argv])
        out, err = capfd.readouterr()
        return code, out, err

    return call


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _model(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_close_runs(parallel_dir, single_dir, epochs):
    a, b = _rows(parallel_dir / "metrics.csv"), _rows(single_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in a] == list(range(1, epochs + 1))
    assert [r["step"] for r in a] == [r["step"] for r in b]  # same batches: same step counts
    assert abs(float(a[-1]["test_acc"]) - float(b[-1]["test_acc"])) <= 0.01
    pa, pb = _model(parallel_dir / "checkpoint.pt"), _model(single_dir / "checkpoint.pt")
    assert pa.keys() == pb.keys()  # the plain module's keys, no "module." prefix from DDP
    for key in pa:
        assert (pa[key] - pb[key]).abs().max() <= 1e-3 * pb[key].abs().max(), key


def test_shard_bounds_cover_the_batch_in_order():
    for size in (0, 1, 5, 32, 33):
        for world in (1, 2, 3, 7):
            parts = [shard_bounds(size, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == size
            assert all(parts[i][1] == parts[i + 1][0] for i in range(world - 1))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_nproc_2_matches_one_process(isolated, run_fd):
    assert run_fd("train", "--epochs", "2", "--out", "one")[0] == 0
    code, out, err = run_fd("train", "--epochs", "2", "--nproc", "2", "--out", "two")
    assert code == 0, err
    assert "data-parallel: 2 processes (gloo)" in out
    # Only rank 0 reports and writes: one line per epoch, the four files and nothing else.
    assert out.count("epoch 1/2") == 1 and out.count("final test accuracy") == 1
    assert sorted(p.name for p in (isolated / "two").iterdir()) == RUN_FILES
    _assert_close_runs(isolated / "two", isolated / "one", 2)
    document = json.loads((isolated / "two" / "config.json").read_text())
    assert document["settings"]["nproc"] == 2 and document["nproc"] == 2


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_every_rank_and_resume_continues(isolated, run_fd):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "adamkit",
            "train",
            "--nproc",
            "2",
            "--epochs",
            "1000",
            *("--out", "s"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=isolated,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches it
    )
    try:
        for line in process.stdout:
            if line.startswith("epoch"):
                break
        os.killpg(process.pid, signal.SIGINT)
        _out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, err
    assert "interrupted: stopped" in err and "resume with: adamkit train --resume" in err
    done = len(_rows(isolated / "s" / "metrics.csv"))
    assert done >= 1
    # The stored config says --nproc 2, so the resumed run is data-parallel again.
    code, out, err = run_fd("train", "--resume", "s/checkpoint.pt", "--epochs", done + 1)
    assert code == 0, err
    assert "data-parallel: 2 processes" in out
    assert run_fd("train", "--epochs", done + 1, "--out", "one")[0] == 0
    _assert_close_runs(isolated / "s", isolated / "one", done + 1)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("--nproc", "0"), "--nproc must be an integer in [1, "),
        (("--nproc", "-3"), "got -3"),
        (("--nproc", str((os.cpu_count() or 1) * 4 + 1)), "per CPU core"),
        (("--nproc", "2", "--compare", "adamkit,sgd"), "not supported with --compare"),
        (("--nproc", "2", "--framework", "keras"), "not supported with --framework keras"),
    ],
)
def test_bad_nproc_exits_2(isolated, run_fd, argv, words):
    code, out, err = run_fd("train", *argv, "--out", "x")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and words in err
    assert not (isolated / "x").exists()
