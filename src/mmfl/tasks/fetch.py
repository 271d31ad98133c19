"""Download the original files of the standard datasets into a data folder, checksum-verified.

``fetch(name, data_dir)`` puts the files where the loaders look for them:

=================  ==================================  =======================================
dataset            folder (under ``data_dir``)         what is downloaded
=================  ==================================  =======================================
``mnist``          ``mnist/``                          the 4 idx ``.gz`` files
``fashion_mnist``  ``fashion-mnist/``                  the 4 idx ``.gz`` files
``emnist``         ``emnist/``                         NIST's ``gzip.zip`` (all splits; the
                                                       idx ``.gz`` files are extracted from it)
``cifar10``        ``cifar10/cifar-10-batches-bin/``   ``cifar-10-binary.tar.gz`` (the 6
                                                       ``.bin`` batches are extracted from it)
=================  ==================================  =======================================

``shakespeare`` has no download: it is produced by the LEAF benchmark's preprocessing scripts
(``fetch`` raises a :class:`DataError` that says how).

Every downloaded file is checked against the digest in :data:`CHECKSUMS` (the MD5 sums the
dataset authors publish; SHA-256 is used where an entry says so). A file is written to a
temporary name in the target folder and renamed into place only once its digest matched; on a
mismatch or any error the partial file is deleted. Archives are unpacked member by member
(only the expected regular files, by base name: no path from an archive is trusted) and then
deleted. A dataset whose files are all present is not downloaded again.

``data_dir`` None means ``$MMFL_DATA``, else :func:`default_data_dir`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pathlib
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Callable

from mmfl.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["CHECKSUMS", "DEFAULT_TIMEOUT", "FETCHABLE", "SOURCES", "Source", "default_data_dir",
           "fetch", "fetch_main", "resolve_data_dir"]

#: Seconds a connection or a read may block before the download is given up.
DEFAULT_TIMEOUT = 60.0
_CHUNK = 1 << 20

_IDX_GZ = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

#: Official download locations (base URLs, tried in order; a file's URL is base + file name).
#: MNIST: the PyTorch project's mirror first (the original site often refuses downloads).
MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FASHION_MNIST_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/"
                      "data/fashion/")
EMNIST_URLS = ("https://biometrics.nist.gov/cs_links/EMNIST/",)
CIFAR10_URLS = ("https://www.cs.toronto.edu/~kriz/",)

#: The EMNIST splits in NIST's ``gzip.zip``.
EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
CIFAR10_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)

#: (dataset, file name) -> (hash algorithm, hex digest) of every file :func:`fetch` downloads:
#: the MD5 sums published by the dataset authors (MNIST, Fashion-MNIST's README, NIST's EMNIST
#: page, the CIFAR page).
CHECKSUMS: dict[tuple[str, str], tuple[str, str]] = {
    ("mnist", "train-images-idx3-ubyte.gz"): ("md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    ("mnist", "train-labels-idx1-ubyte.gz"): ("md5", "d53e105ee54ea40749a09fcbcd1e9432"),
    ("mnist", "t10k-images-idx3-ubyte.gz"): ("md5", "9fb629c4189551a2d022fa330f9573f3"),
    ("mnist", "t10k-labels-idx1-ubyte.gz"): ("md5", "ec29112dd5afa0611ce80d1b7f02629c"),
    ("fashion_mnist", "train-images-idx3-ubyte.gz"): ("md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("fashion_mnist", "train-labels-idx1-ubyte.gz"): ("md5", "25c81989df183df01b3e8a0aad5dffbe"),
    ("fashion_mnist", "t10k-images-idx3-ubyte.gz"): ("md5", "bef4ecab320f06d8554ea6380940ec79"),
    ("fashion_mnist", "t10k-labels-idx1-ubyte.gz"): ("md5", "bb300cfdad3c16e7a12a480ee83cd310"),
    ("emnist", "gzip.zip"): ("md5", "58c8d27c78d21e728a6bc7b3cc06412e"),
    ("cifar10", "cifar-10-binary.tar.gz"): ("md5", "c32a1d4ab5d03f1284b67883e8d87530"),
}


@dataclass(frozen=True)
class Source:
    """Where a dataset's files come from and where they go.

    Attributes:
        folder: target folder relative to the data folder.
        urls: base URLs (mirrors) tried in order.
        downloads: file names to download (each has a :data:`CHECKSUMS` entry).
        outputs: files (relative to ``folder``) whose presence means the dataset is fetched.
        unpack: for archives, ``unpack(archive_path, folder) -> list of files written``; the
            archive is deleted afterwards. None: the downloads are the outputs.
        size: approximate download size, for messages.
    """

    folder: str
    urls: tuple[str, ...]
    downloads: tuple[str, ...]
    outputs: tuple[str, ...]
    unpack: Callable[[pathlib.Path, pathlib.Path], list[pathlib.Path]] | None = None
    size: str = ""


def _copy_member(read, out: pathlib.Path) -> None:
    """Write the stream ``read`` (a file object) to ``out`` through a temporary file."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            shutil.copyfileobj(read, f, _CHUNK)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _unpack_emnist(archive: pathlib.Path, folder: pathlib.Path) -> list[pathlib.Path]:
    """Extract the ``emnist-<split>-<train|test>-<images|labels>-idx?-ubyte.gz`` members."""
    pattern = re.compile(r"emnist-(%s)-(train|test)-(images-idx3|labels-idx1)-ubyte\.gz"
                         % "|".join(EMNIST_SPLITS))
    written = []
    try:
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                base = info.filename.rsplit("/", 1)[-1]
                if info.is_dir() or not pattern.fullmatch(base):
                    continue
                with z.open(info) as src:
                    _copy_member(src, folder / base)
                written.append(folder / base)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"emnist: cannot unpack {archive}: {e}") from None
    return written


