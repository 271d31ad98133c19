"""Fashion-MNIST for a scratch copy of the authors' MMFL code (docs/reproduction.md).

Their ``utility/preprocessing.py`` loads Fashion-MNIST through torchvision (ToTensor, then
Normalize((0.5,), (0.5,))), which does not import next to torch 2.13.0 and would download the
files. Put this module in their ``utility/`` folder and let the fashion_mnist branch use
``FashionMNISTIdx(train=True)`` / ``FashionMNISTIdx(train=False)``: the same float32 tensors
(1, 28, 28) = (p / 255 - 0.5) / 0.5 and int labels, in file order, with a ``.targets`` int64
tensor, read from the idx files of the Debian package dataset-fashion-mnist (or
``$FASHION_MNIST_DIR``). Part of mmfl, not of the authors' code.
"""
import gzip
import os

import numpy as np
import torch
from torch.utils.data import Dataset

IDX_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
_cache = {}


def _open(name):
    for cand in (name, name + ".gz"):
        p = os.path.join(IDX_DIR, cand)
        if os.path.exists(p):
            return gzip.open(p, "rb") if p.endswith(".gz") else open(p, "rb")
    raise FileNotFoundError(os.path.join(IDX_DIR, name))


def _read_idx(name):
    with _open(name) as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    assert (magic >> 8) == 0x08, "expected unsigned byte idx file"
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return arr


def _load(train):
    key = bool(train)
    if key not in _cache:
        prefix = "train" if train else "t10k"
        images = _read_idx(prefix + "-images-idx3-ubyte")
        labels = _read_idx(prefix + "-labels-idx1-ubyte")
        # ToTensor: uint8 -> float32 / 255, shape (1, 28, 28); Normalize(0.5, 0.5): (x - 0.5) / 0.5
        x = torch.from_numpy(images.copy()).to(dtype=torch.float32).div(255)
        x = x.sub(torch.tensor(0.5, dtype=torch.float32)).div(torch.tensor(0.5, dtype=torch.float32))
        x = x.unsqueeze(1).contiguous()
        y = torch.from_numpy(labels.astype(np.int64))
        _cache[key] = (x, y)
    return _cache[key]


class FashionMNISTIdx(Dataset):
    def __init__(self, train=True):
        self.data, self.targets = _load(train)
        self.train = train

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.data[index], int(self.targets[index])
