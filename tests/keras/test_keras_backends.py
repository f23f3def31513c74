"""Rerun this folder on every other installed Keras backend, each in a child pytest process.

Keras fixes its backend at the first import, so one process tests one backend: this process uses
the one ``conftest.py`` chose (torch unless ``KERAS_BACKEND`` says otherwise), and the test below
starts ``python -m pytest tests/keras`` with ``KERAS_BACKEND`` set for each of the others.  The
children deselect ``backend_independent`` tests, which this process has already run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

keras = pytest.importorskip("keras")

from _keras_helpers import CHILD_ENV  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BACKENDS = ("torch", "jax", "tensorflow")


def test_this_process_runs_the_requested_backend():
    requested = os.environ.get("KERAS_BACKEND")
    assert requested in BACKENDS
    assert keras.backend.backend() == requested


@pytest.mark.parametrize("backend", BACKENDS)
def test_folder_passes_on_backend(backend):
    if os.environ.get(CHILD_ENV):
        pytest.skip("a child run does not start more children")
    if backend == keras.backend.backend():
        pytest.skip(f"{backend} is this process's backend: the rest of this folder ran on it")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = {**os.environ, "KERAS_BACKEND": backend, CHILD_ENV: "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE),
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "not backend_independent",
        "-o",
        "addopts=-ra --strict-markers",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{backend} backend:\n{output[-6000:]}"
    summary = re.search(r"(\d+) passed", output)
    assert summary is not None and int(summary.group(1)) >= 40, output[-3000:]
    print(f"{backend} backend: {output.strip().splitlines()[-1]}")
