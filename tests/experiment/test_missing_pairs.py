"""Pairs an engine returns no update for (a distributed engine's node failed or timed out) are
*missing*: the runner drops them like stragglers, counts them in rounds.csv and finishes the
run. Checked with a local engine that loses one client's replies, so no Flower is needed."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from mmfl.engines.sequential import SequentialEngine
from mmfl.experiment.config import config_from_dict
from mmfl.experiment.runner import Runner

LOST = 0  # the client whose replies never arrive

RAW = {
    "name": "missing", "seed": 2, "rounds": 3, "engine": "sequential",
    "clients": {"count": 6, "active_rate": 1.0, "processors": 1},
    "sampler": {"name": "random"},
    "tasks": [
        {"name": "digits", "dataset": "digits", "model": "logreg", "lr": 0.1, "batch_size": 32},
        {"name": "wave", "dataset": "mnist1d", "model": "logreg", "lr": 0.1, "batch_size": 32,
         "dataset_options": {"num_samples": 300}},
    ],
}


class LossyEngine(SequentialEngine):
    """The sequential engine, except that client LOST never answers (train leaves its pairs
    out, probes give NaN); ``asked`` records every pair it was asked to train."""

    def __init__(self, federation, **kw):
        super().__init__(federation, **kw)
        self.asked: list[tuple[int, int]] = []

    def train(self, params, clients, tasks, round, corrections=None):
        self.asked += list(zip(np.asarray(clients).tolist(), np.asarray(tasks).tolist()))
        out = super().train(params, clients, tasks, round, corrections)
        return out.subset(out.clients != LOST)

    def probe_losses(self, params, clients, tasks):
        loss = super().probe_losses(params, clients, tasks)
        return np.where(np.asarray(clients) == LOST, np.nan, loss)


def _run(tmp_path, sampler, active_rate):
    cfg = config_from_dict({**RAW, "sampler": {"name": sampler},
                            "clients": {**RAW["clients"], "active_rate": active_rate}})
    engines = []

    def factory(fed):
        engines.append(LossyEngine(fed, seed=cfg.seed))
        return engines[0]

    summary = Runner(cfg, tmp_path / "run", engine_factory=factory).run()
    with open(tmp_path / "run" / "rounds.csv", newline="") as f:
        rounds = list(csv.DictReader(f))
    return summary, rounds, engines[0]


def test_missing_pairs_are_dropped_and_counted(tmp_path):
    summary, rounds, eng = _run(tmp_path, "random", 1.0)  # every client trains every round
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert any(c == LOST for c, _ in eng.asked)
    per_round = sum(1 for c, _ in eng.asked if c == LOST) // 3
    assert per_round >= 1
    for r in rounds:
        assert int(r["missing"]) == per_round
        assert f"{per_round} pairs missing (no reply)" in r["note"]
        assert int(r["stragglers"]) == 0
        # a pair that never answered counts neither as trained nor as uploaded, in both tables
        assert int(r["model_uploads"]) == int(r["local_trainings"])
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    for r in rounds:
        mine = [m for m in metrics if m["round"] == r["round"]]
        assert sum(int(m["local_trainings"]) for m in mine) == int(r["local_trainings"])
    assert np.isfinite(summary["mean_accuracy"])


@pytest.mark.parametrize("sampler", ["gvr", "lvr"])
def test_clients_missing_from_measurements_sit_the_round_out(tmp_path, sampler):
    """gvr trains every eligible pair first (full computation), lvr probes losses: a client
    without a reply there is offline for the round, so it is never assigned."""
    summary, rounds, eng = _run(tmp_path, sampler, 0.5)
    assert summary["status"] == "completed"
    for r in rounds:
        assert int(r["available"]) == RAW["clients"]["count"] - 1
        assert int(r["missing"]) >= 1 and "offline this round" in r["note"]
    asked_lost = [p for p in eng.asked if p[0] == LOST]
    if sampler == "lvr":  # never assigned, so never asked to train
        assert asked_lost == []
    else:  # asked in the full computation of each round only
        assert len(asked_lost) == 3 * 2
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    for r in rounds:  # the same trainings counted in both tables
        mine = [m for m in metrics if m["round"] == r["round"]]
        assert sum(int(m["local_trainings"]) for m in mine) == int(r["local_trainings"])
