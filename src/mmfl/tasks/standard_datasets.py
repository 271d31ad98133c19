"""Loaders of the standard datasets read from their original files in a data folder.

Registered under the ``"dataset"`` kind with the signature of :mod:`mmfl.tasks.datasets`
(``loader(options, data_dir, seed) -> Dataset``):

- ``mnist``: the 4 MNIST idx files (plain or ``.gz``); input (1, 28, 28), 10 classes,
  normalised with MNIST's mean 0.1307 and std 0.3081.
- ``emnist``: the idx files of one EMNIST split (option ``split``, default ``balanced``: 47
  classes; ``byclass`` 62, ``bymerge`` 47, ``letters`` 26, ``digits`` 10, ``mnist`` 10). EMNIST
  stores every image transposed; the loader turns them upright. ``letters`` labels 1..26 become
  0..25. Normalised with the mean and std of the split's training pixels.
- ``cifar10``: the binary version (``cifar-10-batches-bin``: ``data_batch_1..5.bin``,
  ``test_batch.bin``, records of 1 label byte + 3072 pixel bytes, channel-major). The Python
  pickle version is never read: unpickling a downloaded file can run arbitrary code. Input
  (3, 32, 32), normalised per channel.
- ``shakespeare``: LEAF's Shakespeare JSON (``train/*.json`` and ``test/*.json``): each sample is
  ``seq_len`` characters and the class of the next character; ``groups`` is the speaking role
  (LEAF "user") of each training sample, so the ``natural`` partition gives each client whole
  roles.

Where the files are looked for, in order (``DATA`` is ``data_dir``, else ``$MMFL_DATA``):
``DATA/<folder>`` and the dataset's usual sub-layouts, ``DATA`` itself, then the folder
:func:`mmfl.tasks.fetch.fetch` writes to by default (:func:`~mmfl.tasks.fetch.default_data_dir`).
``mmfl data fetch NAME`` downloads ``mnist``, ``emnist`` and ``cifar10`` there (see
:mod:`mmfl.tasks.fetch`); a missing file is a :class:`DataError` naming the folders searched and
what to put where.

Character indices (``shakespeare``) are stored as **float32**, like every :class:`Dataset`
input (the engines feed float32 ``x[idx]`` to the model); the ``lstm`` model casts them back to
integers. Indices are exact in float32.

Loaded datasets are cached in-process (like ``fashion_mnist``); never modify their arrays.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import string
import threading
from typing import Iterable, Sequence

import numpy as np

from mmfl.errors import DataError
from mmfl.registry import Option, register
from mmfl.rng import dataset_purpose, stream
from mmfl.tasks.datasets import Dataset, find_idx_files, read_idx, read_maybe_gzipped
from mmfl.tasks.fetch import SHAKESPEARE_HINT, default_data_dir

log = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "EMNIST_CLASSES",
    "MNIST_MEAN",
    "MNIST_STD",
    "SHAKESPEARE_UNKNOWN",
    "SHAKESPEARE_VOCAB",
    "candidate_folders",
    "clear_cache",
    "encode_chars",
    "encode_sequences",
    "load_cifar10",
    "load_emnist",
    "load_mnist",
    "load_shakespeare",
    "read_cifar_batch",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: Per-channel (R, G, B) mean and std of the CIFAR-10 training pixels in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: EMNIST split -> number of classes.
EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10,
                  "mnist": 10}

#: The 80 characters of LEAF's Shakespeare vocabulary (newline, space, punctuation, digits,
#: letters), in the order that defines their indices 0..79.
SHAKESPEARE_VOCAB = ("\n !\"&'(),-." + string.digits + ":;>?" + string.ascii_uppercase + "[]"
                     + string.ascii_lowercase + "}")
#: The reserved input index of a character outside the vocabulary (and of left padding).
SHAKESPEARE_UNKNOWN = len(SHAKESPEARE_VOCAB)
assert SHAKESPEARE_UNKNOWN == 80 and len(set(SHAKESPEARE_VOCAB)) == 80

_CHAR_LUT = np.full(128, SHAKESPEARE_UNKNOWN, dtype=np.int64)
for _i, _ch in enumerate(SHAKESPEARE_VOCAB):
    _CHAR_LUT[ord(_ch)] = _i

_MNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
_CIFAR_RECORD = 1 + 3 * 32 * 32

_CACHE: dict[tuple, Dataset] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget the datasets this module loaded in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cached(key: tuple, build) -> Dataset:
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def candidate_folders(data_dir: pathlib.Path | str | None,
                      subdirs: Sequence[str]) -> list[pathlib.Path]:
    """Folders to search, in order: ``DATA/<sub>`` for each of ``subdirs``, ``DATA``, then
    ``default_data_dir()/<sub>``. ``DATA`` is ``data_dir``, else ``$MMFL_DATA`` (else only the
    default folder is searched)."""
    root = data_dir if data_dir is not None else os.environ.get("MMFL_DATA") or None
    out: list[pathlib.Path] = []
    if root is not None:
        root = pathlib.Path(root).expanduser()
        out += [root / s for s in subdirs] + [root]
    default = default_data_dir()
    out += [default / s for s in subdirs if default / s not in out]
    return out


def _hint(name: str, files: str, folder: str) -> str:
    return (f"run `mmfl data fetch {name}` where the network allows, or put {files} in "
            f"DATA/{folder} (DATA: --data-dir, the config's data_dir or $MMFL_DATA)")


def _u8_to_float(raw: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 pixels -> float32 ``(p / 255 - mean) / std`` through a 256-entry table."""
    lut = ((np.arange(256, dtype=np.float64) / 255.0 - mean) / std).astype(np.float32)
    return lut[raw]


