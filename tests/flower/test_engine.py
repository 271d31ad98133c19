"""Engine ``flower`` without Ray: the ServerApp side (FlowerEngine, the Runner on it) talks
through an in-process grid to mmfl's real ClientApp handlers, so the protocol, the client-side
training, faults (silent nodes, error replies) and node restarts are checked in seconds.
The same code under Flower's simulation engine is tested in test_simulation.py."""

from __future__ import annotations

import csv
import json
import uuid
from typing import ClassVar

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytestmark = pytest.mark.flower  # needs flwr (no Ray, seconds); the runner's part of missing
# pairs is also checked without Flower in tests/experiment/test_missing_pairs.py

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import mmfl
from mmfl.engines.sequential import SequentialEngine
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation
from mmfl.flower import client as fc
from mmfl.flower import messages as M
from mmfl.flower.server import FlowerEngine, FlowerError, FlowerSettings, run_experiment
from mmfl.flower.shards import load_shard, write_shards

TOL = 1e-6

CFG = {
    "name": "flower-unit", "seed": 7, "rounds": 3, "engine": "flower",
    "clients": {"count": 6, "active_rate": 0.5, "processors": {1: 0.5, 2: 0.5},
                "tasks_per_client": {1: 0.5, 2: 0.5}},
    "sampler": {"name": "random"},
    "tasks": [
        {"name": "digits", "dataset": "digits", "model": "mlp", "lr": 0.1, "batch_size": 7,
         "local_epochs": 2, "partition": {"kind": "dirichlet", "alpha": 0.5},
         "model_options": {"hidden": 16}},
        {"name": "wave", "dataset": "mnist1d", "model": "logreg", "lr": 0.2, "batch_size": 10,
         "dataset_options": {"num_samples": 400}},
    ],
}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower's Message constructor needs the identity of a running task."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class FakeGrid:
    """A grid whose nodes are mmfl's ClientApp handlers called in-process.

    ``nodes``: node id -> node config. Nodes in ``silent`` never answer; nodes in ``errors``
    answer messages of the types in ``error_types`` with that Flower error code. A handler that
    raises gives an error reply with code 2, as in Flower.
    """

    HANDLERS: ClassVar = {M.DISCOVER: fc.discover, M.TRAIN: fc.train, M.PROBE: fc.probe}

    def __init__(self, nodes: dict[int, dict]):
        self.nodes = dict(nodes)
        self.silent: set[int] = set()
        self.errors: dict[int, int] = {}
        self.error_types = set(self.HANDLERS)
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            self.sent.append(msg)
            ids.append(mid)
            nid = msg.metadata.dst_node_id
            if nid in self.silent:
                continue
            if nid in self.errors and msg.metadata.message_type in self.error_types:
                self._replies[mid] = Message(Error(self.errors[nid], "node gone"), reply_to=msg)
                continue
            ctx = Context(run_id=1, node_id=nid, node_config=self.nodes[nid],
                          state=RecordDict(), run_config={})
            try:
                self._replies[mid] = self.HANDLERS[msg.metadata.message_type](msg, ctx)
            except Exception as e:  # noqa: BLE001 - what Flower does with a ClientApp error
                self._replies[mid] = Message(Error(2, repr(e)), reply_to=msg)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = config_from_dict(CFG)
    fed = build_federation(cfg)
    paths = write_shards(fed, tmp_path_factory.mktemp("shards"))
    return cfg, fed, paths


def _deployed(paths, first_id=1000):
    """Deployment-style node configs: client-id and data-file (node ids unrelated to i)."""
    return {first_id + 7 * i: {"client-id": i, "data-file": str(p)} for i, p in enumerate(paths)}


def _engine(fed, grid, **kw):
    settings = FlowerSettings(**{"round_timeout": 0.3, "node_wait": 2.0, **kw})
    return FlowerEngine(fed, seed=7, grid=grid, settings=settings)


