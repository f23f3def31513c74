"""Pick the Keras backend for this folder before anything imports Keras.

Keras reads ``KERAS_BACKEND`` once, on its first import, so the choice must be made here.  An
explicit ``KERAS_BACKEND`` wins (``test_keras_backends.py`` uses that to rerun this folder on the
other backends in child processes); otherwise torch, the backend adamkit's dev install always has,
then JAX.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

if "keras" not in sys.modules and "KERAS_BACKEND" not in os.environ:
    for _backend in ("torch", "jax"):
        if importlib.util.find_spec(_backend) is not None:
            os.environ["KERAS_BACKEND"] = _backend
            break


def pytest_configure(config):
    # The child runs on other backends (test_keras_backends.py) deselect these.
    config.addinivalue_line(
        "markers",
        "backend_independent: checks that do not depend on the Keras backend; run once, in the "
        "parent pytest process only",
    )


_HERE = Path(__file__).resolve().parent
# Keras's torch backend calls np.array() on tensors, and NumPy 2 warns that torch's __array__ takes
# no copy= argument: noise from two third-party packages, hundreds of times per test.
_NUMPY2_TORCH_NOISE = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(item.fspath).resolve().parents:
            item.add_marker(_NUMPY2_TORCH_NOISE)
