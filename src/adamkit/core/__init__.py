"""Pure math of the Adam family over NumPy arrays: hyper-parameters, validation, reference step.

Nothing in this package imports a framework; every other layer builds on it.
"""

from adamkit.core.config import AdamHyperParams, validate_hyperparams
from adamkit.core.reference import AdamState, adam_step, init_state

__all__ = ["AdamHyperParams", "AdamState", "adam_step", "init_state", "validate_hyperparams"]
