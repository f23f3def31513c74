"""Checksummed, atomic downloads of the MNIST IDX files with the standard library only.

Each file is fetched from the first mirror that serves it with the expected size and SHA-256,
streamed into a temporary file beside its destination and moved into place with ``os.replace``,
so an interrupted or failed download never leaves a partial file under the final name.

The checksum table is data (:data:`MNIST_FILES`: file name -> size in bytes and SHA-256 of the
``.gz`` file); a mirror or table can be passed in, which is how the tests serve fixture files
from a local HTTP server.  The values below are those that TensorFlow Datasets records for
``https://storage.googleapis.com/cvdf-datasets/mnist/`` (``tensorflow_datasets/url_checksums/
mnist.txt``); the sizes equal those of the original files from Yann LeCun's site, of which both
mirrors serve copies.  A mirror serving different bytes is skipped and reported, never trusted.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

from adamkit.app.errors import DownloadError
from adamkit.app.files import atomic_write

__all__ = ["MNIST_FILES", "MNIST_MIRRORS", "FileSpec", "download_mnist", "fetch", "sha256_of"]


class FileSpec(NamedTuple):
    """Expected size in bytes and lowercase hex SHA-256 of a file to download."""

    size: int
    sha256: str


#: Base URLs tried in order (each is joined with the file name).
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

#: The four MNIST files (gzip-compressed IDX), from tensorflow_datasets' url_checksums/mnist.txt.
MNIST_FILES: dict[str, FileSpec] = {
    "train-images-idx3-ubyte.gz": FileSpec(
        9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": FileSpec(
        28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": FileSpec(
        1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": FileSpec(
        4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}

_CHUNK = 1 << 16


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Lowercase hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_one(url: str, dest: Path, spec: FileSpec, timeout: float) -> None:
    """Download ``url`` to ``dest`` atomically; raise ``DownloadError`` on any mismatch."""
    # atomic_write removes the partial file on any error, KeyboardInterrupt included.
    with atomic_write(dest) as out, urllib.request.urlopen(url, timeout=timeout) as resp:
        digest, size = hashlib.sha256(), 0
        for chunk in iter(lambda: resp.read(_CHUNK), b""):
            size += len(chunk)
            if size > spec.size:
                raise DownloadError(f"{url}: more than the expected {spec.size} bytes")
            digest.update(chunk)
            out.write(chunk)
        if size != spec.size:
            raise DownloadError(f"{url}: got {size} bytes, expected {spec.size}")
        if digest.hexdigest() != spec.sha256:
            raise DownloadError(
                f"{url}: SHA-256 mismatch (got {digest.hexdigest()}, expected {spec.sha256})"
            )


def fetch(
    name: str,
    dest_dir: str | os.PathLike[str],
    spec: FileSpec,
    mirrors: Sequence[str],
    *,
    timeout: float = 30.0,
    log: TextIO | None = None,
) -> Path:
    """Make ``dest_dir/name`` exist with the size and SHA-256 of ``spec``; return its path.

    A file already there with the right checksum is kept; otherwise each mirror is tried in turn.
    Raises ``DownloadError`` listing every mirror's failure (connection error, HTTP status, size
    or checksum mismatch) if none delivers the file; nothing is left under the final name then.
    """
    dest_dir = Path(dest_dir)
    dest = dest_dir / name
    if dest.is_file() and dest.stat().st_size == spec.size and sha256_of(dest) == spec.sha256:
        return dest
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the download folder {dest_dir}: {exc}") from None
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        if log is not None:
            print(f"downloading {url}", file=log, flush=True)
        try:
            _fetch_one(url, dest, spec, timeout)
            return dest
        except DownloadError as exc:
            failures.append(str(exc))
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            failures.append(f"{url}: {reason}")
    raise DownloadError(f"could not download {name}: " + "; ".join(failures))


def download_mnist(
    dest_dir: str | os.PathLike[str],
    *,
    mirrors: Sequence[str] | None = None,
    files: Mapping[str, FileSpec] | None = None,
    timeout: float = 30.0,
    hint: str = "",
    quiet: bool = False,
) -> Path:
    """Download the MNIST files (``files``, default :data:`MNIST_FILES`) into ``dest_dir``.

    ``mirrors`` defaults to :data:`MNIST_MIRRORS` (both looked up at call time).

    Returns ``dest_dir``.  Raises ``DownloadError``, with ``hint`` (how to get the data by hand)
    appended, if any file cannot be fetched and verified.  Progress goes to stderr unless ``quiet``.
    """
    files = MNIST_FILES if files is None else files
    mirrors = MNIST_MIRRORS if mirrors is None else mirrors
    log = None if quiet else sys.stderr
    try:
        for name, spec in files.items():
            fetch(name, dest_dir, spec, mirrors, timeout=timeout, log=log)
    except DownloadError as exc:
        raise DownloadError(f"{exc}. {hint}" if hint else str(exc)) from None
    return Path(dest_dir)