def _u8_mean_std(raw: np.ndarray) -> tuple[float, float]:
    """Mean and std of uint8 pixels scaled to [0, 1] (exact, via a histogram)."""
    hist = np.bincount(np.ascontiguousarray(raw).reshape(-1), minlength=256).astype(np.float64)
    v = np.arange(256, dtype=np.float64) / 255.0
    n = max(hist.sum(), 1.0)
    mean = float((hist * v).sum() / n)
    var = float((hist * v * v).sum() / n) - mean * mean
    return mean, max(var, 1e-12) ** 0.5


def _idx_images_labels(images: pathlib.Path, labels: pathlib.Path, name: str,
                       num_classes: int, label_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, H, W) uint8 images and (n,) int64 labels - label_offset from a pair of idx files."""
    x, y = read_idx(images), read_idx(labels)
    if x.dtype != np.uint8 or x.ndim != 3:
        raise DataError(f"{name}: {images} holds {x.dtype} data of shape {x.shape}; expected "
                        "uint8 images (n, H, W)")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{name}: {images} has shape {x.shape} but {labels} has shape {y.shape}")
    y = y.astype(np.int64) - label_offset
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{name}: labels in {labels} outside "
                        f"[{label_offset}, {num_classes + label_offset})")
    return x, y


# --------------------------------------------------------------------------------------------
# mnist


@register("dataset", "mnist", options={})
def load_mnist(options: dict, data_dir: pathlib.Path | None, seed: int) -> Dataset:
    """MNIST (60000 + 10000 handwritten digits 28x28, 10 classes) from the 4 idx files."""
    folders = candidate_folders(data_dir, ("mnist", "MNIST/raw"))
    files = find_idx_files(_MNIST_STEMS, folders, dataset="mnist", hint=_hint(
        "mnist", "the idx files " + ", ".join(_MNIST_STEMS) + " (plain or .gz)", "mnist"))

    def build() -> Dataset:
        log.info("loading mnist from %s", files[_MNIST_STEMS[0]].parent)
        xtr, ytr = _idx_images_labels(files[_MNIST_STEMS[0]], files[_MNIST_STEMS[1]], "mnist", 10)
        xte, yte = _idx_images_labels(files[_MNIST_STEMS[2]], files[_MNIST_STEMS[3]], "mnist", 10)
        if xtr.shape[1:] != xte.shape[1:]:
            raise DataError(f"mnist: train images {xtr.shape[1:]} and test images "
                            f"{xte.shape[1:]} differ in size")
        xtr = _u8_to_float(xtr, MNIST_MEAN, MNIST_STD)[:, None]
        xte = _u8_to_float(xte, MNIST_MEAN, MNIST_STD)[:, None]
        return Dataset("mnist", xtr, ytr, xte, yte, 10, xtr.shape[1:])

    return _cached(("mnist", *(str(files[s].resolve()) for s in _MNIST_STEMS)), build)


# --------------------------------------------------------------------------------------------
# emnist


@register(
    "dataset",
    "emnist",
    options={
        "split": Option(str, "balanced", "one of " + "|".join(EMNIST_CLASSES),
                        "EMNIST split (balanced: 47 classes, byclass: 62, letters: 26, ...)"),
    },
)
def load_emnist(options: dict, data_dir: pathlib.Path | None, seed: int) -> Dataset:
    """EMNIST (one split, option ``split``) from its idx files; images turned upright."""
    split = str(options.get("split", "balanced"))
    if split not in EMNIST_CLASSES:
        raise DataError(f"emnist: unknown split {split!r}; splits: {', '.join(EMNIST_CLASSES)}")
    K = EMNIST_CLASSES[split]
    stems = tuple(f"emnist-{split}-{part}-{kind}-ubyte" for part in ("train", "test")
                  for kind in ("images-idx3", "labels-idx1"))
    folders = candidate_folders(data_dir, ("emnist", "emnist/gzip", "EMNIST/raw", "gzip"))
    files = find_idx_files(stems, folders, dataset=f"emnist ({split})", hint=_hint(
        "emnist", "the idx files " + ", ".join(stems) + " (plain or .gz, from NIST's gzip.zip)",
        "emnist"))
    offset = 1 if split == "letters" else 0

    def build() -> Dataset:
        log.info("loading emnist %s from %s", split, files[stems[0]].parent)
        xtr, ytr = _idx_images_labels(files[stems[0]], files[stems[1]], "emnist", K, offset)
        xte, yte = _idx_images_labels(files[stems[2]], files[stems[3]], "emnist", K, offset)
        if xtr.shape[1:] != xte.shape[1:]:
            raise DataError(f"emnist: train images {xtr.shape[1:]} and test images "
                            f"{xte.shape[1:]} differ in size")
        mean, std = _u8_mean_std(xtr)
        # EMNIST stores each image transposed (column-major): swap H and W to turn it upright
        xtr = _u8_to_float(np.ascontiguousarray(xtr.transpose(0, 2, 1)), mean, std)[:, None]
        xte = _u8_to_float(np.ascontiguousarray(xte.transpose(0, 2, 1)), mean, std)[:, None]
        return Dataset("emnist", xtr, ytr, xte, yte, K, xtr.shape[1:])

    return _cached(("emnist", split, *(str(files[s].resolve()) for s in stems)), build)


# --------------------------------------------------------------------------------------------
# cifar10


def read_cifar_batch(path: pathlib.Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch (plain, or gzip when the name ends in ``.gz``).

    The format: records of 1 label byte (0..9) and 3072 pixel bytes (the 1024 red, then green,
    then blue values of a 32x32 image, rows in order).

    Returns:
        x: (n, 3, 32, 32) uint8, y: (n,) int64.

    Raises:
        DataError: naming the file, when it cannot be read, is empty, is not a whole number of
            records (truncated) or holds a label above 9.
    """
    path = pathlib.Path(path)
    raw = read_maybe_gzipped(path, "CIFAR-10 batch")
    if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
        raise DataError(f"malformed CIFAR-10 batch {path}: {len(raw)} bytes is not a whole "
                        f"number of {_CIFAR_RECORD}-byte records (truncated?)")
    rec = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR_RECORD)
    y = rec[:, 0].astype(np.int64)
    if y.max() > 9:
        raise DataError(f"malformed CIFAR-10 batch {path}: label {int(y.max())} above 9")
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), y


