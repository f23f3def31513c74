"""The model of the Keras MNIST example: flatten -> Dense(hidden) + ReLU -> Dense(classes).

Softmax is not part of the model: the loss is cross-entropy on the logits
(``torch.nn.functional.cross_entropy``), which is Keras's sparse categorical cross-entropy
after a softmax layer, computed stably.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["build_mlp"]


def build_mlp(image_shape: tuple[int, ...], hidden: int, classes: int = 10) -> nn.Sequential:
    """``Flatten -> Linear(prod(image_shape), hidden) -> ReLU -> Linear(hidden, classes)``.

    Input: float32 ``(N, *image_shape)``; output: logits ``(N, classes)``.  Weights use torch's
    default initialisation, drawn from torch's global generator (seed it first for
    reproducibility).  Raises ``ValueError`` for a non-positive size.
    """
    in_features = math.prod(image_shape)
    for name, value in (("input size", in_features), ("hidden", hidden), ("classes", classes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
