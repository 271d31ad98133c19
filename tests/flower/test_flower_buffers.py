"""Models with buffers (batch norm) on engine flower: ``b.<s>`` travels with every train and
probe message and comes back with the update; the server keeps b_s and, for
``tasks[i].buffers = "local"`` (FedBN), every client's b_{i,s}, exactly as the local engines do,
so runs equal theirs. In-process checks through test_engine.py's FakeGrid (seconds) and whole
runs under Flower's simulation engine (Ray), where the model, registered in this process,
reaches the ClientApps in the Ray workers (mmfl.flower.simulation.UserModels)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("flwr")
pytestmark = pytest.mark.flower

import mmfl
from mmfl.experiment import checkpoint, runner
from mmfl.experiment.config import config_from_dict


class BNNet(nn.Module):
    """Linear - BatchNorm1d - ReLU - Linear (logits)."""

    def __init__(self, d, k):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, 12), nn.BatchNorm1d(12), nn.ReLU(),
                                  nn.Linear(12, k))

    def forward(self, x):
        return self.body(x)


def bn_flower_model(options, input_shape, num_classes):
    return BNNet(int(np.prod(input_shape)), num_classes)


@pytest.fixture(scope="module", autouse=True)
def registered():
    mmfl.register("model", "bn_flower")(bn_flower_model)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower's Message constructor needs the identity of a running task (FakeGrid tests)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _raw(buffers="aggregate", **changes):
    return {"name": "bn-flower", "seed": 3, "rounds": 3, "engine": "flower",
            "clients": {"count": 6, "active_rate": 0.5},
            "sampler": {"name": "random"},
            "flower": {"round_timeout": 60.0, "node_wait": 60.0, "ray_cpus": 2},
            "tasks": [{"name": "bn", "dataset": "digits", "model": "bn_flower", "lr": 0.05,
                       "batch_size": 16, "buffers": buffers,
                       "partition": {"kind": "dirichlet", "alpha": 0.5}},
                      {"name": "wave", "dataset": "mnist1d", "model": "logreg", "lr": 0.2,
                       "batch_size": 10, "dataset_options": {"num_samples": 400}}],
            **changes}


def _setup(tmp_path, buffers, pack="pair"):
    from mmfl.experiment.federation import build_federation
    from mmfl.flower.server import FlowerEngine, FlowerSettings
    from mmfl.flower.shards import write_shards
    from test_engine import FakeGrid, _deployed

    cfg = config_from_dict(_raw(buffers))
    fed = build_federation(cfg)
    grid = FakeGrid(_deployed(write_shards(fed, tmp_path / "shards")))
    eng = FlowerEngine(fed, seed=3, grid=grid,
                       settings=FlowerSettings(round_timeout=5.0, node_wait=5.0, pack=pack))
    return cfg, fed, grid, eng


@pytest.mark.parametrize("buffers, pack", [("aggregate", "pair"), ("local", "node")])
def test_train_sends_and_returns_the_buffers_of_the_sequential_engine(tmp_path, buffers, pack):
    from mmfl.engines.sequential import SequentialEngine
    from mmfl.flower import messages as M

    _cfg, fed, grid, eng = _setup(tmp_path, buffers, pack)
    seq = SequentialEngine(fed, seed=3)
    assert eng.has_buffers(0) and not eng.has_buffers(1)
    params = [p + 0.01 for p in seq.init_params()]
    gen = torch.Generator().manual_seed(0)
    moved = eng.buffers[0] + 0.1 * torch.rand(eng.buffers[0].shape, generator=gen)
    for e in (eng, seq):  # server statistics moved off the initial ones; client 2 has its own
        e.buffers[0] = moved.clone()
        if buffers == "local":
            e.local_buffers[0][2] = moved + 0.5
    tasks, clients = np.nonzero(fed.population.n_samples.T > 0)
    grid.sent.clear()
    a = seq.train(params, clients, tasks, 1)
    b = eng.train(params, clients, tasks, 1)
    np.testing.assert_array_equal(b.clients, clients)
    np.testing.assert_array_equal(a.steps, b.steps)
    assert set(b.buffers) == {0} and b.buffers[0].shape == a.buffers[0].shape == (
        int((tasks == 0).sum()), 24)
    assert float((a.buffers[0] - b.buffers[0]).abs().max()) <= 1e-6
    for s in a.updates:
        assert float((a.updates[s] - b.updates[s]).abs().max()) <= 1e-6
    sent = {}
    for m in grid.sent:
        if m.metadata.message_type == M.TRAIN and "b.0" in m.content:
            sent[int(m.content["config"]["client"])] = M.record_vector(m.content["b.0"])
        if m.metadata.message_type == M.TRAIN:
            assert "b.1" not in m.content  # logreg has no buffers
    assert set(sent) == set(clients[tasks == 0].tolist())
    for i, b0 in sent.items():
        assert torch.equal(b0, seq.start_buffers(0, i))
    if buffers == "local" and 2 in sent:
        assert torch.equal(sent[2], moved + 0.5)


def test_probes_run_with_the_servers_buffers(tmp_path):
    from mmfl.engines.sequential import SequentialEngine

    _cfg, fed, _grid, eng = _setup(tmp_path, "aggregate")
    seq = SequentialEngine(fed, seed=3)
    params = eng.init_params()
    tasks, clients = np.nonzero(fed.population.n_samples.T > 0)
    before = eng.probe_losses(params, clients, tasks)
    for e in (eng, seq):
        e.buffers[0] = e.buffers[0] + 0.3
    got = eng.probe_losses(params, clients, tasks)
    np.testing.assert_allclose(got, seq.probe_losses(params, clients, tasks), rtol=1e-6, atol=1e-6)
    bn = tasks == 0
    assert (np.abs(got[bn] - before[bn]) > 1e-4).all() and np.array_equal(got[~bn], before[~bn])


def test_a_message_whose_buffers_do_not_fit_the_model_is_refused(tmp_path):
    from mmfl.flower import client as fc
    from mmfl.flower.shards import load_shard, write_shards
    from mmfl.experiment.federation import build_federation

    fed = build_federation(config_from_dict(_raw()))
    eng = fc.ShardEngine(load_shard(write_shards(fed, tmp_path)[0]))
    eng.need([0])
    with pytest.raises(mmfl.DataError, match="the server sent 0 buffer values, this client's "
                       "model has 24"):
        eng.take_buffers([0], {})


@pytest.mark.parametrize("buffers", ["aggregate", "local"])
def test_in_process_run_equals_the_sequential_engines(tmp_path, buffers):
    from mmfl.flower.server import FlowerSettings, run_experiment
    from mmfl.flower.shards import write_shards
    from mmfl.experiment.federation import build_federation
    from test_engine import FakeGrid, _deployed

    cfg = config_from_dict(_raw(buffers, sampler={"name": "lvr"}))
    a = mmfl.run(cfg.replace(engine="sequential"), tmp_path / "seq")
    paths = write_shards(build_federation(cfg), tmp_path / "shards")
    b = run_experiment(FakeGrid(_deployed(paths)), cfg, tmp_path / "fl",
                       settings=FlowerSettings(node_wait=5.0))
    assert (tmp_path / "seq" / "metrics.csv").read_text() == \
        (tmp_path / "fl" / "metrics.csv").read_text()
    assert a["tasks"] == b["tasks"]
    ea, eb = (checkpoint.load(tmp_path / r / runner.CHECKPOINT)[0] for r in ("seq", "fl"))
    bufs = [k for k in ea if "buffers.0" in k or "local.0" in k]
    assert bufs and all(np.array_equal(ea[k], eb[k]) for k in bufs), bufs


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("buffers, pack, sampler", [("aggregate", "node", "lvr"),
                                                    ("local", "pair", "random")])
def test_simulated_run_matches_vectorized(tmp_path, buffers, pack, sampler):
    """Engine flower under Flower's simulation engine (Ray workers build the model registered
    here) gives the vectorized engine's assignments and metrics for a batch-norm model."""
    raw = _raw(buffers, sampler={"name": sampler},
               flower={**_raw()["flower"], "pack": pack})
    mmfl.run(config_from_dict({**raw, "engine": "vectorized"}), tmp_path / "vec")
    summary = mmfl.run(config_from_dict(raw), tmp_path / "fl")
    assert summary["status"] == "completed"
    rv, rf = _rows(tmp_path / "vec" / "metrics.csv"), _rows(tmp_path / "fl" / "metrics.csv")
    assert len(rv) == len(rf) == 6
    # imported here: Ray workers load this module from its file, without tests/ on sys.path
    from testkit import assert_metrics_match

    assert_metrics_match(rv, rf, 1e-4)
    assert all(r["missing"] == "0" for r in _rows(tmp_path / "fl" / "rounds.csv"))
    pv, _ = checkpoint.load(tmp_path / "vec" / runner.CHECKPOINT)
    pf, _ = checkpoint.load(tmp_path / "fl" / runner.CHECKPOINT)
    keys = [k for k in pv if k.startswith("param.") or "buffers.0" in k or "local.0" in k]
    assert any("buffers.0" in k for k in keys)
    for k in keys:
        np.testing.assert_allclose(pf[k], pv[k], rtol=0, atol=1e-5, err_msg=k)
