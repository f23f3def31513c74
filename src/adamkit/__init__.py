"""adamkit: the Adam optimizer family done right.

``import adamkit`` needs NumPy only.  The SciPy front end (``minimize``, ``scipy_adam``) and the
sub-packages ``adamkit.torch``, ``adamkit.keras`` and ``adamkit.app`` are imported on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "minimize", "scipy_adam"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import adamkit` works without SciPy installed.
    if name in ("minimize", "scipy_adam"):
        from adamkit import scipy as _scipy

        return getattr(_scipy, name)
    raise AttributeError(f"module 'adamkit' has no attribute {name!r}")
