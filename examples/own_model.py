"""Bring your own PyTorch model: a torchvision-style CNN with batch norm that returns logits,
trained by mmfl with Adam on the clients and FedAdam on the server, then loaded back for
inference.

The model is plain PyTorch (no log_softmax at the end); ``loss = "auto"`` (the default) sees
logits at start-up and trains it with the cross-entropy loss. Its batch-norm statistics are
averaged by the server (``buffers = "aggregate"``; ``"local"`` would keep them per client). After the run,
``mmfl.load_model`` gives the trained module back and ``mmfl.load_data`` the test split exactly
as mmfl evaluated it; ``models/<task>.safetensors`` is a plain state_dict for anyone without
mmfl.

Run:  .venv/bin/python examples/own_model.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile

import torch
from torch import nn

import mmfl


class SmallCNN(nn.Module):
    """Conv(width) - BatchNorm - ReLU - MaxPool - Linear(num_classes): returns logits."""

    def __init__(self, channels: int, side: int, num_classes: int, width: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1),
                                      nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(width * (side // 2) ** 2, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@mmfl.register("model", "small_cnn", options={"width": mmfl.Option(int, 8, "> 0", "channels")})
def small_cnn(options, input_shape, num_classes):
    channels, side, _ = input_shape
    return SmallCNN(channels, side, num_classes, options["width"])


CONFIG = {
    "name": "own-model", "seed": 0, "rounds": 8, "engine": "vectorized",
    "server": {"lr": 0.1, "optimizer": "fedadam"},
    "clients": {"count": 20, "active_rate": 0.5},
    "sampler": {"name": "random"},
    "tasks": [{"name": "digits", "dataset": "digits", "model": "small_cnn", "lr": 0.01,
               "optimizer": "adam", "batch_size": 16,
               "partition": {"kind": "dirichlet", "alpha": 1.0}}],
}


def main(out: str) -> float:
    summary = mmfl.run(mmfl.config_from_dict(CONFIG), out)
    model = mmfl.load_model(out, "digits")          # a SmallCNN with the final weights
    x, y = mmfl.load_data(out, "digits")            # the test split as mmfl evaluated it
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).double().mean())
    print(f"{type(model).__name__}: test accuracy {accuracy:.3f} "
          f"(summary.json: {summary['tasks']['digits']['accuracy']:.3f})")
    return accuracy


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="mmfl-own-model-"))