def _pairs(fed):
    tasks, clients = np.nonzero(fed.population.n_samples.T > 0)
    return clients.astype(np.int64), tasks.astype(np.int64)


def test_shards_hold_each_clients_samples_in_index_order(setup):
    cfg, fed, paths = setup
    assert [p.name for p in paths] == [f"client-{i}.npz" for i in range(cfg.clients.count)]
    for i, p in enumerate(paths):
        shard = load_shard(p)
        assert shard.client == i and shard.num_clients == cfg.clients.count
        np.testing.assert_array_equal(shard.n_samples, fed.population.n_samples[i])
        for s, (t, td) in enumerate(zip(shard.tasks, fed.tasks)):
            idx = td.client_indices[i]
            np.testing.assert_array_equal(t.x, td.dataset.x_train[idx])
            np.testing.assert_array_equal(t.y, td.dataset.y_train[idx])
            assert (t.spec.name, t.spec.lr, t.spec.batch_size) == (td.spec.name, td.spec.lr,
                                                    td.spec.batch_size)
    assert (fed.population.n_samples == 0).any(), "some client should lack a task"


def test_missing_shard_is_a_one_line_data_error(tmp_path):
    with pytest.raises(mmfl.DataError, match="client shard not found"):
        load_shard(tmp_path / "client-0.npz")


@pytest.mark.parametrize("pack", ["pair", "node"])
@pytest.mark.parametrize("with_corrections", [False, True])
def test_train_matches_sequential(setup, pack, with_corrections):
    _cfg, fed, paths = setup
    grid = FakeGrid(_deployed(paths))
    eng = _engine(fed, grid, pack=pack)
    seq = SequentialEngine(fed, seed=7)
    params = [p + 0.01 for p in seq.init_params()]
    clients, tasks = _pairs(fed)
    order = np.random.default_rng(1).permutation(len(clients))  # any order of pairs
    clients, tasks = clients[order], tasks[order]
    corr = None
    if with_corrections:
        gen = torch.Generator().manual_seed(3)
        corr = {s: 0.05 * torch.randn(int((tasks == s).sum()), params[s].numel(), generator=gen)
                for s in range(len(params))}
    grid.sent.clear()
    a = seq.train(params, clients, tasks, 2, corrections=corr)
    b = eng.train(params, clients, tasks, 2, corrections=corr)
    trains = [m for m in grid.sent if m.metadata.message_type == M.TRAIN]
    assert len(trains) == (len(clients) if pack == "pair" else len(np.unique(clients)))
    np.testing.assert_array_equal(b.clients, clients)
    np.testing.assert_array_equal(b.tasks, tasks)
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=0, atol=TOL)
    for s in a.updates:
        assert float(a.updates[s].abs().max()) > 1e-3
        assert float((a.updates[s] - b.updates[s]).abs().max()) <= TOL


def test_probes_match_the_engine_loop(setup):
    _cfg, fed, paths = setup
    eng = _engine(fed, FakeGrid(_deployed(paths)))
    params = eng.init_params()
    clients, tasks = _pairs(fed)
    want = SequentialEngine(fed, seed=7).probe_losses(params, clients, tasks)
    got = eng.probe_losses(params, clients, tasks)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert (got > 0).all()


def test_silent_and_failed_nodes_leave_their_pairs_out(setup):
    _cfg, fed, paths = setup
    grid = FakeGrid(_deployed(paths))
    eng = _engine(fed, grid, round_timeout=0.2)
    params = eng.init_params()
    clients, tasks = _pairs(fed)
    node_of = {c["client-id"]: nid for nid, c in grid.nodes.items()}
    grid.silent.add(node_of[1])
    grid.errors[node_of[2]] = 5  # NODE_UNAVAILABLE
    out = eng.train(params, clients, tasks, 0)
    answered = ~np.isin(clients, [1, 2])
    np.testing.assert_array_equal(out.clients, clients[answered])
    np.testing.assert_array_equal(out.tasks, tasks[answered])
    for s in out.updates:
        assert out.updates[s].shape[0] == int((out.tasks == s).sum())
    probes = eng.probe_losses(params, clients, tasks)
    assert np.isnan(probes[~answered]).all() and np.isfinite(probes[answered]).all()


