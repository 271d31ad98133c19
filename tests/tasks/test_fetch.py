"""Tests of mmfl.tasks.fetch against a local HTTP server on loopback."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import io
import pathlib
import socket
import tarfile
import threading
import zipfile
from functools import partial

import numpy as np
import pytest
from test_standard_datasets import cifar_bytes, idx_bytes

from mmfl.errors import DataError
from mmfl.tasks import fetch as F
from mmfl.tasks import standard_datasets as SD

pytestmark = pytest.mark.usefixtures("isolated_data_dirs")



class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """(base URL, served folder, list of requested paths) of a loopback HTTP server."""
    root = tmp_path / "served"
    root.mkdir()
    handler = type("Handler", (_Quiet,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=root))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/files", root / "files", handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def closed_port_url() -> str:
    """A loopback URL nobody listens on (connection refused)."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def serve(folder: pathlib.Path, name: str, raw: bytes, dataset: str, monkeypatch,
          algorithm: str = "md5") -> None:
    """Put ``raw`` on the server as ``name`` and register its digest for ``dataset``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(raw)
    monkeypatch.setitem(F.CHECKSUMS, (dataset, name),
                        (algorithm, hashlib.new(algorithm, raw).hexdigest()))


def mnist_files(seed=0, n=6, n_test=3) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (n, 28, 28)),
              "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test)}
    return {k: gzip.compress(idx_bytes(a.astype(np.uint8))) for k, a in arrays.items()}


# ---------------------------------------------------------------------------- tables


def test_checksum_table_covers_every_download():
    assert set(F.FETCHABLE) == {"mnist", "fashion_mnist", "emnist", "cifar10"}
    for name, src in F.SOURCES.items():
        assert src.urls and all(u.startswith(("http://", "https://")) for u in src.urls)
        for file in src.downloads:
            algorithm, digest = F.CHECKSUMS[(name, file)]
            assert algorithm in ("md5", "sha256")
            assert len(digest) == {"md5": 32, "sha256": 64}[algorithm]
            int(digest, 16)


def test_fetch_folders_are_where_the_loaders_look(tmp_path):
    """Every fetch target folder is among the loader's candidate folders."""
    assert F.SOURCES["mnist"].folder == "mnist"
    assert F.SOURCES["emnist"].folder == "emnist"
    assert (tmp_path / F.SOURCES["cifar10"].folder) in SD.candidate_folders(
        tmp_path, ("cifar10/cifar-10-batches-bin",))
    assert F.SOURCES["fashion_mnist"].folder == "fashion-mnist"  # fashion_mnist's own loader


# ---------------------------------------------------------------------------- downloads


def test_fetch_mnist_then_load(tmp_path, server, monkeypatch):
    url, folder, requests = server
    files = mnist_files()
    for k, raw in files.items():
        serve(folder, k, raw, "mnist", monkeypatch, algorithm="sha256" if "t10k" in k else "md5")
    data = tmp_path / "data"
    out = F.fetch("mnist", data, base_url=url, timeout=5)
    assert out == data / "mnist"
    assert sorted(p.name for p in out.iterdir()) == sorted(files)  # no partial files left
    for k, raw in files.items():
        assert (out / k).read_bytes() == raw
    ds = SD.load_mnist({}, data, 0)
    assert ds.num_train == 6 and ds.num_test == 3
    # a second fetch finds everything present and downloads nothing
    n = len(requests)
    assert F.fetch("mnist", data, base_url=url, timeout=5) == out
    assert len(requests) == n == 4


def test_fetch_skips_verified_files_and_replaces_bad_ones(tmp_path, server, monkeypatch):
    url, folder, requests = server
    files = mnist_files()
    for k, raw in files.items():
        serve(folder, k, raw, "mnist", monkeypatch)
    target = tmp_path / "mnist"
    target.mkdir()
    names = list(files)
    (target / names[0]).write_bytes(files[names[0]])  # already downloaded, verified
    (target / names[1]).write_bytes(b"stale")           # corrupt: downloaded again
    F.fetch("mnist", tmp_path, base_url=url, timeout=5)
    assert sorted(requests) == sorted(f"/files/{k}" for k in names[1:])
    assert (target / names[1]).read_bytes() == files[names[1]]


