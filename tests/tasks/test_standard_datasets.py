"""Tests of mmfl.tasks.standard_datasets on small files written in the real formats."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from testkit import idx_bytes, write_file

from mmfl import registry
from mmfl.errors import ConfigError, DataError
from mmfl.rng import stream
from mmfl.tasks import standard_datasets as SD

pytestmark = pytest.mark.usefixtures("isolated_data_dirs")
from mmfl.tasks.partition import partition

MNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")



# ---------------------------------------------------------------------------- file writers




def write_mnist(folder: pathlib.Path, n=12, n_test=5, classes=10, gz=True, seed=1):
    """The 4 MNIST idx files with random pixels; returns the raw uint8 arrays."""
    rng = np.random.default_rng(seed)
    sfx = ".gz" if gz else ""
    arrays = {
        MNIST_STEMS[0]: rng.integers(0, 256, (n, 28, 28)).astype(np.uint8),
        MNIST_STEMS[1]: rng.integers(0, classes, n).astype(np.uint8),
        MNIST_STEMS[2]: rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
        MNIST_STEMS[3]: rng.integers(0, classes, n_test).astype(np.uint8),
    }
    for stem, a in arrays.items():
        write_file(folder / (stem + sfx), idx_bytes(a))
    return arrays


def emnist_stems(split):
    return [f"emnist-{split}-{part}-{kind}-ubyte" for part in ("train", "test")
            for kind in ("images-idx3", "labels-idx1")]


def write_emnist(folder: pathlib.Path, split: str, images: np.ndarray, labels: np.ndarray,
                 test_images: np.ndarray, test_labels: np.ndarray, gz=True):
    """EMNIST files of ``split`` from **upright** images (stored transposed, as NIST does)."""
    sfx = ".gz" if gz else ""
    st = emnist_stems(split)
    write_file(folder / (st[0] + sfx), idx_bytes(np.ascontiguousarray(images.transpose(0, 2, 1))))
    write_file(folder / (st[1] + sfx), idx_bytes(labels.astype(np.uint8)))
    write_file(folder / (st[2] + sfx),
               idx_bytes(np.ascontiguousarray(test_images.transpose(0, 2, 1))))
    write_file(folder / (st[3] + sfx), idx_bytes(test_labels.astype(np.uint8)))


def cifar_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    """CIFAR-10 binary records: label byte + 3072 channel-major pixel bytes."""
    rec = np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(y), -1).astype(np.uint8)],
                         axis=1)
    return rec.tobytes()


def write_cifar(folder: pathlib.Path, per_batch=3, n_test=4, seed=2):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3, 32, 32)).astype(np.uint8)
        y = rng.integers(0, 10, per_batch)
        (folder / f"data_batch_{i}.bin").write_bytes(cifar_bytes(x, y))
        xs.append(x)
        ys.append(y)
    xt = rng.integers(0, 256, (n_test, 3, 32, 32)).astype(np.uint8)
    yt = rng.integers(0, 10, n_test)
    (folder / "test_batch.bin").write_bytes(cifar_bytes(xt, yt))
    return np.concatenate(xs), np.concatenate(ys), xt, yt


def leaf_json(users: dict[str, tuple[list[str], list[str]]]) -> dict:
    return {"users": list(users), "num_samples": [len(v[1]) for v in users.values()],
            "hierarchies": [], "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()}}


def write_leaf(base: pathlib.Path, train: dict, test: dict, files: int = 1):
    """LEAF train/test folders under ``base``; users spread over ``files`` JSON files."""
    for split, users in (("train", train), ("test", test)):
        (base / split).mkdir(parents=True, exist_ok=True)
        names = list(users)
        for k in range(files):
            part = {u: users[u] for u in names[k::files]}
            (base / split / f"all_data_{k}_niid_0_keep_0_{split}_9.json").write_text(
                json.dumps(leaf_json(part)), encoding="utf-8")


def text_samples(text: str, n: int, L: int = 80, start: int = 0):
    """n (x, y) windows of ``text``: x = L characters, y = the next one."""
    xs = [text[start + i:start + i + L] for i in range(n)]
    ys = [text[start + i + L] for i in range(n)]
    return xs, ys


PLAY = ("ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet "
        "is the sun. Arise, fair sun, and kill the envious moon, who is already sick and pale "
        "with grief, that thou her maid art far more fair than she: be not her maid, since she "
        "is envious; her vestal livery is but sick and green, and none but fools do wear it. ")


def leaf_users(n_users=5, seed=0, test_per_user=2):
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for u in range(n_users):
        n = int(rng.integers(2, 7))
        s = int(rng.integers(0, 100))
        name = f"THE_PLAY_ROLE{u:02d}"
        train[name] = text_samples(PLAY, n, start=s)
        test[name] = text_samples(PLAY, test_per_user, start=s + 50)
    return train, test


# ---------------------------------------------------------------------------- registry


def test_registered_with_options():
    names = registry.names("dataset")
    for n in ("mnist", "emnist", "cifar10", "shakespeare"):
        assert n in names
    assert registry.get("dataset", "emnist").options["split"].default == "balanced"
    opts = registry.get("dataset", "shakespeare").options
    assert opts["max_users"].default == 0 and opts["seq_len"].default == 80
    with pytest.raises(ConfigError, match="split"):
        registry.resolve_options("tasks[0].dataset_options", {"split": "nope"},
                                 registry.get("dataset", "emnist").options)


# ---------------------------------------------------------------------------- mnist


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["mnist", ".", "MNIST/raw"])
def test_mnist_loads_and_normalises(tmp_path, gz, layout):
    raw = write_mnist(tmp_path / layout, gz=gz)
    ds = registry.get("dataset", "mnist").obj({}, tmp_path, 0)
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.groups is None
    expect = (raw[MNIST_STEMS[0]] / 255.0 - SD.MNIST_MEAN) / SD.MNIST_STD
    np.testing.assert_allclose(ds.x_train[:, 0], expect, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ds.y_train, raw[MNIST_STEMS[1]])
    np.testing.assert_array_equal(ds.y_test, raw[MNIST_STEMS[3]])
    assert ds.y_train.min() >= 0 and ds.y_train.max() < 10


def test_mnist_env_and_default_folders(tmp_path, monkeypatch):
    write_mnist(tmp_path / "env" / "mnist")
    monkeypatch.setenv("MMFL_DATA", str(tmp_path / "env"))
    assert SD.load_mnist({}, None, 0).num_train == 12
    SD.clear_cache()
    monkeypatch.delenv("MMFL_DATA")
    write_mnist(tmp_path / "xdg-cache" / "mmfl" / "data" / "mnist", n=7)
    assert SD.load_mnist({}, None, 0).num_train == 7  # the default (fetch) folder


def test_mnist_deterministic_and_cached(tmp_path):
    write_mnist(tmp_path / "mnist")
    a = SD.load_mnist({}, tmp_path, 0)
    assert SD.load_mnist({}, tmp_path, 5) is a  # same files: the cached object
    SD.clear_cache()
    b = SD.load_mnist({}, tmp_path, 0)
    assert b is not a
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_mnist_missing_names_folders_and_fetch(tmp_path):
    (tmp_path / "mnist").mkdir()
    write_file(tmp_path / "mnist" / "train-images-idx3-ubyte", idx_bytes(np.zeros((1, 28, 28),
                                                                                np.uint8)))
    with pytest.raises(DataError) as e:
        SD.load_mnist({}, tmp_path, 0)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "mnist") in msg and "lacks" in msg
    assert "mmfl data fetch mnist" in msg and "t10k-labels-idx1-ubyte" in msg


def test_mnist_truncated_and_bad_labels(tmp_path):
    raw = write_mnist(tmp_path / "mnist", gz=False)
    p = tmp_path / "mnist" / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        SD.load_mnist({}, tmp_path, 0)
    write_mnist(tmp_path / "mnist", gz=False)
    bad = raw[MNIST_STEMS[1]].copy()
    bad[0] = 10
    write_file(tmp_path / "mnist" / "train-labels-idx1-ubyte", idx_bytes(bad))
    with pytest.raises(DataError, match="labels.*outside"):
        SD.load_mnist({}, tmp_path, 0)
    write_file(tmp_path / "mnist" / "train-labels-idx1-ubyte", idx_bytes(bad[:-1] % 10))
    with pytest.raises(DataError, match="shape"):
        SD.load_mnist({}, tmp_path, 0)


# ---------------------------------------------------------------------------- emnist


def letter_L(size=28) -> np.ndarray:
    """An upright, asymmetric "L": a vertical bar on the left, a foot on the bottom."""
    img = np.zeros((size, size), np.uint8)
    img[4:24, 6:9] = 255   # vertical stroke, left
    img[21:24, 6:20] = 200  # foot, bottom
    return img


def test_emnist_turns_images_upright(tmp_path):
    up = letter_L()
    imgs = np.stack([up, np.rot90(up).copy(), up[::-1].copy()])
    write_emnist(tmp_path / "emnist", "balanced", imgs, np.array([3, 46, 0]), up[None],
                 np.array([5]))
    ds = SD.load_emnist({"split": "balanced"}, tmp_path, 0)
    assert ds.num_classes == 47 and ds.input_shape == (1, 28, 28)
    for k in range(3):
        # the loaded image is an increasing function of the upright pixels (normalised)
        x = ds.x_train[k, 0]
        order = np.argsort(imgs[k].ravel(), kind="stable")
        assert np.all(np.diff(x.ravel()[order]) >= -1e-6)
        assert (x > x.min()).sum() == (imgs[k] > 0).sum()
        np.testing.assert_array_equal(x > x.min(), imgs[k] > 0)
    # the vertical stroke is on the left, the foot at the bottom
    x = ds.x_train[0, 0]
    assert x[10, 7] > x[10, 20] and x[22, 15] > x[2, 15]
    np.testing.assert_array_equal(ds.x_test[0, 0] > ds.x_test.min(), up > 0)
    np.testing.assert_array_equal(ds.y_train, [3, 46, 0])


def test_emnist_normalised_with_train_statistics(tmp_path):
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (20, 28, 28)).astype(np.uint8)
    write_emnist(tmp_path, "digits", imgs, rng.integers(0, 10, 20), imgs[:3],
                 rng.integers(0, 10, 3), gz=False)
    ds = SD.load_emnist({"split": "digits"}, tmp_path, 0)
    assert ds.num_classes == 10
    assert abs(float(ds.x_train.mean())) < 1e-4
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-4
    mean, std = imgs.mean() / 255.0, (imgs / 255.0).std()
    # write_emnist stored the upright images transposed; the loader undid that
    np.testing.assert_allclose(ds.x_test[:, 0], (imgs[:3] / 255.0 - mean) / std, atol=1e-4)


def test_emnist_letters_labels_shifted(tmp_path):
    imgs = np.zeros((3, 28, 28), np.uint8)
    imgs[:, 0, 0] = [0, 100, 200]
    write_emnist(tmp_path / "emnist", "letters", imgs, np.array([1, 26, 13]), imgs[:1],
                 np.array([2]))
    ds = SD.load_emnist({"split": "letters"}, tmp_path, 0)
    assert ds.num_classes == 26
    np.testing.assert_array_equal(ds.y_train, [0, 25, 12])
    np.testing.assert_array_equal(ds.y_test, [1])
    write_emnist(tmp_path / "emnist", "letters", imgs, np.array([0, 1, 2]), imgs[:1],
                 np.array([2]))
    SD.clear_cache()
    with pytest.raises(DataError, match="outside"):
        SD.load_emnist({"split": "letters"}, tmp_path, 0)


def test_emnist_split_files_missing(tmp_path):
    imgs = np.zeros((2, 28, 28), np.uint8)
    write_emnist(tmp_path / "emnist", "digits", imgs, np.array([1, 2]), imgs, np.array([1, 2]))
    with pytest.raises(DataError) as e:
        SD.load_emnist({"split": "byclass"}, tmp_path, 0)
    msg = str(e.value)
    assert "emnist" in msg and "byclass" in msg and "mmfl data fetch emnist" in msg
    assert str(tmp_path / "emnist") in msg
    with pytest.raises(DataError, match="unknown split"):
        SD.load_emnist({"split": "klingon"}, tmp_path, 0)


# ---------------------------------------------------------------------------- cifar10


@pytest.mark.parametrize("layout", ["cifar10/cifar-10-batches-bin", "cifar-10-batches-bin",
                                    "cifar10", "."])
def test_cifar10_layouts_and_channels(tmp_path, layout):
    x, y, xt, yt = write_cifar(tmp_path / layout)
    ds = SD.load_cifar10({}, tmp_path, 0)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.y_train, y)
    np.testing.assert_array_equal(ds.y_test, yt)
    for c in range(3):
        expect = (x[:, c] / 255.0 - SD.CIFAR10_MEAN[c]) / SD.CIFAR10_STD[c]
        np.testing.assert_allclose(ds.x_train[:, c], expect, atol=1e-5)
    np.testing.assert_allclose(ds.x_test[:, 2], (xt[:, 2] / 255.0 - SD.CIFAR10_MEAN[2])
                               / SD.CIFAR10_STD[2], atol=1e-5)


def test_cifar_record_layout(tmp_path):
    """The 3072 bytes are R plane, G plane, B plane, each row-major."""
    x = np.zeros((1, 3, 32, 32), np.uint8)
    x[0, 0, 0, 1] = 10   # red, row 0, column 1
    x[0, 1, 31, 0] = 20  # green, last row, first column
    x[0, 2, 5, 7] = 30   # blue
    raw = bytearray(cifar_bytes(x, np.array([7])))
    assert raw[0] == 7 and raw[1 + 1] == 10 and raw[1 + 1024 + 31 * 32] == 20
    assert raw[1 + 2048 + 5 * 32 + 7] == 30
    p = tmp_path / "b.bin"
    p.write_bytes(bytes(raw))
    xb, yb = SD.read_cifar_batch(p)
    np.testing.assert_array_equal(xb, x)
    np.testing.assert_array_equal(yb, [7])


def test_cifar10_truncated_bad_label_missing(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    write_cifar(folder)
    p = folder / "data_batch_3.bin"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(DataError, match="data_batch_3.bin.*3073"):
        SD.load_cifar10({}, tmp_path, 0)
    (folder / "data_batch_3.bin").write_bytes(b"")
    with pytest.raises(DataError, match="data_batch_3.bin"):
        SD.load_cifar10({}, tmp_path, 0)
    x = np.zeros((2, 3, 32, 32), np.uint8)
    (folder / "data_batch_3.bin").write_bytes(cifar_bytes(x, np.array([1, 11])))
    with pytest.raises(DataError, match="label 11"):
        SD.load_cifar10({}, tmp_path, 0)
    (folder / "test_batch.bin").unlink()
    with pytest.raises(DataError) as e:
        SD.load_cifar10({}, tmp_path, 0)
    msg = str(e.value)
    assert "test_batch.bin" in msg and str(folder) in msg and "mmfl data fetch cifar10" in msg
    assert "pickle" in msg


def test_cifar10_gz_batches(tmp_path):
    x, y, _, _ = write_cifar(tmp_path / "raw")
    for p in sorted((tmp_path / "raw").iterdir()):
        write_file(tmp_path / "cifar10" / (p.name + ".gz"), p.read_bytes())
    ds = SD.load_cifar10({}, tmp_path / "cifar10", 0)
    np.testing.assert_array_equal(ds.y_train, y)


# ---------------------------------------------------------------------------- shakespeare


def test_vocabulary():
    v = SD.SHAKESPEARE_VOCAB
    assert len(v) == 80 and len(set(v)) == 80 and SD.SHAKESPEARE_UNKNOWN == 80
    assert v[0] == "\n" and v[1] == " " and "a" in v and "Z" in v and "}" in v
    np.testing.assert_array_equal(SD.encode_chars(v), np.arange(80))
    np.testing.assert_array_equal(SD.encode_chars("a~é\x00A"),
                                  [v.index("a"), 80, 80, 80, v.index("A")])


def test_encode_sequences_pad_and_cut():
    out = SD.encode_sequences(["abc", "abcdef", "", "xyz"], 4)
    a, b, c, d = (SD.SHAKESPEARE_VOCAB.index(ch) for ch in "abcd")
    U = SD.SHAKESPEARE_UNKNOWN
    np.testing.assert_array_equal(out[0], [U, a, b, c])
    np.testing.assert_array_equal(out[1], [c, d, SD.SHAKESPEARE_VOCAB.index("e"),
                                           SD.SHAKESPEARE_VOCAB.index("f")])
    np.testing.assert_array_equal(out[2], [U] * 4)
    assert SD.encode_sequences([], 5).shape == (0, 5)
    np.testing.assert_array_equal(SD.encode_sequences(["abcd", "dcba"], 4), [[a, b, c, d],
                                                                               [d, c, b, a]])


@pytest.mark.parametrize("sub", ["shakespeare", "shakespeare/data"])
def test_shakespeare_loads(tmp_path, sub):
    train, test = leaf_users(5)
    write_leaf(tmp_path / sub, train, test, files=2)
    ds = SD.load_shakespeare({"max_users": 0, "seq_len": 80}, tmp_path, 0)
    n = sum(len(y) for _, y in train.values())
    assert ds.name == "shakespeare" and ds.num_classes == 80 and ds.input_shape == (80,)
    assert ds.x_train.shape == (n, 80) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (10, 80)
    assert ds.y_train.min() >= 0 and ds.y_train.max() < 80
    # exact integer indices, users sorted by name, samples in file order
    users = sorted(train)
    xs = [s for u in users for s in train[u][0]]
    ys = "".join(c for u in users for c in train[u][1])
    np.testing.assert_array_equal(ds.x_train, SD.encode_sequences(xs, 80).astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, SD.encode_chars(ys))
    np.testing.assert_array_equal(ds.groups, np.repeat(np.arange(5),
                                                       [len(train[u][1]) for u in users]))
    assert np.array_equal(ds.x_train, np.round(ds.x_train))


def test_shakespeare_seq_len_and_unknown(tmp_path):
    train = {"A": (["hello world~", "ab"], ["!", "c"]), "B": (["xyz"], ["\u00e9"])}
    test = {"A": (["hi"], ["."]), "B": (["q"], ["r"])}
    write_leaf(tmp_path / "shakespeare", train, test)
    ds = SD.load_shakespeare({"max_users": 0, "seq_len": 5}, tmp_path, 0)
    V, U = SD.SHAKESPEARE_VOCAB, SD.SHAKESPEARE_UNKNOWN
    # "é" is no class: B's only training sample is dropped
    assert ds.num_train == 2 and ds.input_shape == (5,)
    np.testing.assert_array_equal(ds.x_train[0], [V.index(c) for c in "orld"] + [U])
    np.testing.assert_array_equal(ds.x_train[1], [U, U, U, V.index("a"), V.index("b")])
    np.testing.assert_array_equal(ds.y_train, [V.index("!"), V.index("c")])
    np.testing.assert_array_equal(ds.groups, [0, 0])
    assert ds.num_test == 2


def test_shakespeare_max_users_deterministic(tmp_path):
    train, test = leaf_users(12, seed=3)
    write_leaf(tmp_path / "shakespeare", train, test)
    a = SD.load_shakespeare({"max_users": 4, "seq_len": 80}, tmp_path, 7)
    SD.clear_cache()
    b = SD.load_shakespeare({"max_users": 4, "seq_len": 80}, tmp_path, 7)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.groups, b.groups)
    assert len(np.unique(a.groups)) == 4 and a.num_test == 8  # 2 test samples per kept user
    users = sorted(train)
    pick = np.sort(stream(7, "dataset:shakespeare").choice(12, 4, replace=False))
    kept = [users[i] for i in pick]
    assert a.num_train == sum(len(train[u][1]) for u in kept)
    others = [SD.load_shakespeare({"max_users": 4, "seq_len": 80}, tmp_path, s).num_train
              for s in range(8)]
    assert len(set(others)) > 1  # the seed picks the users
    full = SD.load_shakespeare({"max_users": 0, "seq_len": 80}, tmp_path, 7)
    assert full.num_train == sum(len(v[1]) for v in train.values()) and full.num_test == 24


def test_shakespeare_natural_partition(tmp_path):
    train, test = leaf_users(9, seed=5)
    write_leaf(tmp_path / "shakespeare", train, test)
    ds = SD.load_shakespeare({"max_users": 0, "seq_len": 80}, tmp_path, 0)
    for h in (9, 4):
        parts = partition(ds.y_train, np.arange(h), "natural", {}, ds.num_classes,
                          np.random.default_rng(0), groups=ds.groups)
        assert sorted(np.concatenate(parts).tolist()) == list(range(ds.num_train))
        owners = {}
        for j, p in enumerate(parts):
            assert len(p)
            for g in np.unique(ds.groups[p]):
                assert g not in owners  # a role belongs to a single client
                owners[g] = j
        if h == 9:
            assert all(len(np.unique(ds.groups[p])) == 1 for p in parts)


def test_shakespeare_missing_and_malformed(tmp_path):
    with pytest.raises(DataError) as e:
        SD.load_shakespeare({}, tmp_path, 0)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "shakespeare") in msg and "LEAF" in msg
    assert "train/*.json" in msg and "preprocess.sh" in msg
    train, test = leaf_users(2)
    write_leaf(tmp_path / "shakespeare", train, test)
    bad = tmp_path / "shakespeare" / "train" / "zz.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="zz.json"):
        SD.load_shakespeare({}, tmp_path, 0)
    bad.write_text(json.dumps({"users": ["u"], "user_data": {"u": {"x": ["ab"], "y": []}}}),
                   encoding="utf-8")
    with pytest.raises(DataError, match="equal length"):
        SD.load_shakespeare({}, tmp_path, 0)
    bad.write_text(json.dumps({"users": ["u"], "user_data": {"u": {"x": ["ab"], "y": ["cd"]}}}),
                   encoding="utf-8")
    with pytest.raises(DataError, match="single characters"):
        SD.load_shakespeare({}, tmp_path, 0)
    bad.write_text(json.dumps([1, 2]), encoding="utf-8")
    with pytest.raises(DataError, match="user_data"):
        SD.load_shakespeare({}, tmp_path, 0)


def test_shakespeare_user_split_needs_sample_split(tmp_path):
    train, _ = leaf_users(4)
    test = {"OTHER_ROLE": text_samples(PLAY, 2)}
    write_leaf(tmp_path / "shakespeare", train, test)
    assert SD.load_shakespeare({"max_users": 0}, tmp_path, 0).num_test == 2
    with pytest.raises(DataError, match="-t sample"):
        SD.load_shakespeare({"max_users": 2}, tmp_path, 0)
