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
from testkit import tampered_shard

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


def test_shard_engine_is_built_by_the_engine_constructor(setup, monkeypatch):
    """ShardEngine goes through Engine.__init__ (nothing of the base state skipped): its
    datasets are the shard's samples, its models come from the make_model hook (built on
    first use), and a client lacking a task has empty data for it."""
    from mmfl.engines.base import Engine

    _cfg, fed, paths = setup
    i = int(np.flatnonzero((fed.population.n_samples == 0).any(axis=1))[0])
    shard = load_shard(paths[i])
    calls = []
    original = Engine.__init__

    def init(self, *a, **kw):
        calls.append(type(self).__name__)
        original(self, *a, **kw)

    monkeypatch.setattr(Engine, "__init__", init)
    eng = fc.ShardEngine(shard, seed=3)
    assert calls == ["ShardEngine"]
    assert eng.seed == 3 and eng.workers == 1 and eng.num_tasks == len(shard.tasks)
    for s, t in enumerate(shard.tasks):
        assert eng.train_x[s].dtype == torch.float32 and eng.train_y[s].dtype == torch.int64
        np.testing.assert_array_equal(eng.train_x[s].numpy(), t.x)
        np.testing.assert_array_equal(eng.train_y[s].numpy(), t.y)
        assert eng.federation.tasks[s].client_indices[i].tolist() == list(range(t.num_samples))
        assert eng.task_classes(s) == t.num_classes and len(eng.test_y[s]) == 0
        assert isinstance(eng.models[s], fc._NoModel) and eng.buffers[s].numel() == 0
    assert 0 in shard.n_samples.tolist()
    held = int(np.flatnonzero(shard.n_samples > 0)[0])
    eng.need([held])
    assert sum(p.numel() for p in eng.models[held].parameters()) == \
        SequentialEngine(fed, seed=7).num_parameters()[held]


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


class _SlowGrid(FakeGrid):
    """Nodes connect one per ``get_node_ids`` call, and a reply is handed out only at the
    third pull that asks for it (as ClientApps that are still starting), so the engine waits
    in both phases."""

    def __init__(self, nodes):
        super().__init__(nodes)
        self.shown = 0
        self.pulls: dict[str, int] = {}

    def get_node_ids(self):
        self.shown = min(self.shown + 1, len(self.nodes))
        return list(self.nodes)[:self.shown]

    def pull_messages(self, message_ids):
        for m in message_ids:
            self.pulls[m] = self.pulls.get(m, 0) + 1
        return super().pull_messages([m for m in message_ids if self.pulls[m] >= 3])


def test_waiting_for_nodes_reports_progress(setup, tmp_path, monkeypatch, caplog):
    """Before round 1 the engine says what it waits for (nodes connected, then nodes that
    answered discovery, N of M and the seconds so far), in the log and, for flower-local, as
    ``nodes`` events in the progress file."""
    import logging

    from mmfl.flower import follow, server

    _cfg, fed, paths = setup
    monkeypatch.setattr(server, "PROGRESS_EVERY", 0.0)
    file = tmp_path / "flower" / follow.PROGRESS
    with caplog.at_level(logging.INFO, logger="mmfl.flower.server"):
        eng = _engine(fed, _SlowGrid(_deployed(paths)), round_timeout=0.05, node_wait=10.0,
                      progress_file=str(file))
    assert len(eng._node_of) == 6
    events = follow.RunFollower(tmp_path).events()
    assert {e["event"] for e in events} == {"nodes"}
    phases = [e["phase"] for e in events]
    assert phases[0] == "connect" and "discover" in phases and phases[-1] == "ready"
    connect = [e["have"] for e in events if e["phase"] == "connect"]
    assert connect == sorted(connect) and connect[0] < 6 and all(
        e["want"] == 6 for e in events)
    seconds = [e["seconds"] for e in events]
    assert seconds == sorted(seconds)
    assert events[-1]["have"] == 6 and events[-1]["nodes"] == 6
    assert "flower: waiting for Flower nodes to connect: 1 of 6 (0 s)" in caplog.text
    assert "flower: 6 Flower nodes serve 6 of 6 clients" in caplog.text


