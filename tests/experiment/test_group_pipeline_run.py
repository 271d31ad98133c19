"""``group_pipeline`` end to end: ``mmfl run`` with each grouping and within-group rule on the
tiny config; the runner hands over class sets (label) and pairwise update distances
(gradient); sequential and vectorized engines agree; a run resumes exactly."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from testkit import run_cli, tiny_config_text

import mmfl
from mmfl.engines.base import TrainOutput
from mmfl.experiment.config import load_config
from mmfl.experiment.signals import update_distances

METRIC_TOL = 1e-4  # as the engine conformance tests


def _rows(path, name="metrics.csv"):
    with open(path / name, newline="") as f:
        return list(csv.DictReader(f))


def _cfg(tmp_path, rounds=3, overrides=()):
    p = tmp_path / "gp.toml"
    p.write_text(tiny_config_text(rounds=rounds, sampler="group_pipeline"), encoding="utf-8")
    return p, load_config(p, list(overrides))


def test_update_distances_hand_worked():
    """Task 0: clients 0, 1, 2 with updates (0, 0), (3, 4), (0, 1), eta 0.5; task 1: clients
    1, 2 with (1, 1), (1, 1), eta 1. D_01 = 5 / 0.5 = 10, D_02 = 1 / 0.5 = 2,
    D_12 = sqrt(9 + 9) / 0.5 + 0, client 3 trained nothing (row 0)."""
    out = TrainOutput(clients=np.array([0, 1, 2, 1, 2]), tasks=np.array([0, 0, 0, 1, 1]),
                      updates={0: torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]),
                               1: torch.tensor([[1.0, 1.0], [1.0, 1.0]])},
                      train_loss=np.zeros(5), steps=np.ones(5, np.int64))
    d = update_distances(out, 4, np.array([0.5, 1.0]), chunk=2)
    want = np.zeros((4, 4))
    want[0, 1] = want[1, 0] = 10.0
    want[0, 2] = want[2, 0] = 2.0
    want[1, 2] = want[2, 1] = np.sqrt(18.0) / 0.5
    np.testing.assert_allclose(d, want, atol=1e-9)


@pytest.mark.parametrize("options", [
    [],
    ["sampler.within=optimal", "sampler.weight=group"],
    ["sampler.grouping=random", "sampler.probability=authors"],
    ["sampler.grouping=gradient", "sampler.within=optimal"],
])
def test_mmfl_run_each_rule(tmp_path, options):
    path, _ = _cfg(tmp_path)
    sets = [x for o in options for x in ("--set", o)]
    r = run_cli("run", str(path), "--out", str(tmp_path / "r"), "--progress", "none", *sets)
    assert r.returncode == 0, r.stderr
    rounds = _rows(tmp_path / "r", "rounds.csv")
    fed = mmfl.read_results(tmp_path / "r")
    assert len(rounds) == 3 and fed.summary["status"] == "completed"
    notes = [row["note"] for row in rounds]
    assert all("groups->models" in n for n in notes)
    # the models the groups serve follow the pipeline: round 0 is (0, 1); S = G = 2 rotates
    assert [n.split("groups->models ")[1][:3] for n in notes] == ["0,1", "1,0", "0,1"]
    trainings = [int(row["local_trainings"]) for row in rounds]
    if "sampler.grouping=gradient" in options:  # round 0 trains every eligible pair
        fed_file = json.loads((tmp_path / "r" / "federation.json").read_text())
        n = np.array(fed_file["n_samples"])
        assert trainings[0] == int((n > 0).sum()) > max(trainings[1:])
    for row in rounds:  # floor(m / G) slots per group: exactly (uniform), on average (optimal)
        k = int(row["budget"]) // 2
        assert float(row["expected_slots"]) <= 2 * k + 1e-9
        if "sampler.within=optimal" not in options:
            assert int(row["slots"]) <= 2 * k


def test_bad_groups_is_a_config_error(tmp_path):
    path, _ = _cfg(tmp_path)
    r = run_cli("run", str(path), "--out", str(tmp_path / "r"), "--set", "sampler.groups=3")
    assert r.returncode == 2 and "sampler.groups" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("options", [[], ["sampler.within=optimal", "sampler.grouping=gradient"]])
def test_sequential_and_vectorized_agree(tmp_path, options):
    _, cfg = _cfg(tmp_path, overrides=options)
    mmfl.run(cfg.replace(engine="sequential"), tmp_path / "seq")
    mmfl.run(cfg.replace(engine="vectorized"), tmp_path / "vec")
    rs, rv = _rows(tmp_path / "seq"), _rows(tmp_path / "vec")
    assert len(rs) == len(rv) == 6
    for x, y in zip(rs, rv):
        for col in ("round", "task", "clients", "slots", "local_trainings"):
            assert x[col] == y[col], (col, x, y)
        for col in ("accuracy", "loss"):
            assert abs(float(x[col]) - float(y[col])) <= METRIC_TOL, (col, x, y)


def test_resume_is_exact(tmp_path):
    _, cfg = _cfg(tmp_path, rounds=5, overrides=["sampler.within=optimal"])
    mmfl.run(cfg, tmp_path / "full")
    mmfl.run(cfg.replace(rounds=2), tmp_path / "part")
    mmfl.run(cfg, tmp_path / "part", resume=True)
    for f in ("metrics.csv", "rounds.csv"):
        assert (tmp_path / "part" / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f


def test_group_authors_config_is_their_setting():
    from testkit import ROOT

    cfg = load_config(ROOT / "configs" / "group_authors.toml",
                      ["sampler.name=group_pipeline", "sampler.within=optimal"])
    assert (cfg.clients.count, cfg.clients.active_rate, cfg.rounds) == (80, 0.1, 150)
    assert cfg.clients.tasks_per_client == 0 and cfg.clients.processors == 1
    assert cfg.variant == "authors" and len(cfg.tasks) == 3
    for t in cfg.tasks:
        assert (t.dataset, t.model, t.class_mask, t.lr, t.local_epochs, t.batch_size) == (
            "fashion_mnist", "authors_cnn", "zero", 0.01, 5, 500)
        assert t.partition.options["class_ratio"] == 0.3
        assert t.partition.options["sample_ranges"] == ((1.0, 120, 150),)
        assert (t.test_samples, t.test_subset) == (7000, "last")
    opts = cfg.sampler.options
    assert (opts["groups"], opts["grouping"], opts["within"], opts["probability"]) == (
        2, "label", "optimal", "authors")