def test_restarted_node_is_used_again(setup):
    _cfg, fed, paths = setup
    grid = FakeGrid(_deployed(paths))
    eng = _engine(fed, grid)
    params = eng.init_params()
    clients, tasks = _pairs(fed)
    old = next(n for n, c in grid.nodes.items() if c["client-id"] == 3)
    conf = grid.nodes.pop(old)  # the node dies ...
    out = eng.train(params, clients, tasks, 0)
    assert 3 not in out.clients.tolist()
    grid.nodes[99] = conf  # ... and comes back under a new node id
    grid.sent.clear()
    out = eng.train(params, clients, tasks, 1)
    assert 3 in out.clients.tolist()
    assert any(m.metadata.dst_node_id == 99 and m.metadata.message_type == M.TRAIN
               for m in grid.sent)


def test_simulation_node_config_and_shard_dir(setup):
    """partition-id plus the message's shard-dir (what run_simulation gives)."""
    _cfg, fed, paths = setup
    grid = FakeGrid({10 + i: {"partition-id": i, "num-partitions": len(paths)}
                     for i in range(len(paths))})
    eng = _engine(fed, grid, shard_dir=str(paths[0].parent))
    clients, tasks = _pairs(fed)
    out = eng.train(eng.init_params(), clients, tasks, 0)
    assert len(out.clients) == len(clients)


def test_waiting_for_nodes_has_a_deadline(setup):
    _cfg, fed, paths = setup
    nodes = _deployed(paths)
    nodes.pop(next(iter(nodes)))
    with pytest.raises(FlowerError, match=r"only 5 of 6 Flower nodes connected after 0.2 s"):
        _engine(fed, FakeGrid(nodes), node_wait=0.2)


def test_shard_of_another_config_is_rejected(setup, tmp_path):
    _cfg, fed, _paths = setup
    other = build_federation(config_from_dict({**CFG, "seed": 8}))
    bad = write_shards(other, tmp_path)
    with pytest.raises(FlowerError, match="shard of another config"):
        _engine(fed, FakeGrid(_deployed(bad)))


def test_non_finite_update_stops_the_run(setup):
    _cfg, fed, paths = setup
    eng = _engine(fed, FakeGrid(_deployed(paths)))
    params = eng.init_params()
    params[1] = params[1].clone()
    params[1][0] = float("nan")
    clients, tasks = _pairs(fed)
    with pytest.raises(mmfl.NumericalError, match="wave"):
        eng.train(params, clients, tasks, 0)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("sampler", ["random", "gvr", "lvr"])
