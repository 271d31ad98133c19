"""Tests of mmfl.tasks.datasets: idx reading, the four offline loaders."""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import pytest
from testkit import idx_bytes, write_file

from mmfl import registry
from mmfl.errors import DataError
from mmfl.tasks import datasets as D

FMNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: pathlib.Path, a: np.ndarray, code: int = 0x08) -> pathlib.Path:
    return write_file(path, idx_bytes(a, code))


# ---------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "code,dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                   (0x0D, np.float32), (0x0E, np.float64)]
)
def test_read_idx_round_trip(tmp_path, suffix, code, dtype):
    rng = np.random.default_rng(0)
    a = (rng.integers(-100, 100, size=(3, 4, 5)) if np.dtype(dtype).kind != "u"
         else rng.integers(0, 256, size=(3, 4, 5))).astype(dtype)
    p = write_idx(tmp_path / f"x-idx3{suffix}", a, code)
    b = D.read_idx(p)
    assert b.shape == (3, 4, 5)
    assert b.dtype.isnative
    np.testing.assert_array_equal(b, a)


def test_read_idx_one_dim(tmp_path):
    a = np.arange(7, dtype=np.uint8)
    np.testing.assert_array_equal(D.read_idx(write_idx(tmp_path / "l", a)), a)


def test_read_idx_truncated(tmp_path):
    raw = idx_bytes(np.zeros((4, 3, 3), np.uint8), 0x08)
    p = tmp_path / "trunc-idx3-ubyte"
    p.write_bytes(raw[:-5])
    with pytest.raises(DataError, match="trunc-idx3-ubyte.*truncated"):
        D.read_idx(p)


def test_read_idx_trailing_bytes(tmp_path):
    p = tmp_path / "extra"
    p.write_bytes(idx_bytes(np.zeros((2, 2), np.uint8), 0x08) + b"xx")
    with pytest.raises(DataError, match="trailing"):
        D.read_idx(p)


@pytest.mark.parametrize("raw", [b"", b"\x00\x00", b"\x01\x00\x08\x01\x00\x00\x00\x01\x00",
                                 b"\x00\x00\x07\x01\x00\x00\x00\x01\x00",
                                 b"\x00\x00\x08\x03\x00\x00\x00\x01"])
def test_read_idx_malformed(tmp_path, raw):
    p = tmp_path / "bad-file"
    p.write_bytes(raw)
    with pytest.raises(DataError, match="bad-file"):
        D.read_idx(p)


def test_read_idx_bad_gzip(tmp_path):
    p = tmp_path / "bad.gz"
    full = gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8), 0x08))
    p.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="bad.gz"):
        D.read_idx(p)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope"):
        D.read_idx(tmp_path / "nope")


def test_find_idx_files_order_and_gz(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_bytes(b"")  # a lacks y
    (b / "x.gz").write_bytes(b"")
    (b / "y").write_bytes(b"")
    found = D.find_idx_files(["x", "y"], [tmp_path / "missing", a, b], dataset="d", hint="h")
    assert found == {"x": b / "x.gz", "y": b / "y"}
    with pytest.raises(DataError) as e:
        D.find_idx_files(["x", "z"], [a, b], dataset="thing", hint="do this")
    msg = str(e.value)
    assert "\n" not in msg and "thing" in msg and "do this" in msg and str(a) in msg


# ---------------------------------------------------------------------------------- fashion


def fake_fashion(folder: pathlib.Path, n=12, n_test=5, gz=True):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28)))
    write_idx(folder / f"train-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n))
    write_idx(folder / f"t10k-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(folder / f"t10k-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_test))


def test_fashion_missing_names_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-such-system-dir")
    monkeypatch.delenv("MMFL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        D.load_fashion_mnist({}, empty, 0)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(empty / "fashion-mnist") in msg and "no-such-system-dir" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_from_data_dir(tmp_path, monkeypatch, gz):
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "none")
    fake_fashion(tmp_path / "fashion-mnist", gz=gz)
    ds = D.load_fashion_mnist({}, tmp_path, 0)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    # cached in process: the same object comes back
    assert D.load_fashion_mnist({}, tmp_path, 1) is ds


def test_fashion_found_in_the_default_fetch_folder(tmp_path, monkeypatch):
    """`mmfl data fetch fashion_mnist` without --data-dir puts the files where the loader looks."""
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "none")
    monkeypatch.delenv("MMFL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fake_fashion(tmp_path / "cache" / "mmfl" / "data" / "fashion-mnist", n=4, n_test=2)
    ds = D.load_fashion_mnist({}, None, 0)
    assert ds.num_train == 4 and ds.num_test == 2


def test_fashion_data_dir_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "none")
    fake_fashion(tmp_path, n=3, n_test=2, gz=False)
    ds = D.load_fashion_mnist({}, tmp_path, 0)
    assert ds.num_train == 3 and ds.num_test == 2
    # normalisation: pixel/255, mean 0.2860, std 0.3530
    raw = D.read_idx(tmp_path / "train-images-idx3-ubyte")
    np.testing.assert_allclose(ds.x_train[:, 0], (raw / 255.0 - 0.2860) / 0.3530, rtol=1e-5)


def test_fashion_mismatched_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "none")
    fake_fashion(tmp_path, n=4, n_test=2, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="train-labels"):
        D.load_fashion_mnist({}, tmp_path, 0)


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_real_files(monkeypatch):
    monkeypatch.delenv("MMFL_DATA", raising=False)
    ds = D.load_fashion_mnist({}, None, 0)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 1000))
    assert abs(float(ds.x_train.mean())) < 0.01 and abs(float(ds.x_train.std()) - 1) < 0.01


