"""Keras 3 front end: :class:`Adam` and :class:`AdamW` as ``keras.optimizers.Optimizer`` subclasses.

Written with ``keras.ops`` only, so they run on every Keras backend (tested on torch and JAX).
Importing this package registers both classes with Keras's serialization under the package name
``"adamkit"``, so ``keras.models.load_model`` restores them without ``custom_objects`` as long as
``adamkit.keras`` has been imported first.

Keras picks its backend from ``KERAS_BACKEND`` (or ``~/.keras/keras.json``) when it is first
imported.  Raises ``ImportError`` naming what to install when Keras 3 is missing, or how to choose
a backend when Keras cannot load its configured one (by default TensorFlow).
"""

from __future__ import annotations

import importlib.util
import os

try:
    import keras as _keras
except ImportError as error:  # pragma: no cover - exercised only without Keras or its backend
    if importlib.util.find_spec("keras") is None:
        raise ImportError(
            "adamkit.keras needs Keras 3 and one backend (torch or jax): pip install adamkit[keras]"
        ) from error
    raise ImportError(
        f"Keras is installed but could not load its backend "
        f"({os.environ.get('KERAS_BACKEND') or 'from ~/.keras/keras.json, default tensorflow'}): "
        f"{error}. Set KERAS_BACKEND=torch or KERAS_BACKEND=jax before importing Keras"
    ) from error

if int(_keras.__version__.split(".")[0]) < 3:  # pragma: no cover - Keras 2 is not supported
    raise ImportError(
        f"adamkit.keras needs Keras 3, found Keras {_keras.__version__}: pip install 'keras>=3'"
    )

from adamkit.keras.optimizers import Adam, AdamW

__all__ = ["Adam", "AdamW"]
