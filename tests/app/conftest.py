"""Shared fixtures for the app tests: an isolated environment and small MNIST-format files."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the app needs torch: pip install adamkit[app]")
pytest.importorskip("sklearn", reason="the app needs scikit-learn: pip install adamkit[app]")
pytest.importorskip("matplotlib", reason="the app needs matplotlib: pip install adamkit[app]")

from adamkit.app import data
from adamkit.app.cli import main


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in an empty folder; no user data, cache, Debian data set or real mirror is seen."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ADAMKIT_DATA", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", str(tmp_path / "system-datasets"))
    # A closed local port: any download attempt fails at once instead of reaching the network.
    monkeypatch.setattr("adamkit.app.download.MNIST_MIRRORS", ("http://127.0.0.1:9/",))
    return tmp_path


@pytest.fixture
def run_cli(capsys):
    """Call ``adamkit`` in-process; return ``(exit status, stdout, stderr)``."""

    def call(*argv: str) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call