def _unpack_cifar10(archive: pathlib.Path, folder: pathlib.Path) -> list[pathlib.Path]:
    """Extract the six ``cifar-10-batches-bin/*.bin`` batches (regular files only)."""
    written = []
    try:
        with tarfile.open(archive, "r:gz") as t:
            for member in t:
                base = member.name.rsplit("/", 1)[-1]
                if not member.isreg() or base not in CIFAR10_BATCHES:
                    continue
                src = t.extractfile(member)
                if src is None:
                    continue
                with src:
                    _copy_member(src, folder / base)
                written.append(folder / base)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cifar10: cannot unpack {archive}: {e}") from None
    return written


def _emnist_outputs() -> tuple[str, ...]:
    return tuple(f"emnist-{s}-{part}-{kind}-ubyte.gz" for s in EMNIST_SPLITS
                 for part in ("train", "test") for kind in ("images-idx3", "labels-idx1"))


#: Every dataset :func:`fetch` can download.
SOURCES: dict[str, Source] = {
    "mnist": Source("mnist", MNIST_URLS, _IDX_GZ, _IDX_GZ, size="12 MB"),
    "fashion_mnist": Source("fashion-mnist", FASHION_MNIST_URLS, _IDX_GZ, _IDX_GZ, size="30 MB"),
    "emnist": Source("emnist", EMNIST_URLS, ("gzip.zip",), _emnist_outputs(), _unpack_emnist,
                     size="560 MB"),
    "cifar10": Source("cifar10/cifar-10-batches-bin", CIFAR10_URLS, ("cifar-10-binary.tar.gz",),
                      CIFAR10_BATCHES, _unpack_cifar10, size="170 MB"),
}
FETCHABLE = tuple(SOURCES)

#: How to obtain ``shakespeare`` (no single official file exists to download).
SHAKESPEARE_HINT = (
    "shakespeare is produced by the LEAF benchmark (TalwalkarLab/leaf): in its "
    "data/shakespeare folder run `./preprocess.sh -s niid --sf 1.0 -k 0 -t sample` and copy "
    "the resulting data/train and data/test folders (LEAF JSON files) to DATA/shakespeare/"
)


def default_data_dir() -> pathlib.Path:
    """The default data folder: ``$XDG_CACHE_HOME/mmfl/data`` (``~/.cache/mmfl/data``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "mmfl" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    """``data_dir``, else ``$MMFL_DATA``, else :func:`default_data_dir` (user-expanded)."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get("MMFL_DATA") or default_data_dir()
    return pathlib.Path(data_dir).expanduser()


def _where_to_put(name: str, src: Source, folder: pathlib.Path) -> str:
    return (f"where the network allows, run `mmfl data fetch {name}` (or pass base_url to a "
            f"mirror); otherwise download {', '.join(src.downloads)} from "
            f"{' or '.join(src.urls)} yourself and put "
            f"{'them' if src.unpack is None else 'the unpacked files'} in {folder}")


