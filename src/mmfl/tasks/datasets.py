"""Datasets: offline loaders returning a :class:`Dataset` of normalised numpy arrays.

Every loader has the signature ``loader(options: dict, data_dir: Path | None, seed: int) ->
Dataset`` and is registered under the ``"dataset"`` kind. ``options`` arrive validated with
defaults filled (see :mod:`mmfl.registry`). A loader is deterministic given ``(options, seed)``:
all its randomness comes from :func:`mmfl.rng.stream` ``(seed, "dataset:NAME")``.

Built-ins:

- ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes).
- ``fashion_mnist``: Fashion-MNIST from the four standard idx files (plain or ``.gz``).
- ``mnist1d``: an MNIST-1D-style procedurally generated 1-D dataset (10 classes, length 40).
- ``synthetic``: the synthetic(alpha, beta) data of FedProx (Li et al. 2020), with natural groups.

The idx helpers :func:`read_idx` and :func:`find_idx_files` are public so that other loaders of
idx-format data (MNIST, EMNIST) can reuse them.

Loaded datasets are shared between tasks through an in-process cache, so nobody may modify a
:class:`Dataset`'s arrays in place (copy first). They are left writable only so that
``torch.from_numpy`` can share their memory without a warning.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import pathlib
import stat
import threading
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mmfl.errors import DataError
from mmfl.registry import Option, register
from mmfl.rng import dataset_purpose, stream

log = logging.getLogger(__name__)

__all__ = [
    "Dataset",
    "FASHION_MNIST_SYSTEM_DIR",
    "IDX_DTYPES",
    "find_idx_files",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist1d",
    "load_synthetic",
    "read_idx",
    "stratified_split",
]


@dataclass(frozen=True)
class Dataset:
    """A train/test dataset held in memory.

    Attributes:
        name: registry name of the dataset.
        x_train: (n, *input_shape) float32, normalised inputs.
        y_train: (n,) int64 labels in [0, num_classes); for a regression dataset (n,) or
            (n, k) float32 targets.
        x_test: (n_test, *input_shape) float32.
        y_test: (n_test,) int64, or for a regression dataset float32 shaped like ``y_train``.
        num_classes: K; for a regression dataset the number k of target values per sample (the
            model's output width; 1 for (n,) targets).
        input_shape: shape of one input, e.g. (1, 28, 28) for images or (40,) for sequences.
        groups: (n,) int64 natural client-group id of each training sample (e.g. the device of
            ``synthetic``), or None when the data has no natural split.
        regression: real-valued targets, trained and evaluated with ``tasks[i].loss = "mse"``
            (:mod:`mmfl.tasks.losses`); False (the default): class labels.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    groups: np.ndarray | None = None
    regression: bool = False

    def __post_init__(self) -> None:
        n, n_test = len(self.y_train), len(self.y_test)
        shape = tuple(int(d) for d in self.input_shape)
        if self.x_train.shape != (n, *shape) or self.x_test.shape != (n_test, *shape):
            raise ValueError(
                f"Dataset {self.name}: x shapes {self.x_train.shape}, {self.x_test.shape} do not "
                f"match labels ({n}, {n_test}) and input_shape {shape}"
            )
        if self.groups is not None and np.shape(self.groups) != (n,):
            raise ValueError(f"Dataset {self.name}: groups must have shape ({n},)")
        object.__setattr__(self, "input_shape", shape)
        target = np.float32 if self.regression else np.int64
        if self.regression:
            _check_targets(self)
        for attr, dtype in (("x_train", np.float32), ("x_test", np.float32),
                            ("y_train", target), ("y_test", target), ("groups", np.int64)):
            a = getattr(self, attr)
            if a is None:
                continue
            object.__setattr__(self, attr, np.ascontiguousarray(a, dtype=dtype))

    @property
    def num_train(self) -> int:
        """n, number of training samples."""
        return int(len(self.y_train))

    @property
    def num_test(self) -> int:
        """n_test, number of test samples."""
        return int(len(self.y_test))


def _check_targets(ds: Dataset) -> None:
    """A regression dataset's targets: (n,) with num_classes = 1, or (n, k) with k =
    num_classes, the same k in both splits, all finite."""
    k = int(ds.num_classes)
    for split in ("y_train", "y_test"):
        y = np.asarray(getattr(ds, split))
        if not (y.ndim == 1 and k == 1 or y.ndim == 2 and y.shape[1] == k):
            raise ValueError(f"Dataset {ds.name}: regression targets {split} of shape "
                             f"{y.shape} must be (n, num_classes) = (n, {k}), or (n,) with "
                             "num_classes = 1")
        if np.ndim(ds.y_train) != y.ndim:
            raise ValueError(f"Dataset {ds.name}: y_train and y_test differ in shape")
        if not np.isfinite(y).all():
            raise ValueError(f"Dataset {ds.name}: {split} holds non-finite targets")


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into train and test, keeping class proportions.

    Args:
        labels: (n,) int class labels.
        test_fraction: fraction of each class put in the test split (rounded per class; every
            class with at least 2 samples keeps at least one sample on each side).
        rng: the generator shuffling each class.

    Returns:
        (train_idx, test_idx): sorted int64 index arrays partitioning range(n).
    """
    labels = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return (np.sort(np.concatenate(train)).astype(np.int64),
            np.sort(np.concatenate(test)).astype(np.int64))


# --------------------------------------------------------------------------------------------
# digits


@register(
    "dataset",
    "digits",
    options={
        "test_fraction": Option(float, 0.25, "(0..1)", "fraction of each class held out for test"),
    },
)
def load_digits(options: dict, data_dir: pathlib.Path | None, seed: int) -> Dataset:
    """scikit-learn 8x8 digits: 1797 images, 10 classes, input (1, 8, 8), standardised."""
    table = _sklearn_digits()
    x = (table[:, :-1] / 16.0).reshape(-1, 1, 8, 8)
    y = table[:, -1].astype(np.int64)
    rng = stream(seed, dataset_purpose("digits"))
    tr, te = stratified_split(y, float(options.get("test_fraction", 0.25)), rng)
    mean, std = x[tr].mean(), x[tr].std()
    x = ((x - mean) / std).astype(np.float32)
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10, (1, 8, 8))


def _sklearn_digits() -> np.ndarray:
    """(1797, 65) float64: scikit-learn's bundled digits file (64 pixels 0..16, then the
    label), read directly: the same values as ``sklearn.datasets.load_digits``, without the
    seconds that importing scikit-learn's dataset module costs at every start."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset digits needs scikit-learn installed (its bundled digits file)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets/data/digits.csv.gz"
    try:
        with gzip.open(path, "rt") as f:
            return np.loadtxt(f, delimiter=",")
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"dataset digits: cannot read {path} ({e})") from None