def test_shard_of_another_config_is_refused_and_recorded(setup, tmp_path):
    """Nodes whose shards disagree with the federation are refused (not an exception in the
    middle of discovery): the run cannot start without them, and the log file says why."""
    _cfg, fed, _paths = setup
    other = build_federation(config_from_dict({**CFG, "seed": 8}))
    bad = write_shards(other, tmp_path / "bad")
    rejected = tmp_path / "flower" / "rejected.jsonl"
    with pytest.raises(FlowerError, match=r"answered discovery .* refused"):
        _engine(fed, FakeGrid(_deployed(bad)), node_wait=0.5, rejected_file=str(rejected))
    recs = [json.loads(x) for x in rejected.read_text().splitlines()]
    assert recs and all(r["what"] == "discovery" for r in recs)
    assert any("shard of another config" in r["reason"] for r in recs)
    assert rejected.stat().st_mode & 0o077 == 0


def test_non_finite_update_is_passed_on_unchanged(setup):
    """The ClientApp returns a non-finite update as it is and the engine hands it to the
    runner (whose central check rejects it): no error reply, no exception, no lost pair."""
    _cfg, fed, paths = setup
    eng = _engine(fed, FakeGrid(_deployed(paths)))
    params = eng.init_params()
    params[1] = params[1].clone()
    params[1][0] = float("nan")
    clients, tasks = _pairs(fed)
    out = eng.train(params, clients, tasks, 0)
    np.testing.assert_array_equal(out.clients, clients)
    assert not torch.isfinite(out.updates[1]).all()
    assert torch.isfinite(out.updates[0]).all()


def _identity(paths, tmp_path, keys=None):
    from mmfl.flower.shards import write_identity

    file = tmp_path / "identity.json"
    write_identity(paths, file, keys)
    assert file.stat().st_mode & 0o077 == 0
    return str(file)


def test_rogue_nodes_are_refused_and_the_run_is_unchanged(setup, tmp_path):
    """Three rogue nodes next to the real ones: one claims client 1 with a modified copy of
    its shard (labels shifted, metadata lr 1e6) and one claims client 2 with fewer samples,
    both discovered before the real nodes; one, discovered after them, claims client 3 with
    an exact copy while the real node still answers (a second claim). All are refused and
    recorded, and the run directory equals the sequential engine's."""
    cfg, _fed, paths = setup
    nodes = _deployed(paths)
    rogue = {
        1: tampered_shard(paths[1], tmp_path / "r1.npz", shift_labels=True, lr=1e6),
        2: tampered_shard(paths[2], tmp_path / "r2.npz", drop=1),
    }
    grid = FakeGrid({**{5 + i: {"client-id": i, "data-file": str(p)} for i, p in rogue.items()},
                     **nodes, 8: {"client-id": 3, "data-file": str(paths[3])}})
    rejected = tmp_path / "fl" / "flower" / "rejected.jsonl"
    settings = FlowerSettings(node_wait=2.0, identity_file=_identity(paths, tmp_path),
                              rejected_file=str(rejected))
    mmfl.run(cfg.replace(engine="sequential"), tmp_path / "seq")
    run_experiment(grid, cfg, tmp_path / "fl", settings=settings)
    assert (tmp_path / "seq" / "metrics.csv").read_text() == \
        (tmp_path / "fl" / "metrics.csv").read_text()
    recs = {r["node"]: r for r in map(json.loads, rejected.read_text().splitlines())}
    assert set(recs) == {6, 7, 8}, recs
    assert "sha256" in recs[6]["reason"] and recs[6]["client"] == 1
    assert "n = " in recs[7]["reason"] and recs[7]["client"] == 2
    assert "second claim to client 3" in recs[8]["reason"]
    trained = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == M.TRAIN}
    assert trained and not trained & {6, 7, 8}