# ---------------------------------------------------------------------------------- generated


def load(name, seed, data_dir=None, **opts):
    entry = registry.get("dataset", name)
    return entry.obj(registry.resolve_options(name, opts, entry.options), data_dir, seed)


def assert_same(a: D.Dataset, b: D.Dataset):
    for f in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def assert_valid(ds: D.Dataset):
    assert ds.x_train.shape == (ds.num_train, *ds.input_shape)
    assert ds.x_test.shape == (ds.num_test, *ds.input_shape)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert np.isfinite(ds.x_train).all() and np.isfinite(ds.x_test).all()
    assert ds.y_train.min() >= 0 and ds.y_train.max() < ds.num_classes


def test_registered_names():
    assert {"digits", "fashion_mnist", "mnist1d", "synthetic"} <= set(registry.names("dataset"))


def test_digits_reads_scikit_learns_file_without_importing_it():
    """The bundled file read directly holds exactly sklearn.datasets.load_digits' values, and
    loading digits does not import scikit-learn (seconds at every start)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    table = D._sklearn_digits()
    bunch = load_digits()
    np.testing.assert_array_equal(table[:, :-1], bunch.data)
    np.testing.assert_array_equal(table[:, -1].astype(int), bunch.target)
    code = ("import sys; from mmfl import registry; import mmfl.tasks.datasets; "
            "registry.get('dataset', 'digits').obj({}, None, 0); "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_digits():
    ds = load("digits", 0)
    assert_valid(ds)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.num_train + ds.num_test == 1797
    assert abs(ds.num_test - 0.25 * 1797) <= 10
    # stratified: each class ~25% in test
    frac = np.bincount(ds.y_test, minlength=10) / (
        np.bincount(ds.y_test, minlength=10) + np.bincount(ds.y_train, minlength=10))
    assert np.all(np.abs(frac - 0.25) < 0.02)
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3
    assert_same(ds, load("digits", 0))
    assert not np.array_equal(ds.y_test, load("digits", 1).y_test)
    assert load("digits", 0, test_fraction=0.5).num_test > 850


def test_mnist1d(tmp_path):
    ds = load("mnist1d", 3, num_samples=1000)
    assert_valid(ds)
    assert ds.input_shape == (40,) and ds.num_train + ds.num_test == 1000
    assert abs(ds.num_test - 200) <= 10  # stratified: rounded per class
    assert set(np.unique(ds.y_train)) == set(range(10))
    assert_same(ds, load("mnist1d", 3, num_samples=1000))
    assert not np.array_equal(ds.x_train, load("mnist1d", 4, num_samples=1000).x_train)
    # caching in data_dir gives the same arrays and writes one file
    a = load("mnist1d", 3, tmp_path, num_samples=1000)
    files = list((tmp_path / "mnist1d").glob("*.npz"))
    assert len(files) == 1
    b = load("mnist1d", 3, tmp_path, num_samples=1000)
    assert_same(a, ds)
    assert_same(b, ds)
    load("mnist1d", 5, tmp_path, num_samples=1000)
    assert len(list((tmp_path / "mnist1d").glob("*.npz"))) == 2


def test_mnist1d_unwritable_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    ds = load("mnist1d", 0, blocker, num_samples=200)  # data_dir is a file: just generate
    assert abs(ds.num_train - 160) <= 10


def test_mnist1d_learnable_not_trivial():
    """A small MLP is well above chance; a linear model is well below the MLP."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    ds = load("mnist1d", 0, num_samples=3000)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp = MLPClassifier((64,), max_iter=60, random_state=0).fit(ds.x_train, ds.y_train)
        lin = LogisticRegression(max_iter=500).fit(ds.x_train, ds.y_train)
    acc_mlp = mlp.score(ds.x_test, ds.y_test)
    acc_lin = lin.score(ds.x_test, ds.y_test)
    assert acc_mlp > 0.5
    assert acc_lin < 0.6 and acc_lin < acc_mlp - 0.1


def test_synthetic():
    ds = load("synthetic", 0, num_groups=12, mean_samples=100)
    assert_valid(ds)
    assert ds.input_shape == (60,) and ds.num_classes == 10
    assert ds.groups is not None and ds.groups.shape == (ds.num_train,)
    sizes = np.bincount(ds.groups, minlength=12)
    assert len(sizes) == 12 and sizes.min() >= 15  # floor 20 per device, 20% to test
    assert_same(ds, load("synthetic", 0, num_groups=12, mean_samples=100))
    other = load("synthetic", 1, num_groups=12, mean_samples=100)
    assert ds.num_train != other.num_train or not np.array_equal(ds.x_train, other.x_train)


def test_synthetic_heterogeneity_grows_with_alpha_beta():
    """With alpha = beta = 0 devices share the input mean distribution; with large beta not."""
    def spread(ds):
        means = np.stack([ds.x_train[ds.groups == g].mean(0) for g in np.unique(ds.groups)])
        return float(means.mean(1).std())
    iid = load("synthetic", 0, alpha=0.0, beta=0.0, num_groups=20)
    het = load("synthetic", 0, alpha=1.0, beta=3.0, num_groups=20)
    assert spread(het) > 3 * spread(iid)


def test_dataset_shape_check():
    with pytest.raises(ValueError):
        D.Dataset("x", np.zeros((3, 2), np.float32), np.zeros(3), np.zeros((1, 2)), np.zeros(1),
                  2, (3,))
