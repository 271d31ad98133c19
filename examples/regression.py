"""Regression with your own model: scikit-learn's diabetes data (442 patients, 10 features, a
real-valued disease-progression target), split over 10 clients and trained with the mean
squared error.

A regression dataset is an ``mmfl.Dataset(..., regression=True)`` whose targets are floats of
shape (n,) or (n, k), ``num_classes`` being k; its model returns (batch,) or (batch, k)
predictions. ``loss = "auto"`` picks ``"mse"`` for it. Every evaluated round reports the test
MSE as the task's ``loss`` and the coefficient of determination R^2 = 1 - SSE / SST as its
``accuracy`` (1 = perfect, 0 = no better than predicting the test mean). Label-free partitions
only (``iid``, ``natural``); class masking does not apply.

Run:  .venv/bin/python examples/regression.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch
from torch import nn

import mmfl


@mmfl.register("dataset", "diabetes", options={
    "test_fraction": mmfl.Option(float, 0.25, "(0..1)", "fraction held out for test")})
def load_diabetes(options, data_dir, seed):
    """scikit-learn's diabetes data, inputs and target standardised with the training split's
    mean and standard deviation."""
    from sklearn.datasets import load_diabetes as sklearn_diabetes

    x, y = sklearn_diabetes(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(round(len(y) * (1 - options["test_fraction"])))
    tr, te = order[:cut], order[cut:]
    mx, sx = x[tr].mean(0), x[tr].std(0)
    my, sy = y[tr].mean(), y[tr].std()
    x, y = (x - mx) / sx, (y - my) / sy
    return mmfl.Dataset("diabetes", x[tr], y[tr], x[te], y[te], num_classes=1,
                        input_shape=(x.shape[1],), regression=True)


class Regressor(nn.Module):
    """Linear(d, hidden) - ReLU - Linear(hidden, 1): one prediction per sample, shape (B,)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.body(x).squeeze(-1)


@mmfl.register("model", "regressor", options={"hidden": mmfl.Option(int, 32, "> 0", "width")})
def regressor(options, input_shape, num_classes):
    return Regressor(int(np.prod(input_shape)), options["hidden"])


CONFIG = {
    "name": "regression", "seed": 0, "rounds": 15, "engine": "vectorized",
    "clients": {"count": 10, "active_rate": 0.5},
    "sampler": {"name": "random"},
    "tasks": [{"name": "diabetes", "dataset": "diabetes", "model": "regressor", "loss": "mse",
               "lr": 0.01, "optimizer": "adam", "batch_size": 16, "local_epochs": 2}],
}


def main(out: str) -> float:
    summary = mmfl.run(mmfl.config_from_dict(CONFIG), out)
    model = mmfl.load_model(out, "diabetes")        # the Regressor with the final weights
    x, y = mmfl.load_data(out, "diabetes")          # float32 targets, as mmfl evaluated them
    with torch.no_grad():
        sse = float((model(x).double() - y.double()).square().sum())
    r2 = 1 - sse / float((y.double() - y.double().mean()).square().sum())
    task = summary["tasks"]["diabetes"]
    print(f"test MSE {sse / len(y):.4f} (summary.json loss {task['loss']:.4f}), "
          f"R^2 {r2:.4f} (summary.json accuracy {task['accuracy']:.4f})")
    return r2


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="mmfl-regression-"))