def test_checksum_mismatch_deletes_and_raises(tmp_path, server, monkeypatch):
    url, folder, _ = server
    files = mnist_files()
    for k, raw in files.items():
        serve(folder, k, raw, "mnist", monkeypatch)
    bad = "train-labels-idx1-ubyte.gz"
    monkeypatch.setitem(F.CHECKSUMS, ("mnist", bad), ("md5", "0" * 32))
    with pytest.raises(DataError) as e:
        F.fetch("mnist", tmp_path, base_url=url, timeout=5)
    msg = str(e.value)
    assert "checksum mismatch" in msg and bad in msg and "\n" not in msg
    left = sorted(p.name for p in (tmp_path / "mnist").iterdir())
    assert left == ["train-images-idx3-ubyte.gz"]  # the file before it; nothing partial


def test_no_network_says_what_to_do(tmp_path, monkeypatch):
    refused = closed_port_url()
    monkeypatch.setitem(F.SOURCES, "mnist",
                        F.Source("mnist", (refused,), F.SOURCES["mnist"].downloads,
                                 F.SOURCES["mnist"].outputs))
    with pytest.raises(DataError) as e:
        F.fetch("mnist", tmp_path, timeout=5)
    msg = str(e.value)
    assert "\n" not in msg and "no network" in msg
    assert "mmfl data fetch mnist" in msg and str(tmp_path / "mnist") in msg
    assert "train-images-idx3-ubyte.gz" in msg and refused in msg
    assert list((tmp_path / "mnist").iterdir()) == []
    with pytest.raises(DataError, match="no network"):
        F.fetch("mnist", tmp_path, base_url=refused, timeout=5)


def test_http_error_and_mirror_fallback(tmp_path, server, monkeypatch):
    url, folder, _ = server
    files = mnist_files()
    for k, raw in files.items():
        serve(folder, k, raw, "mnist", monkeypatch)
    with pytest.raises(DataError, match="404"):
        F.fetch("mnist", tmp_path / "a", base_url=url + "/missing", timeout=5)
    monkeypatch.setitem(F.SOURCES, "mnist", F.Source(
        "mnist", (closed_port_url(), url + "/missing/", url + "/"),
        F.SOURCES["mnist"].downloads, F.SOURCES["mnist"].outputs))
    out = F.fetch("mnist", tmp_path / "b", timeout=5)
    assert all((out / k).read_bytes() == raw for k, raw in files.items())


