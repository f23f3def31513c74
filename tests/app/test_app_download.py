"""The checksummed download, against a local HTTP server on 127.0.0.1 serving fixture files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading

import pytest
from _app_helpers import write_mnist_dir

from adamkit.app import data, download
from adamkit.app.download import FileSpec
from adamkit.app.errors import DownloadError


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Serve ``tmp_path / "www"`` on 127.0.0.1; yields ``(base_url, root)``; always shut down."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def dead_url():
    """A URL on 127.0.0.1 where nothing listens (a port that was just free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _spec(content: bytes) -> FileSpec:
    return FileSpec(len(content), hashlib.sha256(content).hexdigest())


def _publish(root, mirror: str, name: str, content: bytes) -> None:
    (root / mirror).mkdir(exist_ok=True)
    (root / mirror / name).write_bytes(content)


def test_good_file(server, tmp_path):
    base, root = server
    content = b"idx file contents " * 1000
    _publish(root, "m1", "f.gz", content)
    dest = tmp_path / "dest"
    path = download.fetch("f.gz", dest, _spec(content), [f"{base}/m1/"])
    assert path == dest / "f.gz" and path.read_bytes() == content
    assert sorted(p.name for p in dest.iterdir()) == ["f.gz"]  # no temporary file left


def test_bad_checksum_leaves_nothing(server, tmp_path):
    base, root = server
    _publish(root, "m1", "f.gz", b"B" * 64)
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="SHA-256 mismatch") as info:
        download.fetch("f.gz", dest, _spec(b"A" * 64), [f"{base}/m1/"])
    assert f"{base}/m1/f.gz" in str(info.value)
    assert list(dest.iterdir()) == []


def test_wrong_size_is_rejected(server, tmp_path):
    base, root = server
    _publish(root, "m1", "f.gz", b"A" * 65)
    with pytest.raises(DownloadError, match="more than the expected 64 bytes"):
        download.fetch("f.gz", tmp_path / "dest", _spec(b"A" * 64), [f"{base}/m1/"])
    _publish(root, "m1", "g.gz", b"A" * 63)
    with pytest.raises(DownloadError, match="got 63 bytes, expected 64"):
        download.fetch("g.gz", tmp_path / "dest", _spec(b"A" * 64), [f"{base}/m1/"])


def test_falls_back_to_next_mirror(server, tmp_path):
    base, root = server
    good = b"the real bytes"
    _publish(root, "bad", "f.gz", b"tampered bytes")
    _publish(root, "good", "f.gz", good)
    path = download.fetch("f.gz", tmp_path / "d", _spec(good), [f"{base}/bad", f"{base}/good"])
    assert path.read_bytes() == good


def test_http_404(server, tmp_path):
    base, _root = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        download.fetch("missing.gz", tmp_path / "d", _spec(b"x"), [f"{base}/m1/"])


def test_server_down(dead_url, tmp_path):
    with pytest.raises(DownloadError, match=r"could not download f\.gz") as info:
        download.fetch("f.gz", tmp_path / "d", _spec(b"x"), [dead_url], timeout=5)
    assert dead_url in str(info.value)
    assert not (tmp_path / "d" / "f.gz").exists()


def test_verified_file_is_not_fetched_again(dead_url, tmp_path):
    content = b"already here"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.gz").write_bytes(content)
    path = download.fetch("f.gz", tmp_path / "d", _spec(content), [dead_url])
    assert path.read_bytes() == content


def test_checksum_table_is_well_formed():
    assert set(download.MNIST_FILES) == {
        stem + ".gz" for stem in data.IDX_FILES.values()
    }  # the names data.py looks for
    for spec in download.MNIST_FILES.values():
        assert spec.size > 0 and len(spec.sha256) == 64
        int(spec.sha256, 16)


def _serve_fixture_mnist(root, monkeypatch, base):
    source = root / "mnist"
    write_mnist_dir(source, gz=True, n_train=40, n_test=20)
    files = {p.name: _spec(p.read_bytes()) for p in source.iterdir()}
    monkeypatch.setattr(download, "MNIST_FILES", files)
    monkeypatch.setattr(download, "MNIST_MIRRORS", (f"{base}/nothing-here/", f"{base}/mnist/"))


def test_mnist_is_downloaded_into_the_cache(server, isolated, monkeypatch, run_cli):
    base, root = server
    _serve_fixture_mnist(root, monkeypatch, base)
    code, out, err = run_cli("train", "--dataset", "mnist", "--epochs", "1", "--out", "o1")
    assert code == 0, err
    assert "downloading" in err and "mnist: 40 train / 20 test images of 6x6" in out
    cached = isolated / "cache" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(download.MNIST_FILES)
    # Found in the cache the second time: no server needed.
    monkeypatch.setattr(download, "MNIST_MIRRORS", ("http://127.0.0.1:9/",))
    code, out, err = run_cli("train", "--dataset", "mnist", "--epochs", "1", "--out", "o2")
    assert code == 0, err
    assert "downloading" not in err and str(cached) in out


def test_mnist_download_failure_is_one_line(dead_url, monkeypatch, run_cli):
    monkeypatch.setattr(download, "MNIST_MIRRORS", (dead_url,))
    code, _out, err = run_cli("train", "--dataset", "mnist", "--out", "o")
    assert code == 2
    message = err.strip().splitlines()[-1]
    assert "could not download" in message and "--data-dir" in message
    assert "Traceback" not in err
