"""Register a custom dataset, model and sampler from user code, then run an experiment with them.

Nothing in mmfl is edited: the ``mmfl.register`` decorator adds components to the one registry,
and the config refers to them by name like any built-in.

Run:  .venv/bin/python examples/custom_components.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch

import mmfl
from mmfl.core.allocators import Allocator
from mmfl.core.drawing import draw, eligible_processors


@mmfl.register("dataset", "blobs", options={
    "num_samples": mmfl.Option(int, 2000, "> 0", "train + test points"),
    "spread": mmfl.Option(float, 1.0, "> 0", "cluster standard deviation"),
})
def load_blobs(options, data_dir, seed):
    """Gaussian blobs in 2-D, four classes."""
    rng = np.random.default_rng(seed)
    n = options["num_samples"]
    centers = np.array([[0, 3], [3, 0], [0, -3], [-3, 0]], dtype=np.float32)
    y = rng.integers(0, 4, size=n)
    x = (centers[y] + rng.normal(0, options["spread"], size=(n, 2))).astype(np.float32)
    cut = int(0.8 * n)
    return mmfl.Dataset("blobs", x[:cut], y[:cut].astype(np.int64), x[cut:],
                        y[cut:].astype(np.int64), num_classes=4, input_shape=(2,))


@mmfl.register("model", "tiny_mlp", options={"hidden": mmfl.Option(int, 16, "> 0", "width")})
def tiny_mlp(options, input_shape, num_classes):
    """A one-hidden-layer MLP that returns log-probabilities."""
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), options["hidden"]),
        torch.nn.ReLU(), torch.nn.Linear(options["hidden"], num_classes), torch.nn.LogSoftmax(1))


@mmfl.register("sampler", "biggest_first", options={
    "tilt": mmfl.Option(float, 1.0, ">= 0", "exponent on the client's data size"),
})
class BiggestFirst(Allocator):
    """Processors sampled with probability growing with their client's data; unbiased weights."""

    def allocate(self, state, rng):
        pop = state.population
        size = (pop.n_samples * state.eligible).astype(float) ** self.options["tilt"]
        score = size[pop.processor_client]                       # (P, S)
        score *= eligible_processors(state)[:, None]
        total = score.sum(axis=1)
        q = np.minimum(1.0, state.budget * total / max(total.sum(), 1e-12))   # (P,)
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.where(total[:, None] > 0, q[:, None] * score / total[:, None], 0.0)
        return draw(p, pop, rng)


CONFIG = {
    "name": "custom", "seed": 1, "rounds": 8,
    "clients": {"count": 20, "active_rate": 0.3, "processors": {"1": 0.5, "2": 0.5}},
    "sampler": {"name": "biggest_first", "tilt": 1.0},
    "tasks": [
        {"name": "blobs", "dataset": "blobs", "model": "tiny_mlp", "lr": 0.1,
         "partition": {"kind": "dirichlet", "alpha": 1.0}},
        {"name": "digits", "dataset": "digits", "model": "mlp", "lr": 0.1},
    ],
}


def main(out: str) -> dict:
    cfg = mmfl.config_from_dict(CONFIG)
    summary = mmfl.run(cfg, out)
    results = mmfl.read_results(out)
    rounds, acc = results.accuracy("blobs")
    print(f"blobs accuracy by round: {np.round(acc, 3).tolist()}")
    print(f"final mean accuracy {summary['mean_accuracy']:.3f}, min {summary['min_accuracy']:.3f}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="mmfl-custom-"))