def test_fetch_cifar10_unpacks_only_the_batches(tmp_path, server, monkeypatch):
    url, folder, _ = server
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    labels = {}
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        def add(name, raw, kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = len(raw), kind, link
            t.addfile(info, io.BytesIO(raw))
        for b in F.CIFAR10_BATCHES:
            y = rng.integers(0, 10, 2)
            labels[b] = y
            add(f"cifar-10-batches-bin/{b}",
                cifar_bytes(rng.integers(0, 256, (2, 3, 32, 32)), y))
        add("cifar-10-batches-bin/batches.meta.txt", b"airplane\n")
        add("../evil.bin", b"x")
        add("cifar-10-batches-bin/../../data_batch_9.bin", b"x")
        add("cifar-10-batches-bin/link", b"", tarfile.SYMTYPE, "/etc/passwd")
    serve(folder, "cifar-10-binary.tar.gz", buf.getvalue(), "cifar10", monkeypatch)
    data = tmp_path / "data"
    out = F.fetch("cifar10", data, base_url=url, timeout=5)
    assert out == data / "cifar10" / "cifar-10-batches-bin"
    assert sorted(p.name for p in out.iterdir()) == sorted(F.CIFAR10_BATCHES)  # archive deleted
    assert not (tmp_path / "evil.bin").exists() and not (data / "evil.bin").exists()
    ds = SD.load_cifar10({}, data, 0)
    np.testing.assert_array_equal(ds.y_test, labels["test_batch.bin"])
    assert ds.num_train == 10


def test_fetch_emnist_unpacks_the_idx_files(tmp_path, server, monkeypatch):
    url, folder, _ = server
    buf = io.BytesIO()
    up = np.zeros((2, 28, 28), np.uint8)
    up[:, 3, :] = 255  # a horizontal bar in row 3 (stored transposed: column 3)
    with zipfile.ZipFile(buf, "w") as z:
        for name in F.SOURCES["emnist"].outputs:
            if "images" in name:
                raw = idx_bytes(np.ascontiguousarray(up.transpose(0, 2, 1)))
            else:
                raw = idx_bytes(np.array([1, 2], np.uint8))
            z.writestr(f"gzip/{name}", gzip.compress(raw))
        z.writestr("gzip/emnist-balanced-mapping.txt", "0 48\n")
        z.writestr("../../evil-emnist-digits-train-images-idx3-ubyte.gz", b"x")
    serve(folder, "gzip.zip", buf.getvalue(), "emnist", monkeypatch)
    out = F.fetch("emnist", tmp_path, base_url=url, timeout=5)
    assert out == tmp_path / "emnist"
    assert sorted(p.name for p in out.iterdir()) == sorted(F.SOURCES["emnist"].outputs)
    assert len(F.SOURCES["emnist"].outputs) == 24
    ds = SD.load_emnist({"split": "digits"}, tmp_path, 0)
    x = ds.x_train[0, 0]
    assert (x[3] > x[10]).all()  # the bar is a row again
    np.testing.assert_array_equal(ds.y_train, [1, 2])
    ds = SD.load_emnist({"split": "letters"}, tmp_path, 0)
    np.testing.assert_array_equal(ds.y_train, [0, 1])


def test_bad_archive_is_a_data_error(tmp_path, server, monkeypatch):
    url, folder, _ = server
    serve(folder, "gzip.zip", b"not a zip", "emnist", monkeypatch)
    with pytest.raises(DataError, match="cannot unpack"):
        F.fetch("emnist", tmp_path, base_url=url, timeout=5)


def test_unknown_and_shakespeare(tmp_path):
    with pytest.raises(DataError, match="fetchable: mnist, fashion_mnist, emnist, cifar10"):
        F.fetch("imagenet", tmp_path)
    with pytest.raises(DataError) as e:
        F.fetch("shakespeare", tmp_path)
    assert "LEAF" in str(e.value) and "preprocess.sh" in str(e.value)


def test_data_dir_resolution(tmp_path, monkeypatch):
    assert F.resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    assert F.resolve_data_dir(None) == tmp_path / "xdg-cache" / "mmfl" / "data"
    assert F.default_data_dir() == tmp_path / "xdg-cache" / "mmfl" / "data"
    monkeypatch.setenv("MMFL_DATA", str(tmp_path / "env"))
    assert F.resolve_data_dir(None) == tmp_path / "env"
    assert F.resolve_data_dir("") == tmp_path / "env"


def test_fetch_main_one_line(tmp_path, server, monkeypatch):
    url, folder, _ = server
    for k, raw in mnist_files().items():
        serve(folder, k, raw, "mnist", monkeypatch)
    monkeypatch.setitem(F.SOURCES, "mnist", F.Source(
        "mnist", (url,), F.SOURCES["mnist"].downloads, F.SOURCES["mnist"].outputs))
    msg = F.fetch_main("mnist", str(tmp_path / "d"))
    assert "\n" not in msg and str(tmp_path / "d" / "mnist") in msg
    assert f"--data-dir {tmp_path / 'd'}" in msg
    # None: the default folder, where the loaders look last
    msg = F.fetch_main("mnist", None)
    assert str(F.default_data_dir() / "mnist") in msg
    assert SD.load_mnist({}, None, 0).num_train == 6
    with pytest.raises(DataError):
        F.fetch_main("shakespeare", None)
