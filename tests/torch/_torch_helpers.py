"""Shared pieces of the adamkit.torch tests: tiny models, fresh data, the option table."""

from __future__ import annotations

import copy
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import adamkit.torch as at


def fresh_seed() -> int:
    """A new seed per test run; tests put it in their failure messages."""
    return secrets.randbits(31)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64 (0 when both are all zero)."""
    a64, b64 = a.detach().double(), b.detach().double()
    scale = b64.abs().max().item() if b64.numel() else 0.0
    diff = (a64 - b64).abs().max().item() if b64.numel() else 0.0
    return diff / scale if scale > 0 else diff


def max_rel_diff(model_a: nn.Module, model_b: nn.Module) -> float:
    return max(
        rel_diff(a, b) for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True)
    )


def mlp(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def cnn(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).to(dtype)


MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (6,)),
    "cnn": (cnn, (1, 6, 6)),
}


def batches(
    gen: torch.Generator, input_shape: tuple[int, ...], dtype: torch.dtype, steps: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` fresh random (input, target) batches of 4 samples."""
    return [
        (
            torch.randn((4, *input_shape), generator=gen).to(dtype),
            torch.randn((4, 3), generator=gen).to(dtype),
        )
        for _ in range(steps)
    ]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    after_step: Callable[[torch.Tensor], None] | None = None,
) -> list[float]:
    """Plain loop: zero_grad, backward, step (then ``after_step(loss)``); returns the losses."""
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(loss.detach())
        losses.append(loss.item())
    return losses


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


@dataclass(frozen=True)
class Case:
    """One option combination: the torch.optim class it must match and the kwargs for both."""

    id: str
    torch_cls: type[torch.optim.Optimizer]
    ours: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    # dtypes the case runs in; bf16 is slow on CPU, so only a few cases include it
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    # relative rounding torch applies to the learning rate: a float32 tensor lr makes torch (and
    # impl="torch") round lr / (1 - beta1^t) to float32, the NumPy reference keeps a double
    lr_rounding: float = 0.0


CASES: list[Case] = [
    Case(
        "adam-default",
        torch.optim.Adam,
        at.Adam,
        {},
        (torch.float32, torch.float64, torch.bfloat16),
    ),
    Case("adam-lr-wd", torch.optim.Adam, at.Adam, {"lr": 3e-3, "weight_decay": 0.1}),
    Case("adam-amsgrad", torch.optim.Adam, at.Adam, {"lr": 1e-2, "amsgrad": True}),
    Case("adam-maximize", torch.optim.Adam, at.Adam, {"lr": 1e-3, "maximize": True}),
    Case(
        "adam-all",
        torch.optim.Adam,
        at.Adam,
        {
            "lr": 5e-3,
            "betas": (0.8, 0.99),
            "eps": 1e-6,
            "weight_decay": 0.05,
            "amsgrad": True,
            "maximize": True,
        },
    ),
    Case(
        "adam-decoupled",
        torch.optim.Adam,
        at.Adam,
        {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ),
    Case(
        "adamw-default",
        torch.optim.AdamW,
        at.AdamW,
        {},
        (torch.float32, torch.float64, torch.bfloat16),
    ),
    Case(
        "adamw-amsgrad-wd",
        torch.optim.AdamW,
        at.AdamW,
        {"lr": 1e-2, "weight_decay": 0.2, "amsgrad": True},
        (torch.float32, torch.float64, torch.bfloat16),
    ),
    Case(
        "adam-tensor-lr",
        torch.optim.Adam,
        at.Adam,
        {"lr": torch.tensor(0.01)},
        lr_rounding=2.0**-24,
    ),
    Case("adamw-maximize", torch.optim.AdamW, at.AdamW, {"lr": 2e-3, "maximize": True}),
]


def torch_fused_spread(case: Case, start: nn.Module, data: list, single: nn.Module) -> float:
    """How far torch's own ``fused=True`` step lands from its single-tensor step (``single``,
    trained from ``start`` on ``data``): the natural yardstick for float32 paths that round a few
    ulps differently, since training amplifies such differences chaotically on some seeds."""
    fused = twin(start)
    train(fused, case.torch_cls(fused.parameters(), fused=True, **case.kwargs), data)
    return max_rel_diff(fused, single)
