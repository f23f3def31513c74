"""Helpers shared by adamkit's test suites: parity metrics, seeded inputs and the optimizer cases.

Importing this package needs NumPy only; nothing here imports pytest or a framework at import time.
"""

from adamkit.testing.cases import CASES, OptimizerCase, cases_for
from adamkit.testing.compare import assert_rel_close, assert_trees_equal, rel_diff, seeded_rng

__all__ = [
    "CASES",
    "OptimizerCase",
    "assert_rel_close",
    "assert_trees_equal",
    "cases_for",
    "rel_diff",
    "seeded_rng",
]
