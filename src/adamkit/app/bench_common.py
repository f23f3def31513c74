"""What the app's benchmarks share: Fashion-MNIST as tensors, the MLP and CNN they train, threads,
machine facts for the result files, and argparse helpers.  Used by
:mod:`adamkit.app.bench_stability` and :mod:`adamkit.app.bench_accuracy`.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "IMAGE_MODELS",
    "SweepData",
    "build_model",
    "csv_choice",
    "first_below_one",
    "interleaved_times",
    "load_fashion",
    "machine_info",
    "set_threads",
    "subset",
    "torch_dtype",
]

#: The image classifiers :func:`build_model` builds.
IMAGE_MODELS: tuple[str, ...] = ("mlp", "cnn")


class SweepData(NamedTuple):
    """Float32 images ``(N, H, W)`` in [0, 1] and int64 labels, as torch tensors."""

    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    source: str


def load_fashion(data_dir: str | None = None) -> SweepData:
    """Fashion-MNIST through :func:`adamkit.app.data.load_dataset` (``DataError`` if absent)."""
    from adamkit.app.data import load_dataset

    ds = load_dataset("fashion-mnist", data_dir)
    return SweepData(
        torch.from_numpy(ds.x_train),
        torch.from_numpy(ds.y_train),
        torch.from_numpy(ds.x_test),
        torch.from_numpy(ds.y_test),
        ds.source,
    )


def subset(data: SweepData, n_train: int, seed: int = 0) -> SweepData:
    """The first ``n_train`` training images of a fixed shuffle (``seed``); test set unchanged."""
    if n_train >= len(data.y_train):
        return data
    keep = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    keep = keep[:n_train]
    return data._replace(x_train=data.x_train[keep], y_train=data.y_train[keep])


def build_model(kind: str, image_shape: Sequence[int], classes: int = 10) -> Any:
    """``"mlp"``: the app's MLP (hidden 128); ``"cnn"``: two 3x3 conv + ReLU + 2x2 max-pool
    blocks (8 and 16 channels) and a linear layer.  Input ``(N, H, W)`` float; logits out.
    Weights from torch's global generator.  ``ValueError`` for another kind."""
    from adamkit.app.model import build_mlp

    if kind == "mlp":
        return build_mlp(tuple(image_shape), 128, classes)
    if kind == "cnn":
        h, w = image_shape
        return nn.Sequential(
            nn.Unflatten(1, (1, h)),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * (h // 4) * (w // 4), classes),
        )
    raise ValueError(f"Invalid model: {kind!r} (model must be one of {', '.join(IMAGE_MODELS)})")


def torch_dtype(name: str) -> torch.dtype:
    """``"fp32"`` -> ``torch.float32``, ``"bf16"`` -> ``torch.bfloat16``."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def csv_choice(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse ``type``: a comma-separated list of ``choices`` (duplicates dropped, order
    kept); ``ArgumentTypeError`` naming the choices otherwise."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list from {','.join(choices)}, got {text!r}"
            )
        return tuple(dict.fromkeys(values))

    return parse


def set_threads(count: int) -> None:
    """``torch.set_num_threads(count)`` once adamkit's CPU kernel has started: starting numba's
    OpenMP pool resets torch's thread count, and adamkit's kernel follows torch's count."""
    from adamkit.torch import Adam

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    Adam([p], guard=False).step()
    torch.set_num_threads(count)


def machine_info() -> dict[str, Any]:
    """Python, torch and platform versions, CPU count, torch threads and load average."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg": load,
    }


def first_below_one(options: Sequence[tuple[str, int]]) -> str | None:
    """``"--name must be >= 1, got v"`` for the first ``(name, v)`` with ``v < 1``, else
    ``None``: the counts a benchmark's CLI checks before it starts."""
    for name, value in options:
        if value < 1:
            return f"{name} must be >= 1, got {value}"
    return None


def interleaved_times(
    steps: dict[str, Callable[[], Any]], rounds: int, warmup: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of every step, ``rounds`` rounds after ``warmup`` untimed ones; each
    round calls every step once, starting one name later than the round before, so that a burst
    of machine noise hits all steps alike."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        shift = i % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            steps[name]()
            elapsed = time.perf_counter() - started
            if i >= warmup:
                times[name].append(elapsed)
    return times
