"""The vectorized engine's batched CNN path (grouped convolutions) against the sequential oracle.

Quantity skew with a batch size between the small and the large clients' sizes: clients train in
several size groups, with padded rows and clients that finish early; every client's update, step
count and loss must equal the sequential engine's within 1e-5, also with SCAFFOLD corrections
and when the activation budget cuts the groups into client chunks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmfl.engines.vectorized as vec
from mmfl.engines.batched_cnn import cnn_spec
from mmfl.engines.sequential import SequentialEngine
from mmfl.engines.vectorized import VectorizedEngine
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation
from mmfl.tasks.models import CNN, build_model

TOL = 1e-5


@pytest.fixture(scope="module")
def federation():
    cfg = config_from_dict({
        "name": "cnn", "seed": 4, "rounds": 1, "clients": {"count": 14, "active_rate": 1.0},
        "tasks": [{"name": "digits_cnn", "dataset": "digits", "model": "cnn", "lr": 0.1,
                   "local_epochs": 2, "batch_size": 24, "train_samples": 600,
                   "model_options": {"hidden": 16},
                   "partition": {"kind": "iid",
                                 "quantity_skew": {"clients": 0.7, "data": 0.15}}}]})
    return build_federation(cfg)


def _pairs(fed):
    n = fed.population.n_samples[:, 0]
    clients = np.flatnonzero(n > 0).astype(np.int64)
    return clients, np.zeros(len(clients), np.int64)


def _start(fed):
    params = SequentialEngine(fed, seed=4).init_params()
    gen = torch.Generator().manual_seed(0)
    return [p + 0.02 * torch.randn(p.shape, generator=gen) for p in params]


def _corrections(fed, clients):
    gen = torch.Generator().manual_seed(1)
    D = SequentialEngine(fed, seed=4).num_parameters()[0]
    return {0: 0.05 * torch.randn((len(clients), D), generator=gen)}


def _assert_same(a, b):
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=0, atol=TOL)
    err = float((a.updates[0] - b.updates[0]).abs().max())
    assert err <= TOL, f"max |dG| = {err}"
    assert float(a.updates[0].abs().max()) > 1e-3


def test_the_federation_needs_padding_and_groups(federation):
    n = federation.population.n_samples[:, 0]
    n = n[n > 0]
    batch = federation.tasks[0].spec.batch_size
    assert n.min() * 2 < batch < n.max()  # small clients pad, large ones take several steps
    clients, _ = _pairs(federation)
    groups = vec.client_groups(np.arange(len(clients)), n, batch, chunk=len(clients))
    assert len(groups) >= 2


def test_cnn_uses_the_grouped_convolution_path(federation):
    eng = VectorizedEngine(federation, seed=4)
    assert eng._cnn[0] is not None and eng._layers[0] is None
    assert VectorizedEngine(federation, seed=4, fast_path=False)._cnn[0] is None


def test_cnn_spec_declines_other_models():
    class MyCNN(CNN):
        pass

    shape = (1, 8, 8)
    assert cnn_spec(build_model("cnn", {"hidden": 8}, shape, 10, 0), shape) is not None
    assert cnn_spec(MyCNN(shape, 10, hidden=8), shape) is None
    assert cnn_spec(build_model("mlp", {}, shape, 10, 0), shape) is None


@pytest.mark.parametrize("round", [0, 3])
@pytest.mark.parametrize("scaffold", [False, True])
def test_matches_sequential(federation, round, scaffold):
    clients, tasks = _pairs(federation)
    params = _start(federation)
    corr = _corrections(federation, clients) if scaffold else None
    a = SequentialEngine(federation, seed=4).train(params, clients, tasks, round, corr)
    b = VectorizedEngine(federation, seed=4).train(params, clients, tasks, round, corr)
    _assert_same(a, b)
    if scaffold:  # the corrections change the result
        plain = SequentialEngine(federation, seed=4).train(params, clients, tasks, round)
        assert float((plain.updates[0] - a.updates[0]).abs().max()) > 1e-3


@pytest.mark.parametrize("scaffold", [False, True])
def test_activation_chunks_and_single_clients(federation, monkeypatch, scaffold):
    """Chunks of one or two clients (the activation budget) give the same updates, and training
    one client alone neither aliases nor modifies the global parameters."""
    clients, tasks = _pairs(federation)
    order = np.random.default_rng(2).permutation(len(clients))  # arbitrary pair order
    clients, tasks = clients[order], tasks[order]
    params = _start(federation)
    before = params[0].clone()
    corr = _corrections(federation, clients) if scaffold else None
    ref = SequentialEngine(federation, seed=4).train(params, clients, tasks, 1, corr)
    eng = VectorizedEngine(federation, seed=4)
    batch = federation.tasks[0].spec.batch_size
    monkeypatch.setattr(vec, "ACTIVATION_BUDGET", eng._cnn[0].sample_floats * batch)
    _assert_same(ref, eng.train(params, clients, tasks, 1, corr))
    one = eng.train(params, clients[:1], tasks[:1], 1,
                    None if corr is None else {0: corr[0][:1]})
    assert torch.equal(params[0], before)
    assert float((one.updates[0][0] - ref.updates[0][0]).abs().max()) <= TOL


def test_client_groups_respect_the_row_budget():
    sizes = np.array([3, 50, 7, 7, 40, 2, 9, 60, 5, 5, 5, 30])
    pairs = np.arange(len(sizes))
    for max_rows in (0, 1, 20, 64, 1000):
        groups = vec.client_groups(pairs, sizes, 16, chunk=5, max_rows=max_rows)
        assert sorted(np.concatenate(groups).tolist()) == pairs.tolist()
        for g in groups:
            rows = len(g) * int(np.minimum(sizes[g], 16).max())
            assert len(g) <= 5
            assert max_rows == 0 or rows <= max_rows or len(g) == 1
    assert len(vec.client_groups(pairs, sizes, 16, chunk=5, max_rows=20)) > len(
        vec.client_groups(pairs, sizes, 16, chunk=5))
