"""Atomic file writes: every result file appears whole or not at all."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write"]


@contextmanager
def atomic_write(path: str | os.PathLike[str], *, binary: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit, flush, fsync and ``os.replace``.

    If the block raises (``KeyboardInterrupt`` included) the temporary file is removed and
    ``path`` keeps its previous content.  The file gets the usual permissions (umask applies).
    Text mode writes UTF-8 with ``\\n`` line endings.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        if binary:
            handle: IO[Any] = open(tmp, "xb")  # noqa: SIM115 - closed below
        else:
            handle = open(tmp, "x", encoding="utf-8", newline="")  # noqa: SIM115
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