def _cifar_float(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape, dtype=np.float32)
    for c in range(3):
        out[:, c] = _u8_to_float(x[:, c], CIFAR10_MEAN[c], CIFAR10_STD[c])
    return out


@register("dataset", "cifar10", options={})
def load_cifar10(options: dict, data_dir: pathlib.Path | None, seed: int) -> Dataset:
    """CIFAR-10 (50000 + 10000 colour images 32x32, 10 classes) from the binary batches."""
    folders = candidate_folders(data_dir, ("cifar10/cifar-10-batches-bin", "cifar-10-batches-bin",
                                           "cifar10"))
    files = find_idx_files(_CIFAR_BATCHES, folders, dataset="cifar10", hint=_hint(
        "cifar10", "the binary batches " + ", ".join(_CIFAR_BATCHES)
        + " (from cifar-10-binary.tar.gz; the python pickle version is not read)",
        "cifar10/cifar-10-batches-bin"))

    def build() -> Dataset:
        log.info("loading cifar10 from %s", files[_CIFAR_BATCHES[0]].parent)
        parts = [read_cifar_batch(files[b]) for b in _CIFAR_BATCHES]
        xtr = _cifar_float(np.concatenate([p[0] for p in parts[:5]]))
        ytr = np.concatenate([p[1] for p in parts[:5]])
        xte, yte = _cifar_float(parts[5][0]), parts[5][1]
        return Dataset("cifar10", xtr, ytr, xte, yte, 10, (3, 32, 32))

    return _cached(("cifar10", *(str(files[b].resolve()) for b in _CIFAR_BATCHES)), build)


