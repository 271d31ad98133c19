"""Recording: the typed round record, the recorder's tables, cost counting and the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmfl.core.metrics import RoundCost
from mmfl.engines.base import TrainOutput
from mmfl.experiment.recording import (FINAL_WINDOW, Recorder, RoundRecord, TaskRound,
                                       count_cost, task_rounds, time_to_accuracy)
from mmfl.experiment.results import read_csv
from mmfl.experiment.signals import Measurements
from mmfl.types import Assignment


def _assignment(clients, tasks):
    k = len(clients)
    return Assignment(np.arange(k), np.array(clients), np.array(tasks), np.full(k, 0.5),
                      np.ones(k), np.full((4, 2), 0.25))


def _out(clients, tasks, steps):
    tasks = np.array(tasks)
    updates = {s: torch.ones(int((tasks == s).sum()), 3) for s in np.unique(tasks)}
    return TrainOutput(np.array(clients), tasks, updates, np.arange(len(clients), dtype=float),
                       np.array(steps))


def test_count_cost_drops_lost_uploads_and_doubles_scaffold():
    asked = _assignment([0, 1, 2], [0, 0, 1])
    plain = count_cost(asked, Measurements(), late=1, lost=1, control_variates=False)
    # the straggler trained (its upload came too late); the lost pair never answered
    assert plain == RoundCost(local_trainings=2, forward_passes=0, scalar_uploads=0,
                              model_uploads=1)
    scaffold = count_cost(asked, Measurements(), late=0, lost=0, control_variates=True)
    assert scaffold.model_uploads == 6
    full = count_cost(asked, Measurements(full_pairs=8, probes=5), late=0, lost=0,
                      control_variates=False)
    assert full == RoundCost(local_trainings=8, forward_passes=5, scalar_uploads=13,
                             model_uploads=3)
    offline = count_cost(asked, Measurements(full=object(), full_pairs=8, full_missing=2),
                         late=0, lost=0, control_variates=False)
    assert offline.local_trainings == 6  # two pairs of the full computation never answered


def test_task_rounds_counts_aggregated_and_trained_pairs():
    trained = _out([0, 1, 2], [0, 0, 1], [4, 6, 5])
    kept = trained.subset(np.array([True, False, True]))  # client 1 was a straggler
    rows = task_rounds(("a", "b"), np.array([0.5, 0.7]), None, kept, trained, np.array([2, 1]))
    assert rows[0] == TaskRound("a", 0.5, None, clients=1, slots=2, local_trainings=2,
                                local_steps=10, train_loss=0.0)
    assert rows[1].clients == 1 and rows[1].train_loss == 2.0 and rows[1].loss is None


def test_time_to_accuracy_first_hit_per_target():
    history = [(1, np.array([0.4, 0.55]), None), (2, np.array([0.62, 0.5]), None),
               (3, np.array([0.91, 0.6]), None)]
    got = time_to_accuracy(("a", "b"), history, [10.0, 20.0, 30.0])
    assert got["a"]["0.5"] == {"round": 2, "sim_time": 20.0}
    assert got["a"]["0.9"] == {"round": 3, "sim_time": 30.0}
    assert got["b"]["0.5"] == {"round": 1, "sim_time": 10.0}
    assert got["b"]["0.7"] is None
    assert FINAL_WINDOW == 20


def test_recorder_writes_the_record(tmp_path):
    summaries = []
    rec = Recorder(tmp_path, lambda: summaries.append(1) or {"status": "running"})
    rec.on_start(None, None, 0)
    tasks = (TaskRound("a", 0.5, 1.25, 2, 3, 2, 40, 0.75), TaskRound("b", 0.25, 2.0, 0, 0, 0, 0,
                                                                    None))
    record = RoundRecord(1, 2, ("a", "b"), np.array([0.5, 0.25]), np.array([1.25, 2.0]), 2, 0.1,
                         tasks=tasks, available=7, budget=3.0, expected_slots=2.5,
                         slots_assigned=3, cost=RoundCost(2, 0, 0, 2), local_steps=40,
                         stale_bytes=12, sim_seconds=1.5, sim_time=1.5, stragglers=1,
                         note="1 stragglers dropped", train_seconds=0.05, eval_seconds=0.02)
    rec.on_round(record)
    m = read_csv(tmp_path / "metrics.csv")
    assert m[0] == {"round": "1", "task": "a", "accuracy": "0.500000", "loss": "1.250000",
                    "clients": "2", "slots": "3", "local_trainings": "2", "local_steps": "40",
                    "train_loss": "0.750000"}
    assert m[1]["train_loss"] == "" and m[1]["clients"] == "0"
    r = read_csv(tmp_path / "rounds.csv")[0]
    assert (r["available"], r["slots"], r["model_uploads"], r["stragglers"]) == ("7", "3", "2", "1")
    assert float(r["mean_accuracy"]) == pytest.approx(0.375)
    assert r["note"] == "1 stragglers dropped"
    assert summaries == [1]  # evaluated, not the last round: summary.json refreshed
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "running"}
    rec.on_end({"status": "completed"})
    rec.close()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_user_callbacks_see_the_rows_the_recorder_writes(tmp_path):
    """The public callback interface: a user callback gets typed records whose task rows are
    exactly the run's metrics.csv."""
    import mmfl
    from mmfl.experiment.config import load_config
    from testkit import tiny_config_text

    class Keep:
        def on_start(self, cfg, federation, start_round):
            self.start = (cfg.name, federation.population.num_tasks, start_round)
            self.records = []

        def on_round(self, record):
            assert isinstance(record, mmfl.RoundRecord)
            self.records.append(record)

        def on_end(self, summary):
            self.summary = summary

    p = tmp_path / "c.toml"
    p.write_text(tiny_config_text(rounds=3), encoding="utf-8")
    keep = Keep()
    summary = mmfl.run(load_config(p), tmp_path / "r", callbacks=[keep])
    assert keep.start[1:] == (2, 0) and keep.summary == summary
    assert [r.round for r in keep.records] == [1, 2, 3]
    rows = read_csv(tmp_path / "r" / "metrics.csv")
    got = [(str(r.round), t.task, str(t.clients), str(t.local_steps))
           for r in keep.records for t in r.tasks]
    assert got == [(x["round"], x["task"], x["clients"], x["local_steps"]) for x in rows]
    rounds = read_csv(tmp_path / "r" / "rounds.csv")
    assert [str(r.cost.model_uploads) for r in keep.records] == [x["model_uploads"] for x in rounds]