def test_a_dead_nodes_client_goes_to_the_node_with_its_shard(setup):
    """A second claim is accepted when the first node no longer answers (a restart whose old
    node id Flower still lists)."""
    _cfg, fed, paths = setup
    grid = FakeGrid(_deployed(paths))
    eng = _engine(fed, grid, round_timeout=0.1)
    old = eng._node_of[3]
    grid.silent.add(old)
    grid.nodes[99] = {"client-id": 3, "data-file": str(paths[3])}
    clients, tasks = _pairs(fed)
    out = eng.train(eng.init_params(), clients, tasks, 0)
    assert eng._node_of[3] == 99 and 3 in out.clients.tolist()


def test_training_settings_come_from_the_server(setup, tmp_path):
    """A shard whose metadata says lr = 1e6, 9 epochs, batch 1 trains exactly like the
    sequential engine with the config's settings: the ClientApp obeys the message."""
    _cfg, fed, paths = setup
    bad = [tampered_shard(p, tmp_path / p.name, lr=1e6) for p in paths]
    for p in bad:
        with np.load(p) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
        for t in meta["tasks"]:
            t.update(local_epochs=9, batch_size=1, model_options={"hidden": 3})
        np.savez(p, meta=np.array(json.dumps(meta)), **arrays)
    eng = _engine(fed, FakeGrid(_deployed(bad)))  # no identity file: only n is checked
    seq = SequentialEngine(fed, seed=7)
    params = [p + 0.01 for p in seq.init_params()]
    clients, tasks = _pairs(fed)
    a = seq.train(params, clients, tasks, 1)
    b = eng.train(params, clients, tasks, 1)
    np.testing.assert_array_equal(a.steps, b.steps)
    for s in a.updates:
        assert float((a.updates[s] - b.updates[s]).abs().max()) <= TOL


def test_the_local_optimizer_comes_from_the_server(tmp_path):
    """tasks[i].optimizer (here adam with weight decay, and sgd with momentum) reaches the
    ClientApp in the message: its updates equal the sequential engine's."""
    tasks = [{**CFG["tasks"][0], "optimizer": "adam", "optimizer_options": {"weight_decay": 0.01}},
             {**CFG["tasks"][1], "optimizer": "sgd", "optimizer_options": {"momentum": 0.9}}]
    cfg = config_from_dict({**CFG, "tasks": tasks})
    fed = build_federation(cfg)
    paths = write_shards(fed, tmp_path)
    eng = _engine(fed, FakeGrid(_deployed(paths)))
    seq = SequentialEngine(fed, seed=7)
    params = [p + 0.01 for p in seq.init_params()]
    clients, tasks_ = _pairs(fed)
    a = seq.train(params, clients, tasks_, 1)
    b = eng.train(params, clients, tasks_, 1)
    plain = SequentialEngine(build_federation(config_from_dict(CFG)), seed=7).train(
        params, clients, tasks_, 1)
    for s in a.updates:
        assert float((a.updates[s] - b.updates[s]).abs().max()) <= TOL
        assert float((a.updates[s] - plain.updates[s]).abs().max()) > 1e-4  # it mattered


class _KeyedGrid(FakeGrid):
    """A FakeGrid whose ``get_nodes`` exposes registered public keys (as under --auth)."""

    def __init__(self, nodes, keys: dict[int, bytes]):
        super().__init__(nodes)
        self.keys = keys

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=n, public_key=self.keys.get(n, b"")) for n in self.nodes]