# --------------------------------------------------------------------------------------------
# shakespeare (LEAF)


def encode_chars(text: str) -> np.ndarray:
    """(len(text),) int64 vocabulary index of every character of ``text``.

    A character of :data:`SHAKESPEARE_VOCAB` maps to its position; any other maps to
    :data:`SHAKESPEARE_UNKNOWN`.
    """
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    return np.where(cp < 128, _CHAR_LUT[np.minimum(cp, 127)], SHAKESPEARE_UNKNOWN)


def encode_sequences(strings: Sequence[str], seq_len: int) -> np.ndarray:
    """(n, seq_len) int64 indices of ``strings``, right-aligned.

    A string longer than ``seq_len`` keeps its last ``seq_len`` characters (those just before
    the predicted one); a shorter one is left-padded with :data:`SHAKESPEARE_UNKNOWN`.
    """
    n = len(strings)
    lens = np.fromiter(map(len, strings), dtype=np.int64, count=n)
    codes = encode_chars("".join(strings))
    if n and (lens == seq_len).all():
        return codes.reshape(n, seq_len)
    out = np.full((n, seq_len), SHAKESPEARE_UNKNOWN, dtype=np.int64)
    keep = np.minimum(lens, seq_len)
    ends = np.cumsum(lens)
    offs = np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep)
    rows = np.repeat(np.arange(n), keep)
    out[rows, np.repeat(seq_len - keep, keep) + offs] = codes[np.repeat(ends - keep, keep) + offs]
    return out


def _shakespeare_folders(data_dir) -> list[pathlib.Path]:
    return candidate_folders(data_dir, ("shakespeare", "shakespeare/data"))


def _read_leaf(folder: pathlib.Path) -> dict[str, tuple[list, list]]:
    """user -> (x strings, y strings) merged over the LEAF JSON files of ``folder``."""
    out: dict[str, tuple[list, list]] = {}
    files = sorted(folder.glob("*.json"))
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: bad UTF-8, JSON or number
            raise DataError(f"shakespeare: cannot read LEAF file {path}: "
                            f"{str(e)[:200]}") from None
        except RecursionError:
            raise DataError(f"shakespeare: cannot read LEAF file {path}: arrays or objects "
                            "nested too deeply") from None
        data = obj.get("user_data") if isinstance(obj, dict) else None
        if not isinstance(data, dict):
            raise DataError(f"shakespeare: {path} is not a LEAF data file (no \"user_data\" "
                            "table of user -> {\"x\": [...], \"y\": [...]})")
        for user, d in data.items():
            x = d.get("x") if isinstance(d, dict) else None
            y = d.get("y") if isinstance(d, dict) else None
            if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y):
                raise DataError(f"shakespeare: {path}: user {user!r} needs lists \"x\" and "
                                "\"y\" of equal length")
            if not all(isinstance(s, str) for s in x) or not all(
                    isinstance(c, str) and len(c) == 1 for c in y):
                raise DataError(f"shakespeare: {path}: user {user!r}: \"x\" must hold strings "
                                "and \"y\" single characters")
            xs, ys = out.setdefault(str(user), ([], []))
            xs.extend(x)
            ys.extend(y)
    return out


