"""Shared set-up for the adamkit.numpy tests: a small multi-group problem and snapshots."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from adamkit.numpy import Adam
from adamkit.testing import assert_trees_equal

# Shapes and dtypes of the parameters of `make_params`, in order; groups take them by index.
SPECS = [
    ((4, 3), np.float64),
    ((3,), np.float64),
    ((2, 2, 2), np.float64),
    ((), np.float64),
    ((5,), np.float32),
    ((0, 2), np.float64),
]


def make_params(rng: np.random.Generator) -> list[np.ndarray]:
    """Fresh random parameters with the shapes and dtypes of SPECS."""
    return [rng.standard_normal(shape).astype(dtype) for shape, dtype in SPECS]


def make_grads(rng: np.random.Generator, params: list[np.ndarray]) -> list[np.ndarray]:
    """One fresh random gradient per parameter, of its shape and dtype."""
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def grouped(params: list[np.ndarray], names: bool = True) -> list[dict[str, Any]]:
    """Three groups with different hyper-parameters (the first two named when ``names``)."""
    groups = [
        {"params": params[0:2], "lr": 3e-3, "amsgrad": True, "weight_decay": 0.05},
        {"params": params[2:4], "weight_decay": 0.0, "betas": (0.8, 0.99), "maximize": True},
        {"params": params[4:], "lr": 1e-2, "eps": 1e-6},
    ]
    if names:
        for group, name in zip(groups, ("encoder", "head", "extra"), strict=True):
            group["name"] = name
    return groups


def trained_optimizer(rng: np.random.Generator, steps: int = 2) -> tuple[Adam, list[np.ndarray]]:
    """An Adam over the grouped parameters after ``steps`` updates (state present everywhere)."""
    params = make_params(rng)
    opt = Adam(grouped(params))
    for _ in range(steps):
        opt.step(make_grads(rng, params))
    return opt, params


def snapshot(opt: Adam, params: list[np.ndarray]) -> dict[str, Any]:
    """Deep copies of everything an error must leave alone (works with invalid groups too)."""
    return {
        "params": [p.copy() for p in params],
        "state": copy.deepcopy(dict(opt.state)),
        "groups": [
            {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            for group in opt.param_groups
        ],
        "group_params": [[id(p) for p in group["params"]] for group in opt.param_groups],
    }


def assert_unchanged(opt: Adam, params: list[np.ndarray], before: dict[str, Any]) -> None:
    """Assert parameters, state and groups are bit-identical to ``before``."""
    assert_trees_equal(snapshot(opt, params), before, "optimizer")
