"""Checkpoints of a training run: everything needed to continue it bit-identically.

A checkpoint is a ``torch.save`` file holding a plain dict (loadable with
``torch.load(weights_only=True)``, so opening one never runs code)::

    format     "adamkit.train-checkpoint"       version   1
    config     TrainConfig.to_dict() of the run  versions  {"python", "torch", "numpy", "adamkit"}
    model      model.state_dict()                optimizer optimizer.state_dict()
    trainer    Trainer.state_dict() (epoch, batch, step, history, shuffle generator state)
    rng        {"torch": ByteTensor, "numpy": {...}, "python": random.getstate()}

It is written atomically (temporary file in the same folder, then ``os.replace``) at the end of
every epoch and when the run is interrupted, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adamkit.app.errors import CheckpointError
from adamkit.app.files import atomic_write

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointWriter",
    "atomic_torch_save",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "restore_training",
]

FORMAT = "adamkit.train-checkpoint"
VERSION = 1
_KEYS = ("format", "version", "config", "model", "optimizer", "trainer", "rng")


def capture_rng() -> dict[str, Any]:
    """The global RNG states of torch, NumPy and Python's ``random``, as plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["name"], keys, nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``."""
    with atomic_write(path) as handle:
        torch.save(obj, handle)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:  # torch's long weights_only message: keep only the actual cause
        text = text.split(marker, 1)[1].strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a checkpoint; return its dict.

    Raises ``CheckpointError`` (one line naming the file) if the file is missing, unreadable or
    corrupt, not an adamkit training checkpoint, of an unknown version, or lacks an entry.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file; report any as one line
        raise CheckpointError(
            f"--resume {path}: not a readable checkpoint ({_first_line(exc)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"--resume {path}: not an adamkit training checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"--resume {path}: checkpoint version {payload.get('version')!r} is not supported "
            f"(this adamkit reads version {VERSION})"
        )
    missing = [key for key in _KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"--resume {path}: checkpoint lacks {', '.join(missing)}")
    position = payload["trainer"]
    if not (
        isinstance(payload["config"], dict)
        and isinstance(position, dict)
        and all(isinstance(position.get(key), int) for key in ("epoch", "batch", "step"))
    ):
        raise CheckpointError(f"--resume {path}: checkpoint has no valid config or position")
    return payload


def restore_training(
    payload: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer: Any,
    where: str,
) -> None:
    """Load model, optimizer, loop position and RNG states from a checked checkpoint.

    Raises ``CheckpointError`` naming ``where`` when a part does not fit (different layer sizes,
    optimizer, or batch layout).
    """
    steps = (
        ("model", lambda: model.load_state_dict(payload["model"])),
        ("optimizer", lambda: optimizer.load_state_dict(payload["optimizer"])),
        ("training position", lambda: trainer.load_state_dict(payload["trainer"])),
        ("random number generator", lambda: restore_rng(payload["rng"])),
    )
    for what, load in steps:
        try:
            load()
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(
                f"--resume {where}: {what} state does not fit ({_first_line(exc)})"
            ) from None


class CheckpointWriter:
    """Subscriber that writes ``path`` at every ``epoch_end`` and on ``interrupt``.

    ``config`` (a dict) and ``versions`` are stored as they are; the model, optimizer, loop and
    RNG states are captured at the time of the event.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: dict[str, Any],
        versions: dict[str, str],
    ) -> None:
        self.path = Path(path)
        self.config = config
        self.versions = versions

    def attach(self, trainer: Any) -> None:
        """Subscribe to ``trainer``'s ``epoch_end`` and ``interrupt`` events."""
        trainer.add_callback("epoch_end", self.write)
        trainer.add_callback("interrupt", self.write)

    def write(self, trainer: Any) -> None:
        """Save the current state of ``trainer`` (its model, optimizer and position)."""
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config,
            "versions": self.versions,
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "trainer": trainer.state_dict(),
            "rng": capture_rng(),
        }
        atomic_torch_save(payload, self.path)