def _encode_users(data: dict[str, tuple[list, list]], users: Iterable[str], seq_len: int,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """x (n, seq_len) int64, y (n,), group (n,) (position in ``users``), samples dropped."""
    xs, ys, gs = [], [], []
    for g, user in enumerate(users):
        x, y = data.get(user, ([], []))
        xs.extend(x)
        ys.extend(y)
        gs.append(np.full(len(y), g, dtype=np.int64))
    x = encode_sequences(xs, seq_len)
    y = encode_chars("".join(ys))
    group = np.concatenate(gs) if gs else np.zeros(0, np.int64)
    ok = y != SHAKESPEARE_UNKNOWN  # a target outside the 80 classes cannot be learned
    return x[ok], y[ok], group[ok], int((~ok).sum())


@register(
    "dataset",
    "shakespeare",
    options={
        "max_users": Option(int, 0, ">= 0", "speaking roles (LEAF users) kept, drawn at random "
                            "with the seed; 0 = all"),
        "seq_len": Option(int, 80, "1..100000", "characters per input (LEAF: 80)"),
    },
)
def load_shakespeare(options: dict, data_dir: pathlib.Path | None, seed: int) -> Dataset:
    """LEAF Shakespeare next-character prediction: input (seq_len,) indices, 80 classes.

    Reads ``train/*.json`` and ``test/*.json`` of LEAF's (sample-split) Shakespeare data. Each
    user (a speaking role of a play) is one natural group: ``groups[j]`` is the position of
    sample j's user among the kept users (sorted by name). With ``max_users`` > 0 that many
    users are drawn with ``stream(seed, "dataset:shakespeare")`` and both splits keep only their
    samples. Inputs hold vocabulary indices (:data:`SHAKESPEARE_VOCAB`, unknown characters and
    padding -> :data:`SHAKESPEARE_UNKNOWN` = 80) as float32; a sample whose target character is
    outside the vocabulary is dropped.
    """
    max_users = int(options.get("max_users", 0))
    seq_len = int(options.get("seq_len", 80))
    folders = _shakespeare_folders(data_dir)
    base = next((f for f in folders
                 if any((f / "train").glob("*.json")) and any((f / "test").glob("*.json"))),
                None)
    if base is None:
        searched = ", ".join(str(f) for f in folders)
        raise DataError(f"shakespeare not found; searched {searched} for train/*.json and "
                        f"test/*.json; {SHAKESPEARE_HINT} (DATA: --data-dir, the config's "
                        "data_dir or $MMFL_DATA)")
    key = ("shakespeare", str(base.resolve()), max_users, seq_len,
           int(seed) if max_users else None)

    def build() -> Dataset:
        log.info("loading shakespeare from %s", base)
        train, test = _read_leaf(base / "train"), _read_leaf(base / "test")
        users = sorted(u for u, (_, y) in train.items() if len(y))
        if not users:
            raise DataError(f"shakespeare: no training sample in {base / 'train'}")
        if 0 < max_users < len(users):
            pick = stream(seed, dataset_purpose("shakespeare")).choice(len(users), max_users,
                                                              replace=False)
            users = [users[i] for i in np.sort(pick)]
        xtr, ytr, gtr, drop_tr = _encode_users(train, users, seq_len)
        test_users = users if max_users else sorted(test)
        xte, yte, _, drop_te = _encode_users(test, test_users, seq_len)
        if drop_tr or drop_te:
            log.info("shakespeare: dropped %d train and %d test samples whose target is not "
                     "one of the 80 characters", drop_tr, drop_te)
        if len(yte) == 0:
            raise DataError(f"shakespeare: no test sample for the {len(users)} kept users in "
                            f"{base / 'test'} (use LEAF's sample split, -t sample)")
        return Dataset("shakespeare", xtr.astype(np.float32), ytr, xte.astype(np.float32), yte,
                       SHAKESPEARE_UNKNOWN, (seq_len,), gtr)

    return _cached(key, build)
