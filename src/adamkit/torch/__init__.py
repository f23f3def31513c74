"""PyTorch front end: drop-in ``Adam``/``AdamW`` for ``torch.optim`` built on adamkit's core.

``adamkit.torch.Adam(model.parameters(), lr=1e-3)`` behaves like ``torch.optim.Adam`` (same
numbers on CPU, interchangeable state dicts, schedulers, ``GradScaler``, hooks), validates through
:mod:`adamkit.core.config`, and can run the NumPy reference step (``impl="reference"``).
:func:`param_groups_with_decay` builds the usual decay / no-decay groups.  Both optimizers carry
the stability guard (``guard=``, :mod:`adamkit.guard`); :class:`GuardedOptimizer` puts it around
any other ``torch.optim.Optimizer``.
"""

from adamkit.torch.functional import IMPLS, select_impl
from adamkit.torch.guarded import GuardedOptimizer
from adamkit.torch.optim import Adam, AdamW
from adamkit.torch.param_groups import NO_DECAY_MODULES, param_groups_with_decay

__all__ = [
    "IMPLS",
    "NO_DECAY_MODULES",
    "Adam",
    "AdamW",
    "GuardedOptimizer",
    "param_groups_with_decay",
    "select_impl",
]