def test_auth_binds_a_client_to_its_registered_key(setup, tmp_path):
    """With key digests in the identity file, a node that holds client 2's exact shard but
    another registered key is refused; the nodes with the right keys serve their clients."""
    from cryptography.hazmat.primitives import serialization

    from mmfl.flower.certs import make_node_key, public_key_digest

    _cfg, fed, paths = setup
    pems, digests = {}, {}
    for i in range(len(paths) + 1):
        _, pub = make_node_key(tmp_path / "keys" / f"node{i}")
        key = serialization.load_ssh_public_key(pub.read_bytes())
        pems[i] = key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        digests[i] = public_key_digest(pub)
        assert public_key_digest(pems[i]) == digests[i]
    nodes = _deployed(paths)
    node_ids = sorted(nodes)
    keys = {nid: pems[nodes[nid]["client-id"]] for nid in node_ids}
    thief = 4242  # client 2's shard, the extra key
    nodes[thief] = {"client-id": 2, "data-file": str(paths[2])}
    keys[thief] = pems[len(paths)]
    grid = _KeyedGrid({thief: nodes.pop(thief), **nodes}, keys)
    rejected = tmp_path / "rejected.jsonl"
    ident = _identity(paths, tmp_path, {i: digests[i] for i in range(len(paths))})
    eng = _engine(fed, grid, identity_file=ident, rejected_file=str(rejected))
    assert eng._node_of == {nodes[n]["client-id"]: n for n in node_ids}
    (rec,) = map(json.loads, rejected.read_text().splitlines())
    assert rec["node"] == thief and "not the key registered for client 2" in rec["reason"]


class _BadReplies(FakeGrid):
    """Client 0's node answers train messages with an update of the wrong size."""

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for mid in ids:
            rep = self._replies.get(mid)
            if rep is None or rep.has_error() or rep.metadata.message_type != M.TRAIN:
                continue
            if int(rep.content["metrics"]["client"]) == 0:
                for name in [k for k in rep.content.keys() if k.startswith("g.")]:
                    rep.content[name] = M.vector_record(torch.zeros(3))
        return ids


def test_a_malformed_reply_is_rejected_and_its_pairs_are_missing(setup, tmp_path):
    _cfg, fed, paths = setup
    rejected = tmp_path / "rejected.jsonl"
    eng = _engine(fed, _BadReplies(_deployed(paths)), rejected_file=str(rejected))
    clients, tasks = _pairs(fed)
    out = eng.train(eng.init_params(), clients, tasks, 4)
    np.testing.assert_array_equal(out.clients, clients[clients != 0])
    (rec,) = map(json.loads, rejected.read_text().splitlines())
    assert rec["what"] == "train reply" and rec["client"] == 0 and rec["round"] == 5
    assert "3 parameters" in rec["reason"]


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
        for r in rounds:  # a missing pair counts as neither trained nor uploaded
            assert int(r["model_uploads"]) == int(r["local_trainings"])
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
    for key, value in (("round-timeout", float("nan")), ("node-wait", float("inf")),
                       ("nodes", -1)):
        nan = Context(run_id=4, node_id=1, node_config={}, state=RecordDict(),
                      run_config={**rc, key: value})
        with pytest.raises(FlowerError, match=f"{key} must be a finite number"):
            server._main(FakeGrid(_deployed(paths)), nan)


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


def test_a_non_finite_update_from_a_node_is_rejected_by_the_server(setup, tmp_path,
                                                                    monkeypatch):
    """The whole Runner on the grid: client 0's node sends a NaN update in round 2; the
    server's update check rejects it like a missing pair, names it, and the run completes."""
    from mmfl.flower.client import ShardEngine

    cfg, fed, paths = setup
    original = ShardEngine.train

    def train(self, params, clients, tasks, round, corrections=None):
        out = original(self, params, clients, tasks, round, corrections)
        if round == 1 and self.client == 0:
            s = int(out.tasks[0])
            out.updates[s][0] = float("nan")
        return out

    monkeypatch.setattr(ShardEngine, "train", train)
    cfg = config_from_dict({**CFG, "rounds": 3, "sampler": {"name": "random"},
                            "clients": {**CFG["clients"], "active_rate": 1.0}})
    summary = run_experiment(FakeGrid(_deployed(paths)), cfg, tmp_path / "run",
                             settings=FlowerSettings(node_wait=2.0))
    assert summary["status"] == "completed"
    rounds = _rows(tmp_path / "run" / "rounds.csv")
    assert "client 0 (non-finite)" in rounds[1]["note"] and int(rounds[1]["missing"]) == 1
    assert "rejected" not in rounds[0]["note"] + rounds[2]["note"]
    assert all(np.isfinite(t["accuracy"]) for t in summary["tasks"].values())
