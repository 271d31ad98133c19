"""clients.preferences on engine flower and mmfl flower-local: a refused pair's data stays out
of the client's shard (its n_{i,s} is 0, as in the population the server checks claims
against), so every node is accepted and the run equals the sequential engine's."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.flower

import mmfl
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.federation import build_federation

RAW = {"name": "pref-flower", "seed": 4, "rounds": 3, "engine": "flower",
       "clients": {"count": 8, "active_rate": 0.5,
                   "preferences": {"1": 0.5, "0.5": 0.25, "0": 0.25}},
       "tasks": [{"name": "digits", "dataset": "digits", "model": "mlp", "lr": 0.1,
                  "batch_size": 16, "model_options": {"hidden": 8}},
                 {"name": "wave", "dataset": "mnist1d", "model": "logreg", "lr": 0.2,
                  "batch_size": 10, "dataset_options": {"num_samples": 400}}]}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def test_shards_leave_out_refused_pairs(tmp_path):
    from mmfl.flower.shards import load_shard, shard_federation, write_shards

    cfg = config_from_dict(RAW)
    fed = build_federation(cfg)
    shards = shard_federation(cfg, fed)
    refused = (fed.population.n_samples > 0) & (shards.population.n_samples == 0)
    assert refused.any(), "the config should refuse some held pair"
    for i, p in enumerate(write_shards(shards, tmp_path)):
        shard = load_shard(p)
        np.testing.assert_array_equal(shard.n_samples, shards.population.n_samples[i])
        for s in np.flatnonzero(refused[i]):
            assert len(shard.tasks[s].y) == 0
    assert shard_federation(config_from_dict({**RAW, "clients": {"count": 8}}), fed) is fed


def test_run_with_refusals_equals_the_sequential_engines(tmp_path):
    from mmfl.flower.server import FlowerSettings, run_experiment
    from mmfl.flower.shards import shard_federation, write_shards
    from test_engine import FakeGrid, _deployed

    cfg = config_from_dict(RAW)
    a = mmfl.run(cfg.replace(engine="sequential"), tmp_path / "seq")
    paths = write_shards(shard_federation(cfg, build_federation(cfg)), tmp_path / "shards")
    b = run_experiment(FakeGrid(_deployed(paths)), cfg, tmp_path / "fl",
                       settings=FlowerSettings(node_wait=5.0,
                                               rejected_file=str(tmp_path / "rejected.jsonl")))
    assert (tmp_path / "seq" / "metrics.csv").read_text() == \
        (tmp_path / "fl" / "metrics.csv").read_text()
    assert (tmp_path / "seq" / "rounds.csv").read_text() == \
        (tmp_path / "fl" / "rounds.csv").read_text()
    assert a["preferences"] == b["preferences"] and a["preferences"]["refused_pairs"] > 0
    assert not (tmp_path / "rejected.jsonl").exists()  # no node refused


def test_shards_of_the_whole_federation_would_be_refused(tmp_path):
    """Why: a shard holding a refused pair's samples claims n_{i,s} > 0, and the server,
    whose population has 0 there, refuses its node."""
    from mmfl.flower.server import FlowerError, FlowerSettings, run_experiment
    from mmfl.flower.shards import write_shards
    from test_engine import FakeGrid, _deployed

    cfg = config_from_dict(RAW)
    paths = write_shards(build_federation(cfg), tmp_path / "shards")
    with pytest.raises(FlowerError, match="answered discovery"):
        run_experiment(FakeGrid(_deployed(paths)), cfg, tmp_path / "fl",
                       settings=FlowerSettings(node_wait=1.0, round_timeout=0.5,
                                               rejected_file=str(tmp_path / "rejected.jsonl")))
    reasons = [json.loads(x)["reason"] for x in
               (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert reasons and all("shard holds n =" in r for r in reasons)


def test_simulated_run_with_refusals_completes_like_vectorized(tmp_path):
    """mmfl run with engine flower (Flower's simulation, Ray): the shards host_run writes leave
    the refused pairs out, every node is accepted, and the run makes vectorized's choices."""
    raw = {**RAW, "flower": {"round_timeout": 60.0, "node_wait": 60.0, "ray_cpus": 2}}
    a = mmfl.run(config_from_dict({**raw, "engine": "vectorized"}), tmp_path / "vec")
    b = mmfl.run(config_from_dict(raw), tmp_path / "fl")
    assert b["status"] == "completed" and a["preferences"] == b["preferences"]
    cols = ("round", "available", "slots", "local_trainings", "missing", "declined")
    ra, rb = ([{c: r[c] for c in cols} for r in csv.DictReader(
        (tmp_path / d / "rounds.csv").read_text().splitlines())] for d in ("vec", "fl"))
    assert ra == rb and len(ra) == 3 and all(r["missing"] == "0" for r in rb)
    for task in ("digits", "wave"):
        assert abs(a["tasks"][task]["accuracy"] - b["tasks"][task]["accuracy"]) <= 1e-4


def test_flower_local_writes_shards_without_refused_pairs(tmp_path):
    """mmfl flower-local's files (no process started): its shards and identity file hold
    n_{i,s} = 0 for refused pairs, the population its ServerApp checks the nodes against."""
    from mmfl.core.preferences import restrict_population
    from mmfl.experiment.preferences import willingness_of
    from mmfl.flower.local import LocalDeployment
    from mmfl.flower.shards import load_identity, load_shard

    cfg = config_from_dict(RAW)
    pop = build_federation(cfg).population
    want = restrict_population(pop, willingness_of(cfg, pop)).n_samples
    assert (want != pop.n_samples).any()
    with LocalDeployment(cfg, tmp_path / "run") as dep:
        dep.prepare()
        ident = load_identity(dep.dir / "identity.json")
        assert [ident[i]["n"] for i in range(len(want))] == want.tolist()
        assert [load_shard(p).n_samples.tolist() for p in dep.shards] == want.tolist()