# --------------------------------------------------------------------------------------------
# idx files (MNIST family)

#: idx type code (third magic byte) -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


#: Most bytes a dataset file may hold (after gunzip): EMNIST byclass's training images, the
#: largest file mmfl reads, are 547 MB; a gzip bomb or a device file stops here.
MAX_FILE_BYTES = 2**31


def read_maybe_gzipped(path: pathlib.Path, what: str) -> bytes:
    """The bytes of ``path``, gunzipped when its name ends in ``.gz``; DataError naming ``what``
    and the file when it cannot be read, is corrupt or holds more than
    :data:`MAX_FILE_BYTES`."""
    gz = path.name.endswith(".gz")
    too_big = DataError(f"cannot read {what} {path}: more than {MAX_FILE_BYTES} bytes"
                        + (" once decompressed" if gz else ""))
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            if not gz:
                st = os.fstat(f.fileno())
                if stat.S_ISREG(st.st_mode):  # else a device or FIFO: read in chunks below
                    if st.st_size > MAX_FILE_BYTES:
                        raise too_big
                    return f.read()
            chunks, total = [], 0
            while chunk := f.read(1 << 24):
                total += len(chunk)
                if total > MAX_FILE_BYTES:
                    raise too_big
                chunks.append(chunk)
            return b"".join(chunks)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {what} {path}: {e}") from None


