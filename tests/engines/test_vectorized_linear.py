"""The vectorized engine's batched-matmul path (logreg / MLP): bit-exact invariances.

The clients of a task train independently, so neither the order in which the caller lists the
pairs (which decides whether the updates are written straight into the output or gathered into
it) nor the engine's reused scratch buffers (kept between calls, shared by the tasks) may change
a single bit of the results.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmfl.engines.vectorized as vec
from mmfl.engines.vectorized import VectorizedEngine
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation


def _federation(partition, clients=10):
    tasks = [
        {"name": "digits_mlp", "dataset": "digits", "model": "mlp", "lr": 0.1,
         "local_epochs": 2, "batch_size": 8, "partition": partition,
         "model_options": {"hidden": 24, "layers": 2}},
        {"name": "wave_logreg", "dataset": "mnist1d", "model": "logreg", "lr": 0.2,
         "local_epochs": 2, "batch_size": 10, "partition": partition,
         "dataset_options": {"num_samples": 900}},
    ]
    cfg = config_from_dict({"name": "linear", "seed": 5, "rounds": 1,
                            "clients": {"count": clients, "active_rate": 1.0},
                            "sampler": {"name": "full"}, "tasks": tasks})
    return build_federation(cfg)


@pytest.fixture(scope="module", params=["iid", "dirichlet"])
def federation(request):
    part = {"kind": "iid"} if request.param == "iid" else {"kind": "dirichlet", "alpha": 0.3}
    return _federation(part)


def _pairs(fed):
    n = fed.population.n_samples
    tasks, clients = np.nonzero(n.T > 0)
    return clients.astype(np.int64), tasks.astype(np.int64)


def _corrections(eng, tasks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dims = eng.num_parameters()
    return {s: 0.05 * torch.randn((int((tasks == s).sum()), dims[s]), generator=gen)
            for s in np.unique(tasks).tolist()}


def _assert_same(a, b):
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_array_equal(a.train_loss, b.train_loss)
    assert a.updates.keys() == b.updates.keys()
    for s in a.updates:
        assert torch.equal(a.updates[s], b.updates[s]), s


def test_fast_path_and_step_counts(federation, request):
    eng = VectorizedEngine(federation, seed=1)
    assert all(layers is not None for layers in eng._layers)
    clients, tasks = _pairs(federation)
    out = eng.train(eng.init_params(), clients, tasks, 0)
    for s in range(2):
        steps = out.steps[tasks == s]
        if request.node.callspec.params["federation"] == "iid":
            # equal step counts: one group per task, updates written straight into the output
            assert len(set(steps.tolist())) == 1
        else:
            assert len(set(steps.tolist())) > 1


@pytest.mark.parametrize("with_corrections", [False, True])
@pytest.mark.parametrize("budget", [None, "chunks"])
def test_pair_order_changes_no_bit(federation, monkeypatch, with_corrections, budget):
    eng = VectorizedEngine(federation, seed=3)
    params = eng.init_params()
    if budget == "chunks":  # several client groups per task (rows scattered into the output)
        monkeypatch.setattr(vec, "STACK_BUDGET", 2 * max(p.numel() for p in params) * 3)
    clients, tasks = _pairs(federation)
    perm = np.random.default_rng(0).permutation(len(clients))
    corr = _corrections(eng, tasks) if with_corrections else None
    ref = eng.train(params, clients, tasks, 2, corrections=corr)
    # the same pairs, listed in another order (with their corrections in that order)
    corr_p = None
    if corr is not None:
        corr_p = {}
        for s in corr:
            sel = np.flatnonzero(tasks == s)  # pair positions of task s, in ref's order
            pos = {int(p): k for k, p in enumerate(sel)}
            rows = [pos[int(p)] for p in perm if tasks[p] == s]
            corr_p[s] = corr[s][torch.tensor(rows)]
    got = eng.train(params, clients[perm], tasks[perm], 2, corrections=corr_p)
    np.testing.assert_array_equal(got.steps, ref.steps[perm])
    np.testing.assert_array_equal(got.train_loss, ref.train_loss[perm])
    for s in ref.updates:
        sel = np.flatnonzero(tasks == s)
        pos = {int(p): k for k, p in enumerate(sel)}
        rows = torch.tensor([pos[int(p)] for p in perm if tasks[p] == s])
        assert torch.equal(got.updates[s], ref.updates[s][rows]), s


def test_reused_scratch_buffers_change_no_bit(federation):
    clients, tasks = _pairs(federation)
    small = np.flatnonzero(clients % 3 == 0)
    fresh = VectorizedEngine(federation, seed=4)
    params = fresh.init_params()
    ref_small = fresh.train(params, clients[small], tasks[small], 1)
    ref_all = VectorizedEngine(federation, seed=4).train(params, clients, tasks, 1)
    corr = _corrections(fresh, tasks[small], seed=2)
    ref_corr = VectorizedEngine(federation, seed=4).train(params, clients[small], tasks[small], 1,
                                                          corrections=corr)
    used = VectorizedEngine(federation, seed=4)
    # small, then all (buffers grow), then small again and with corrections (larger buffers
    # holding stale values from earlier calls and the other task)
    _assert_same(used.train(params, clients[small], tasks[small], 1), ref_small)
    _assert_same(used.train(params, clients, tasks, 1), ref_all)
    assert used._scratch_bufs
    _assert_same(used.train(params, clients[small], tasks[small], 1), ref_small)
    _assert_same(used.train(params, clients[small], tasks[small], 1, corrections=corr), ref_corr)
    _assert_same(used.train(params, clients, tasks, 1), ref_all)


def test_scratch_budget_bounds_the_kept_buffers(federation, monkeypatch):
    clients, tasks = _pairs(federation)
    eng = VectorizedEngine(federation, seed=4)
    params = eng.init_params()
    ref = eng.train(params, clients, tasks, 0)
    kept = max(b.numel() for b in eng._scratch_bufs.values())
    assert kept <= vec.SCRATCH_BUDGET
    monkeypatch.setattr(vec, "SCRATCH_BUDGET", 0)
    eng2 = VectorizedEngine(federation, seed=4)
    _assert_same(eng2.train(params, clients, tasks, 0), ref)
    assert not eng2._scratch_bufs