def _download(url: str, dest: pathlib.Path, algorithm: str, digest: str,
              timeout: float) -> None:
    """Stream ``url`` into ``dest`` atomically, verifying its digest.

    Raises:
        DataError: digest mismatch (the partial file is deleted).
        OSError / urllib.error.URLError / http.client.HTTPException: network failures (the
            partial file is deleted), for the caller to try the next mirror.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = pathlib.Path(tmp_name)
    try:
        h = hashlib.new(algorithm, usedforsecurity=False)
        size = 0
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": "mmfl-fetch"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                while True:
                    block = resp.read(_CHUNK)
                    if not block:
                        break
                    h.update(block)
                    out.write(block)
                    size += len(block)
        got = h.hexdigest()
        if got != digest.lower():
            raise DataError(f"checksum mismatch for {url}: {algorithm} {got}, expected {digest} "
                            f"({size} bytes; the download was deleted; try again or another "
                            "mirror)")
        os.replace(tmp, dest)
        log.info("downloaded %s (%d bytes, %s ok)", url, size, algorithm)
    finally:
        tmp.unlink(missing_ok=True)


def _reason(e: Exception) -> str:
    """A short reason for a failed download."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def _file_digest(path: pathlib.Path, algorithm: str) -> str:
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, data_dir: str | os.PathLike | None, *, base_url: str | None = None,
          timeout: float = DEFAULT_TIMEOUT) -> pathlib.Path:
    """Download dataset ``name``'s original files into ``data_dir`` and verify them.

    Args:
        name: one of :data:`FETCHABLE` (``mnist``, ``fashion_mnist``, ``emnist``, ``cifar10``).
        data_dir: the data folder (the one given to the loaders as ``--data-dir``); None:
            ``$MMFL_DATA``, else :func:`default_data_dir`.
        base_url: download from this base URL instead of the official ones (a mirror holding
            the same file names).
        timeout: seconds a connect or read may block.

    Returns:
        the folder holding the dataset's files (``data_dir/<folder>``, see the module table).

    Raises:
        DataError: unknown or non-downloadable name, no network (says what to put where),
            checksum mismatch, unwritable folder, bad archive.
    """
    if name == "shakespeare":
        raise DataError(f"shakespeare cannot be downloaded as one file; {SHAKESPEARE_HINT} "
                        f"(here DATA is {resolve_data_dir(data_dir)})")
    if name not in SOURCES:
        raise DataError(f"cannot fetch dataset {name!r}; fetchable: {', '.join(FETCHABLE)}")
    src = SOURCES[name]
    folder = resolve_data_dir(data_dir) / src.folder
    if all((folder / f).is_file() for f in src.outputs):
        log.info("%s already present in %s", name, folder)
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{name}: cannot create {folder}: {e}") from None
    urls = (base_url,) if base_url else src.urls
    for file in src.downloads:
        try:
            algorithm, digest = CHECKSUMS[(name, file)]
        except KeyError:
            raise DataError(f"{name}: no checksum known for {file}") from None
        dest = folder / file
        if dest.is_file() and _file_digest(dest, algorithm) == digest.lower():
            log.info("%s already downloaded", dest)
        else:
            errors = []
            for base in urls:
                url = base.rstrip("/") + "/" + file
                log.info("downloading %s (%s)", url, src.size or "?")
                try:
                    _download(url, dest, algorithm, digest, timeout)
                    break
                except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                    reason = _reason(e)
                    errors.append(f"{url}: {reason}")
                    log.warning("cannot download %s: %s", url, reason)
            else:
                raise DataError(f"{name}: cannot download {file} ({'; '.join(errors)}); "
                                f"no network? {_where_to_put(name, src, folder)}")
        if src.unpack is not None:
            written = src.unpack(dest, folder)
            log.info("unpacked %d files from %s", len(written), dest)
            dest.unlink(missing_ok=True)
    missing = [f for f in src.outputs if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name}: the downloaded files lack {', '.join(missing)} "
                        f"(in {folder})")
    return folder


def fetch_main(name: str, data_dir: str | os.PathLike | None) -> str:
    """``mmfl data fetch NAME``: :func:`fetch` with the default timeout and mirrors.

    Returns:
        one line saying where the files are and how to use them, e.g. ``"mnist: files in
        /d/mnist; use --data-dir /d (or MMFL_DATA=/d)"``.

    Raises:
        DataError: as :func:`fetch` (one line, for the CLI to print and exit 2).
    """
    root = resolve_data_dir(data_dir)
    folder = fetch(name, root)
    return f"{name}: files in {folder}; use --data-dir {root} (or MMFL_DATA={root})"
