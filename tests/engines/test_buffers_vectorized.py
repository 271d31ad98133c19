"""Batch norm on the vectorized engine's generic path: clients of equal data size train
together, each carrying its own running statistics, and match the sequential oracle (updates,
buffers, steps, losses) with one-sample batches skipped, for both ``buffers`` modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mmfl
from mmfl.engines.sequential import SequentialEngine
from mmfl.engines.vectorized import VectorizedEngine, equal_size_groups
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation

from test_buffers import BNNet  # Linear - BatchNorm1d - ReLU - Linear, logits


class BNConv(nn.Module):
    def __init__(self, c, side, k):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(4 * side * side, k))

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module", autouse=True)
def registered():
    mmfl.register("model", "bn_mlp_vec_test")(lambda o, s, k: BNNet(int(np.prod(s)), k))
    mmfl.register("model", "bn_conv_vec_test")(lambda o, s, k: BNConv(s[0], s[1], k))


def _fed(model, buffers="aggregate", optimizer="sgd", batch=16, options=None):
    task = {"name": "d", "dataset": "digits", "model": model, "lr": 0.05, "batch_size": batch,
            "local_epochs": 2, "buffers": buffers, "optimizer": optimizer,
            "partition": {"kind": "iid"}}
    if options:
        task["optimizer_options"] = options
    return build_federation(config_from_dict({
        "name": "bnv", "seed": 0, "rounds": 2, "clients": {"count": 8, "active_rate": 1.0},
        "tasks": [task]}))


def _batch_with_a_one_sample_tail(fed) -> int:
    """A batch size under which some clients' last batch of an epoch holds one sample."""
    sizes = fed.population.n_samples[:, 0]
    return next(b for b in range(9, 40) if (sizes % b == 1).any() and (sizes % b != 1).any())


def _compare(fed, fast_path=True, rounds=1, tol=1e-6):
    seq, vec = SequentialEngine(fed, seed=0), VectorizedEngine(fed, seed=0, fast_path=fast_path)
    assert not vec._one_by_one[0]  # the batched path, not the sequential loop
    clients = np.arange(8)
    tasks = np.zeros(8, np.int64)
    for t in range(rounds):
        a = seq.train(seq.init_params(), clients, tasks, t)
        b = vec.train(vec.init_params(), clients, tasks, t)
        assert np.array_equal(a.steps, b.steps)
        assert float((a.updates[0] - b.updates[0]).abs().max()) < tol
        # running variances reach a few units: float32 rounding, relative
        assert torch.allclose(a.buffers[0], b.buffers[0], rtol=1e-5, atol=tol)
        assert np.allclose(a.train_loss, b.train_loss, atol=tol)
        seq.absorb_buffers(a)
        vec.absorb_buffers(b)
    return a


@pytest.mark.parametrize("mode", ["aggregate", "local"])
@pytest.mark.parametrize("options", [None, {"momentum": 0.9, "weight_decay": 1e-3}])
def test_batch_norm_mlp_trains_batched_like_the_oracle(mode, options):
    probe = _fed("bn_mlp_vec_test")
    batch = _batch_with_a_one_sample_tail(probe)
    fed = _fed("bn_mlp_vec_test", mode, batch=batch, options=options)
    out = _compare(fed, rounds=2)
    sizes = fed.population.n_samples[:, 0]
    full = 2 * -(-sizes // batch)  # steps without the one-sample batches
    assert np.array_equal(out.steps, full - 2 * (sizes % batch == 1))
    assert (out.steps < full).any()  # some clients skipped a one-sample batch


def test_batch_norm_conv_model_trains_batched_on_the_generic_path():
    _compare(_fed("bn_conv_vec_test", batch=24), fast_path=False, tol=1e-5)


def test_adaptive_optimizers_keep_the_one_at_a_time_loop():
    eng = VectorizedEngine(_fed("bn_mlp_vec_test", optimizer="adam"), seed=0)
    assert eng._one_by_one[0]


def test_equal_size_groups():
    pairs = np.arange(7)
    sizes = np.array([5, 3, 5, 5, 3, 9, 5])
    groups = equal_size_groups(pairs, sizes, batch_size=4, chunk=3, max_rows=0)
    assert [g.tolist() for g in groups] == [[5], [0, 2, 3], [6], [1, 4]]
    # max_rows = 8 with batch rows min(5, 4) = 4: at most 2 clients per group
    groups = equal_size_groups(pairs, sizes, batch_size=4, chunk=3, max_rows=8)
    assert [g.tolist() for g in groups] == [[5], [0, 2], [3, 6], [1, 4]]
