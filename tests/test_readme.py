"""The README's two set-up commands are the contract with users and CI; keep them honest."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_two_setup_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = _bash_blocks(setup)
    assert len(blocks) == 2, blocks
    main_job, tests = blocks
    assert "adamkit train" in main_job and "\n" not in main_job
    assert "pytest" in tests and "\n" not in tests
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines, "'.ci/run' must run README command (2) verbatim"


def test_constraints_pin_the_cpu_torch_but_the_library_range_stays_loose():
    constraints = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", constraints, flags=re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "torch==" not in pyproject


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README runs as written."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        if "import keras" in block and importlib.util.find_spec("keras") is None:
            pytest.skip("keras is not installed")  # the block picks its own backend
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