def test_run_with_a_failing_node_completes_and_records_missing_pairs(setup, tmp_path, sampler):
    """The whole Runner on the grid: client 0's node fails every training (and probe); its
    pairs are dropped like stragglers and counted, and the run finishes. With gvr (full
    computation) and lvr (probes) the client sits the rounds out: it is never assigned."""
    cfg, fed, paths = setup
    grid = FakeGrid(_deployed(paths))
    grid.errors[next(n for n, c in grid.nodes.items() if c["client-id"] == 0)] = 2
    grid.error_types = {M.TRAIN, M.PROBE}  # it answers discovery, then fails
    cfg = config_from_dict({**CFG, "rounds": 4, "sampler": {"name": sampler},
                            "clients": {**CFG["clients"],
                                        "active_rate": 1.0 if sampler == "random" else 0.5}})
    summary = run_experiment(grid, cfg, tmp_path / "run",
                             settings=FlowerSettings(round_timeout=0.5, node_wait=2.0))
    assert summary["status"] == "completed"
    rounds = _rows(tmp_path / "run" / "rounds.csv")
    assert len(rounds) == 4
    held = int((fed.population.n_samples[0] > 0).sum())
    assert held >= 1
    assert all(int(r["missing"]) == held for r in rounds), "client 0's pairs, every round"
    metrics = _rows(tmp_path / "run" / "metrics.csv")
    assert all(r["accuracy"] != "" for r in metrics)
    if sampler == "random":  # every processor active: client 0 is assigned, then dropped
        assert all("missing (no reply)" in r["note"] for r in rounds)
        for r in rounds:  # its uploads never arrived
            assert int(r["model_uploads"]) == int(r["local_trainings"]) - int(r["missing"])
    else:  # measured first: offline for the round, so the sampler never assigns it
        assert all("offline this round" in r["note"] for r in rounds)
        assert all(int(r["available"]) == cfg.clients.count - 1 for r in rounds)
        trained = [m for m in grid.sent if m.metadata.message_type == M.TRAIN
                   and int(m.content["config"]["client"]) == 0]
        assert len(trained) == (4 if sampler == "gvr" else 0)  # gvr: the full pass only
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_run_matches_sequential_engine(setup, tmp_path):
    """Without faults the flower engine's run directory equals the sequential engine's."""
    cfg, _fed, paths = setup
    a = mmfl.run(cfg.replace(engine="sequential"), tmp_path / "seq")
    b = run_experiment(FakeGrid(_deployed(paths)), cfg, tmp_path / "fl",
                       settings=FlowerSettings(node_wait=2.0))
    assert (tmp_path / "seq" / "metrics.csv").read_text() == \
        (tmp_path / "fl" / "metrics.csv").read_text()
    assert a["tasks"] == b["tasks"]


def test_server_app_reads_its_run_config(setup, tmp_path):
    """Deployment entry point: run config config-file / out-dir / round-timeout / nodes /
    node-wait / resume; the run directory appears at out-dir."""
    from mmfl.experiment import tomlio
    from mmfl.flower import server

    cfg, _fed, paths = setup
    conf = tmp_path / "config.toml"
    conf.write_text(tomlio.dumps(cfg.replace(rounds=2).to_dict()), encoding="utf-8")
    rc = {"config-file": str(conf), "out-dir": str(tmp_path / "out"), "round-timeout": 5.0,
          "nodes": 6, "node-wait": 2.0, "resume": False}
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)
    server._main(FakeGrid(_deployed(paths)), ctx)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    # resume with more rounds continues the same directory
    conf.write_text(tomlio.dumps(cfg.replace(rounds=3).to_dict()), encoding="utf-8")
    server._main(FakeGrid(_deployed(paths)), Context(
        run_id=2, node_id=1, node_config={}, state=RecordDict(), run_config={**rc, "resume": True}))
    assert len(_rows(tmp_path / "out" / "rounds.csv")) == 3
    bad = Context(run_id=3, node_id=1, node_config={}, state=RecordDict(),
                  run_config={"out-dir": str(tmp_path / "x")})
    with pytest.raises(FlowerError, match="config-file is required"):
        server._main(FakeGrid(_deployed(paths)), bad)


def test_a_silent_new_node_is_not_asked_every_round(setup):
    _cfg, fed, paths = setup
    grid = FakeGrid(_deployed(paths))
    eng = _engine(fed, grid, round_timeout=0.05)
    params = eng.init_params()
    clients, tasks = _pairs(fed)
    grid.nodes[555] = {"client-id": 3, "data-file": str(paths[3])}
    grid.silent.add(555)
    for t in range(4):  # discover() calls 2..5: asked at 2, then RETRY_AFTER = 3 later
        out = eng.train(params, clients, tasks, t)
        assert len(out.clients) == len(clients)  # client 3 keeps its old node
    asked = [m for m in grid.sent if m.metadata.dst_node_id == 555]
    assert [m.metadata.message_type for m in asked] == [M.DISCOVER, M.DISCOVER]