def read_idx(path: pathlib.Path | str) -> np.ndarray:
    """Read one idx file (plain, or gzip-compressed when the name ends in ``.gz``).

    The format: two zero bytes, a type code (see :data:`IDX_DTYPES`), the number of dimensions
    D, D big-endian uint32 sizes, then the data in C order.

    Returns:
        an array of shape (d_1, ..., d_D) in native byte order.

    Raises:
        DataError: naming the file, when it cannot be read, has a bad magic number, or its
            length does not match its header (truncated or trailing bytes).
    """
    path = pathlib.Path(path)
    raw = read_maybe_gzipped(path, "idx file")
    if len(raw) < 4:
        raise DataError(f"malformed idx file {path}: only {len(raw)} bytes")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"malformed idx file {path}: bad magic number 0x{raw[:4].hex()}")
    ndim = raw[3]
    if ndim == 0:
        raise DataError(f"malformed idx file {path}: zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"malformed idx file {path}: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[raw[2]]
    expected = header + math.prod(dims) * dtype.itemsize  # exact: no int64 overflow
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(
            f"malformed idx file {path}: {what} ({len(raw)} bytes, header {dims} needs {expected})"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    data = data.astype(dtype.newbyteorder("="), copy=True)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = np.unravel_index(int(np.argmin(np.isfinite(data))), data.shape)
        raise DataError(f"malformed idx file {path}: non-finite value "
                        f"{data[bad]} at index {tuple(int(i) for i in bad)}")
    return data


def find_idx_files(
    stems: Sequence[str],
    folders: Sequence[pathlib.Path],
    *,
    dataset: str,
    hint: str,
) -> dict[str, pathlib.Path]:
    """Find a folder holding every idx file of ``stems`` (each plain or with ``.gz``).

    Folders are tried in order; the first holding all files wins. A plain file is preferred over
    its ``.gz`` twin.

    Args:
        stems: file names without ``.gz``, e.g. ``"train-images-idx3-ubyte"``.
        folders: candidate folders in search order (missing folders are skipped).
        dataset: dataset name, for the error message.
        hint: how to get the files, for the error message.

    Returns:
        stem -> path of the file found.

    Raises:
        DataError: one line naming the folders searched and ``hint`` when no folder has them all.
    """
    partial: list[str] = []
    for folder in folders:
        found: dict[str, pathlib.Path] = {}
        for stem in stems:
            for name in (stem, stem + ".gz"):
                p = folder / name
                if p.is_file():
                    found[stem] = p
                    break
        if len(found) == len(stems):
            return found
        if found:
            missing = [s for s in stems if s not in found]
            partial.append(f"{folder} lacks {', '.join(missing)}")
    searched = ", ".join(str(f) for f in folders) or "(none)"
    detail = f" ({'; '.join(partial)})" if partial else ""
    raise DataError(f"{dataset} not found; searched {searched}{detail}; {hint}")


def _data_folders(data_dir: pathlib.Path | None, subdir: str, system_dir: pathlib.Path | None):
    """Candidate folders: data_dir/subdir, data_dir, the default folder of ``mmfl data fetch``
    (``~/.cache/mmfl/data/subdir``), then the system folder.

    When ``data_dir`` is None, ``$MMFL_DATA`` is used if set.
    """
    from mmfl.tasks.fetch import default_data_dir

    if data_dir is None and os.environ.get("MMFL_DATA"):
        data_dir = pathlib.Path(os.environ["MMFL_DATA"])
    out: list[pathlib.Path] = []
    if data_dir is not None:
        data_dir = pathlib.Path(data_dir).expanduser()
        out += [data_dir / subdir, data_dir]
    out.append(default_data_dir() / subdir)
    if system_dir is not None:
        out.append(pathlib.Path(system_dir))
    return out


_CACHE: dict[tuple, Dataset] = {}
_CACHE_LOCK = threading.Lock()

#: Folder of the Debian package ``dataset-fashion-mnist`` (searched last).
FASHION_MNIST_SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_FASHION_MNIST_MEAN, _FASHION_MNIST_STD = 0.2860, 0.3530


def _load_idx_images(files: dict[str, pathlib.Path], name: str, num_classes: int,
                     mean: float, std: float) -> Dataset:
    """Build a Dataset from the four MNIST-style idx files (images scaled to [0,1], normalised)."""
    arrays = {k: read_idx(p) for k, p in files.items()}
    xs, ys = [], []
    for split in ("train", "t10k"):
        x = arrays[f"{split}-images-idx3-ubyte"]
        y = arrays[f"{split}-labels-idx1-ubyte"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{name}: {files[f'{split}-images-idx3-ubyte']} has shape {x.shape} but "
                f"{files[f'{split}-labels-idx1-ubyte']} has shape {y.shape}"
            )
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{name}: labels in {files[f'{split}-labels-idx1-ubyte']} "
                            f"outside [0, {num_classes})")
        x = ((x.astype(np.float32) / 255.0 - mean) / std)[:, None, :, :]
        xs.append(x)
        ys.append(y.astype(np.int64))
    shape = tuple(xs[0].shape[1:])
    if tuple(xs[1].shape[1:]) != shape:
        raise DataError(f"{name}: train images {shape[1:]} and test images "
                        f"{xs[1].shape[2:]} differ in size")
    return Dataset(name, xs[0], ys[0], xs[1], ys[1], num_classes, shape)


#: ``normalize`` choices of the idx-image datasets: (mean, std) applied to pixels in [0, 1]
FASHION_MNIST_NORMALIZE = {"standard": (_FASHION_MNIST_MEAN, _FASHION_MNIST_STD),
                           "half": (0.5, 0.5)}


@register("dataset", "fashion_mnist", options={
    "normalize": Option(str, "standard", "one of standard|half",
                        "pixels p in [0, 1] become (p - mean) / std: standard = the training "
                        "set's mean 0.2860 and std 0.3530; half = (p - 0.5) / 0.5 in [-1, 1], "
                        "the authors' transform"),
})
def load_fashion_mnist(options: dict, data_dir: pathlib.Path | None, seed: int) -> Dataset:
    """Fashion-MNIST (60000 + 10000 images 28x28, 10 classes) from the standard idx files, in
    the files' order."""
    folders = _data_folders(data_dir, "fashion-mnist", FASHION_MNIST_SYSTEM_DIR)
    files = find_idx_files(
        _FASHION_MNIST_STEMS, folders, dataset="fashion_mnist",
        hint="install it with `apt-get install dataset-fashion-mnist` or put the idx files in "
             "--data-dir / $MMFL_DATA",
    )
    norm = str(options.get("normalize", "standard"))
    key = ("fashion_mnist", norm, *(str(files[s].resolve()) for s in _FASHION_MNIST_STEMS))
    with _CACHE_LOCK:
        if key not in _CACHE:
            log.info("loading fashion_mnist from %s", files[_FASHION_MNIST_STEMS[0]].parent)
            _CACHE[key] = _load_idx_images(files, "fashion_mnist", 10,
                                           *FASHION_MNIST_NORMALIZE[norm])
        return _CACHE[key]


def clear_cache() -> None:
    """Forget the datasets loaded in this process (the in-process file cache)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# --------------------------------------------------------------------------------------------
# mnist1d

_MNIST1D_TEMPLATE_LEN = 32
_MNIST1D_PAD = 12
_MNIST1D_LEN = 40


def mnist1d_templates() -> np.ndarray:
    """The 10 class templates of ``mnist1d``: (10, 32) float64 smooth waveforms in about [-1, 1].

    Each is a simple shape on t in [0, 1]: one bump, two bumps, a sine period, a rising ramp, a
    falling step, a dip then a peak, two cosine periods, a tent, three bumps, a decaying wave.
    """
    t = np.linspace(0.0, 1.0, _MNIST1D_TEMPLATE_LEN)

    def bump(c, w):
        return np.exp(-0.5 * ((t - c) / w) ** 2)

    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    templates = [
        1.6 * bump(0.5, 0.12) - 0.4,                           # 0 one wide bump
        bump(0.25, 0.07) + bump(0.75, 0.07) - 0.3,             # 1 two narrow bumps
        np.sin(2 * np.pi * t),                                  # 2 one sine period
        2.0 * t - 1.0,                                          # 3 rising ramp
        1.6 * sig(-(t - 0.5) * 18.0) - 0.8,                     # 4 falling step
        -bump(0.3, 0.1) + bump(0.7, 0.1),                       # 5 dip then peak
        np.cos(4 * np.pi * t),                                  # 6 two cosine periods
        1.0 - 2.0 * np.abs(2.0 * t - 1.0),                      # 7 tent
        bump(0.2, 0.05) + bump(0.5, 0.05) + bump(0.8, 0.05) - 0.4,  # 8 three bumps
        np.exp(-3.0 * t) * np.cos(3 * np.pi * t),               # 9 decaying wave
    ]
    return np.stack(templates)


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Circular gaussian smoothing of each row of x (n, L) with std ``sigma`` samples."""
    L = x.shape[1]
    k = np.arange(L)
    k = np.minimum(k, L - k)
    kernel = np.exp(-0.5 * (k / sigma) ** 2)
    kernel /= kernel.sum()
    return np.real(np.fft.ifft(np.fft.fft(x, axis=1) * np.fft.fft(kernel)[None, :], axis=1))


def mnist1d_generate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` mnist1d examples.

    For each example: a class y uniform over 10; its template padded with zeros on both sides
    (length 32 + 2*12 = 56); a random time scale (stretch 0.75..1.25 about the centre) and
    amplitude scale (0.6..1.4); a shear (a linear ramp of slope -0.5..0.5 over the signal); a
    circular shift of -12..12 positions; smoothed (correlated) noise of std 0.2; resampling to
    length 40; iid gaussian noise of std 0.1.

    Returns:
        x: (n, 40) float64, y: (n,) int64.
    """
    templates = mnist1d_templates()
    y = rng.integers(0, 10, size=n).astype(np.int64)
    L = _MNIST1D_TEMPLATE_LEN + 2 * _MNIST1D_PAD
    padded = np.zeros((10, L))
    padded[:, _MNIST1D_PAD:_MNIST1D_PAD + _MNIST1D_TEMPLATE_LEN] = templates
    pos = np.arange(L, dtype=np.float64)
    centre = (L - 1) / 2.0
    stretch = rng.uniform(0.75, 1.25, size=n)
    amp = rng.uniform(0.6, 1.4, size=n)
    shear = rng.uniform(-0.5, 0.5, size=n)
    shift = rng.integers(-_MNIST1D_PAD, _MNIST1D_PAD + 1, size=n)
    corr = rng.standard_normal((n, L))
    iid = rng.standard_normal((n, _MNIST1D_LEN))

    x = np.empty((n, L))
    for c in range(10):
        rows = np.flatnonzero(y == c)
        src = centre + (pos[None, :] - centre) / stretch[rows, None]  # (r, L)
        x[rows] = np.interp(src, pos, padded[c])
    x *= amp[:, None]
    x += shear[:, None] * (pos[None, :] - centre) / L
    rows = np.arange(n)[:, None]
    x = x[rows, (pos[None, :].astype(np.int64) - shift[:, None]) % L]
    noise = _smooth(corr, 2.0)
    noise *= 0.2 / noise.std()
    x += noise
    grid = np.linspace(0, L - 1, _MNIST1D_LEN)
    left = np.floor(grid).astype(np.int64)
    right = np.minimum(left + 1, L - 1)
    frac = grid - left
    x = x[:, left] * (1 - frac) + x[:, right] * frac
    x += 0.1 * iid
    return x, y


def _cache_file(
    data_dir: pathlib.Path | None, sub: str, name: str, payload: dict
) -> pathlib.Path | None:
    """The .npz cache path of a generated dataset under ``data_dir/sub`` (None: no caching)."""
    if data_dir is None:
        return None
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return pathlib.Path(data_dir).expanduser() / sub / f"{name}-{digest}.npz"


#: Most examples ``mnist1d`` generates (about 3 GB of memory while generating).
MNIST1D_MAX_SAMPLES = 1_000_000


def _check_mnist1d_cache(path: pathlib.Path, arrs: dict[str, np.ndarray], n: int) -> None:
    """DataError naming the cache file unless it holds what :func:`load_mnist1d` wrote:
    float32 (n_split, 40) finite inputs and int64 labels in 0..9, n examples in all."""
    def bad(why: str) -> DataError:
        return DataError(f"mnist1d cache {path}: {why}; delete the file and mmfl regenerates it")

    for split in ("train", "test"):
        x, y = arrs[f"x_{split}"], arrs[f"y_{split}"]
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != _MNIST1D_LEN:
            raise bad(f"x_{split} holds {x.dtype} {x.shape}, expected float32 (n, "
                      f"{_MNIST1D_LEN})")
        if y.dtype != np.int64 or y.shape != (len(x),):
            raise bad(f"y_{split} holds {y.dtype} {y.shape}, expected int64 ({len(x)},)")
        if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
            raise bad(f"y_{split} holds labels outside 0..9 ({int(y.min())}..{int(y.max())})")
        if not np.isfinite(x).all():
            raise bad(f"x_{split} holds non-finite values")
    if len(arrs["y_train"]) + len(arrs["y_test"]) != n:
        raise bad(f"{len(arrs['y_train'])} + {len(arrs['y_test'])} examples, expected "
                  f"num_samples = {n}")


@register(
    "dataset",
    "mnist1d",
    options={
        "num_samples": Option(int, 5000, f"1..{MNIST1D_MAX_SAMPLES}",
                              "train + test examples generated (about 3 KB of memory each "
                              "while generating)"),
        "test_fraction": Option(float, 0.2, "(0..1)", "fraction held out for test"),
    },
)
def load_mnist1d(options: dict, data_dir: pathlib.Path | None, seed: int) -> Dataset:
    """MNIST-1D-style generated sequences: 10 classes, input (40,), deterministic in seed.

    Difficulty is close to the original MNIST-1D: with 4000 training examples a logistic
    regression reaches about 35-40% test accuracy and a 64-unit MLP about 65-75%.
    """
    n = int(options.get("num_samples", 5000))
    test_fraction = float(options.get("test_fraction", 0.2))
    payload = {"version": 1, "num_samples": n, "test_fraction": test_fraction, "seed": int(seed)}
    path = _cache_file(data_dir, "mnist1d", "mnist1d", payload)
    if path is not None and path.is_file():
        arrs = None
        try:
            with np.load(path) as z:
                arrs = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except Exception as e:  # unreadable (e.g. cut short): regenerate
            log.warning("ignoring unreadable mnist1d cache %s: %s", path, e)
        if arrs is not None:
            _check_mnist1d_cache(path, arrs, n)
            return Dataset("mnist1d", num_classes=10, input_shape=(_MNIST1D_LEN,), **arrs)
    if n > MNIST1D_MAX_SAMPLES:
        raise DataError(f"mnist1d: num_samples = {n} is more than {MNIST1D_MAX_SAMPLES}")
    rng = stream(seed, dataset_purpose("mnist1d"))
    try:
        x, y = mnist1d_generate(n, rng)
    except MemoryError:
        raise DataError(f"mnist1d: not enough memory to generate num_samples = {n} examples "
                        f"(about {n * 3 / 1e6:.1f} GB); lower dataset_options.num_samples"
                        ) from None
    tr, te = stratified_split(y, test_fraction, rng)
    mean, std = x[tr].mean(), x[tr].std()
    x = ((x - mean) / std).astype(np.float32)
    ds = Dataset("mnist1d", x[tr], y[tr], x[te], y[te], 10, (_MNIST1D_LEN,))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test,
                     y_test=ds.y_test)
            os.replace(tmp, path)
        except OSError as e:
            log.debug("not caching mnist1d in %s: %s", path.parent, e)
    return ds


# --------------------------------------------------------------------------------------------
# synthetic(alpha, beta) of FedProx

#: Most samples (num_groups x mean_samples) :func:`load_synthetic` generates (about 2.4 GB).
SYNTHETIC_MAX_SAMPLES = 10_000_000
#: normals drawn per block of devices by :func:`load_synthetic` (2**23 floats = 64 MiB)
_SYNTHETIC_BLOCK = 2**23


@register(
    "dataset",
    "synthetic",
    options={
        "alpha": Option(float, 1.0, ">= 0", "std of u_k: how much devices' models differ"),
        "beta": Option(float, 1.0, ">= 0", "std of B_k: how much devices' inputs differ"),
        "num_groups": Option(int, 30, "1..1000000", "number of devices (natural groups)"),
        "mean_samples": Option(int, 200, "1..10000000",
                               "mean samples per device (lognormal, floor 20; num_groups x "
                               "mean_samples at most 10,000,000)"),
        "test_fraction": Option(float, 0.2, "(0..1)", "fraction of each device held out"),
    },
)
def load_synthetic(options: dict, data_dir: pathlib.Path | None, seed: int) -> Dataset:
    """FedProx synthetic(alpha, beta): 60 features, 10 classes, one natural group per device.

    For device k: u_k ~ N(0, alpha^2), B_k ~ N(0, beta^2), W_k (10, 60) and b_k (10,) entries
    ~ N(u_k, 1), v_k (60,) entries ~ N(B_k, 1); x ~ N(v_k, Sigma) with Sigma diagonal,
    Sigma_jj = j^-1.2 (j = 1..60); y = argmax(W_k x + b_k). Device sizes are lognormal with mean
    ``mean_samples`` (sigma 1), at least 20. Each device's samples are split train/test; the
    test split pools all devices. ``groups`` maps each train sample to its device.
    """
    alpha = float(options.get("alpha", 1.0))
    beta = float(options.get("beta", 1.0))
    K = int(options.get("num_groups", 30))
    mean_samples = int(options.get("mean_samples", 200))
    test_fraction = float(options.get("test_fraction", 0.2))
    if K * mean_samples > SYNTHETIC_MAX_SAMPLES:
        raise DataError(f"synthetic: num_groups x mean_samples = {K} x {mean_samples} is more "
                        f"than {SYNTHETIC_MAX_SAMPLES} samples; lower dataset_options.num_groups "
                        "or mean_samples")
    dim, classes = 60, 10
    rng = stream(seed, dataset_purpose("synthetic"))
    sigma_ln = 1.0
    sizes = rng.lognormal(np.log(mean_samples) - sigma_ln**2 / 2, sigma_ln, size=K)
    sizes = np.maximum(np.round(sizes).astype(np.int64), 20)
    std_x = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
    u = rng.normal(0.0, alpha, size=K)
    B = rng.normal(0.0, beta, size=K)
    n_test = np.minimum(np.maximum(np.rint(test_fraction * sizes).astype(np.int64), 1), sizes - 1)
    n_train = sizes - n_test
    # Outputs are allocated once, in float32; the per-device normals (W, b, v, then x: the order
    # of rng.normal / rng.standard_normal calls device by device) are drawn in bulk, a block of
    # devices at a time, which consumes the stream exactly like the per-device calls.
    x_train = np.empty((int(n_train.sum()), dim), np.float32)
    x_test = np.empty((int(n_test.sum()), dim), np.float32)
    y_train = np.empty(len(x_train), np.int64)
    y_test = np.empty(len(x_test), np.int64)
    groups = np.repeat(np.arange(K, dtype=np.int64), n_train)
    per_device = classes * dim + classes + dim + sizes * dim
    tr0 = np.concatenate([[0], np.cumsum(n_train)])
    te0 = np.concatenate([[0], np.cumsum(n_test)])
    k = 0
    while k < K:
        # devices k..k_end-1 in one draw of at most ~2**23 normals (64 MiB), at least one device
        ends = np.cumsum(per_device[k:])
        k_end = k + max(1, int(np.searchsorted(ends, _SYNTHETIC_BLOCK, side="right")))
        z = rng.standard_normal(int(ends[k_end - k - 1]))
        start = np.concatenate([[0], ends[:k_end - k - 1]])  # device g's first normal in z
        block = np.arange(k, k_end)
        # devices of equal size go through one stacked matmul (the same BLAS call per device
        # as a 2-D ``x @ W.T``, so labels are bit-identical to a device-by-device loop)
        for m in np.unique(sizes[block]).tolist():
            gs = block[sizes[block] == m]
            o = start[gs - k][:, None]
            W = u[gs, None, None] + z[o + np.arange(classes * dim)].reshape(-1, classes, dim)
            o = o + classes * dim
            b = u[gs, None] + z[o + np.arange(classes)]
            o = o + classes
            v = B[gs, None] + z[o + np.arange(dim)]
            o = o + dim
            x = v[:, None, :] + std_x[None, None, :] * z[o + np.arange(m * dim)].reshape(-1, m, dim)
            y = np.argmax(np.matmul(x, W.transpose(0, 2, 1)) + b[:, None, :], axis=2)
            t = int(n_test[gs[0]])  # equal sizes, equal test counts
            rows = te0[gs][:, None] + np.arange(t)
            x_test[rows] = x[:, :t]
            y_test[rows] = y[:, :t]
            rows = tr0[gs][:, None] + np.arange(m - t)
            x_train[rows] = x[:, t:]
            y_train[rows] = y[:, t:]
        k = k_end
    return Dataset("synthetic", x_train, y_train, x_test, y_test, classes, (dim,), groups)
