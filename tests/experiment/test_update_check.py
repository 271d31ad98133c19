"""The server's update check (mmfl.experiment.update_check): non-finite and outlier updates are
rejected like missing pairs in every local engine, the global model is checked after every
apply, and summary.json stays valid JSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testkit import tiny_config_text

import mmfl
from mmfl.engines.base import TrainOutput
from mmfl.engines.sequential import SequentialEngine
from mmfl.engines.vectorized import VectorizedEngine
from mmfl.experiment.config import UpdateCheckConfig, load_config
from mmfl.experiment.update_check import MIN_FOR_MEDIAN, UpdateCheck

NAMES = ("a", "b")


def _out(rows_a, rows_b=None):
    """A TrainOutput of clients 0.. for task a (and b), updates given row by row."""
    ga = torch.tensor(rows_a, dtype=torch.float32)
    clients, tasks, updates = [*range(len(ga))], [0] * len(ga), {0: ga}
    if rows_b is not None:
        gb = torch.tensor(rows_b, dtype=torch.float32)
        clients += [*range(len(gb))]
        tasks += [1] * len(gb)
        updates[1] = gb
    n = len(clients)
    return TrainOutput(np.array(clients), np.array(tasks), updates, np.zeros(n),
                       np.ones(n, np.int64))


def _check(max_norm=0.0, ratio=0.0, action="reject"):
    return UpdateCheck(UpdateCheckConfig(max_norm, ratio, action), NAMES)


def test_finite_updates_pass_unchanged_as_the_same_object():
    out = _out([[1.0, 2.0], [3.0, 4.0]], [[0.5]])
    check = _check()
    assert check(out, 0) is out
    r = check.take()
    assert len(r.clients) == 0 and r.clipped == 0 and r.seen.tolist() == [2, 1]
    assert r.notes(NAMES) == [] and r.diverged() == []


def test_non_finite_rows_are_rejected_and_named():
    out = _out([[1.0, np.nan], [3.0, 4.0], [np.inf, 0.0]], [[0.5], [-np.inf]])
    check = _check()
    got = check(out, 4)
    assert got.rejected.tolist() == [True, False, True, False, True]
    kept = got.accepted()
    assert kept.clients.tolist() == [1, 0] and kept.tasks.tolist() == [0, 1]
    assert torch.equal(kept.updates[0], torch.tensor([[3.0, 4.0]]))
    r = check.take()
    assert list(zip(r.clients.tolist(), r.tasks.tolist())) == [(0, 0), (2, 0), (1, 1)]
    (note,) = r.notes(NAMES)
    assert note == ("3 updates rejected: a client 0 (non-finite), a client 2 (non-finite), "
                    "b client 1 (non-finite)")
    assert check.take().seen.tolist() == [0, 0]  # take() resets


def test_rows_whose_sum_overflows_are_not_mistaken_for_non_finite():
    big = 3e38  # finite float32; the row sum overflows to inf
    out = _out([[big, big], [1.0, 1.0]])
    assert _check()(out, 0) is out


def test_absolute_norm_limit_rejects_or_clips():
    rows = [[3.0, 4.0], [0.6, 0.8], [30.0, 40.0]]  # norms 5, 1, 50
    got = _check(max_norm=5.0)(_out(rows), 0)
    assert got.rejected.tolist() == [False, False, True]
    check = _check(max_norm=2.0, action="clip")
    got = check(_out(rows), 0)
    assert got.rejected is None
    norms = torch.linalg.vector_norm(got.updates[0], dim=1)
    assert norms.tolist() == pytest.approx([2.0, 1.0, 2.0], rel=1e-6)
    assert torch.allclose(got.updates[0][2], torch.tensor([1.2, 1.6]))  # direction kept
    assert check.take().notes(NAMES) == ["2 updates clipped to the norm limit"]


def test_ratio_limit_uses_the_median_of_the_models_updates_in_the_round():
    rows = [[1.0], [2.0], [3.0], [100.0]]  # median 2.5
    check = _check(ratio=10.0)
    got = check(_out(rows, [[1.0], [2.0]]), 0)
    assert got.rejected.tolist() == [False, False, False, True, False, False]
    assert check.take().reasons == ("norm 100 > 25",)
    few = [[1.0], [1000.0]][:MIN_FOR_MEDIAN - 1]  # too few updates for a median
    assert _check(ratio=10.0)(_out(few), 0).rejected is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=3, max_size=12),
       st.floats(0.1, 10.0))
def test_clipped_norms_never_exceed_the_limit(values, limit):
    rows = [[v, -v / 2] for v in values]
    got = _check(max_norm=limit, action="clip")(_out(rows), 0)
    norms = torch.linalg.vector_norm(got.updates[0].double(), dim=1).numpy()
    assert (norms <= limit * (1 + 1e-5)).all()
    original = np.linalg.norm(np.asarray(rows, np.float32).astype(np.float64), axis=1)
    under = original <= limit
    assert np.allclose(norms[under], original[under], rtol=1e-6)


def test_diverged_needs_every_update_of_a_model_non_finite_from_two_clients():
    check = _check()
    check(_out([[np.nan], [np.inf]], [[1.0]]), 0)
    assert check.take().diverged() == [0]
    check(_out([[np.nan], [1.0]]), 0)  # one faulty client among healthy ones
    assert check.take().diverged() == []
    check(_out([[np.nan]]), 0)  # a single update: not enough to call the training diverged
    assert check.take().diverged() == []


# -- end to end, every local engine ---------------------------------------------------------

def _cfg(tmp_path, engine, rounds=4, overrides=()):
    p = tmp_path / "cfg.toml"
    p.write_text(tiny_config_text(rounds=rounds), encoding="utf-8")
    return load_config(p, [f"engine={engine}", *overrides])


def _corrupt(monkeypatch, cls, value, round_=1, nth=0):
    """Make ``cls.train`` return ``value`` in every entry of the nth update of round_ (0-based)."""
    original = cls.train
    hit = []

    def train(self, params, clients, tasks, round, **kw):
        out = original(self, params, clients, tasks, round, **kw)
        if round == round_:
            s = int(out.tasks[nth])
            k = int(np.flatnonzero(out.tasks == s).tolist().index(nth))
            out.updates[s][k] = value
            hit.append((int(out.clients[nth]), s))
        return out

    monkeypatch.setattr(cls, "train", train)
    return hit


ENGINES = [("sequential", SequentialEngine), ("vectorized", VectorizedEngine)]


def _run_with_one_nan_update(tmp_path, monkeypatch, cls, cfg):
    """Run ``cfg`` into tmp_path / "r" with one update turned NaN in round 2: (summary,
    rounds.csv rows), after checking the run completed and the note names the update."""
    hit = _corrupt(monkeypatch, cls, float("nan"))
    summary = mmfl.run(cfg, tmp_path / "r")
    assert summary["status"] == "completed" and len(hit) == 1
    (client, task), name = hit[0], ("digits", "wave")[hit[0][1]]
    rounds = list(csv.DictReader(open(tmp_path / "r" / "rounds.csv")))
    assert f"{name} client {client} (non-finite)" in rounds[1]["note"]
    return summary, rounds


@pytest.mark.parametrize("engine, cls", ENGINES)
def test_a_nan_update_is_rejected_like_a_missing_pair(tmp_path, monkeypatch, engine, cls):
    cfg = _cfg(tmp_path, engine)
    clean = mmfl.run(cfg, tmp_path / "clean")
    summary, rounds = _run_with_one_nan_update(tmp_path, monkeypatch, cls, cfg)
    assert int(rounds[1]["missing"]) == 1 and int(rounds[0]["missing"]) == 0
    # trained and uploaded, counted the same in both tables
    per_task = [r for r in csv.DictReader(open(tmp_path / "r" / "metrics.csv"))
                if r["round"] == "2"]
    assert sum(int(r["local_trainings"]) for r in per_task) == int(rounds[1]["local_trainings"])
    for n in ("digits", "wave"):
        acc = summary["tasks"][n]["accuracy"]
        assert np.isfinite(acc) and acc > clean["tasks"][n]["accuracy"] - 0.15
    json.loads((tmp_path / "r" / "summary.json").read_text())


@pytest.mark.parametrize("engine, cls", ENGINES)
def test_a_rejected_update_of_the_full_computation_counts_as_missing(tmp_path, monkeypatch,
                                                                    engine, cls):
    """gvr trains every eligible pair before it allocates (the full computation). An update
    the check rejects there takes its client out of the round and counts in rounds.csv's
    ``missing`` like any missing pair, once; its training is still counted as done."""
    cfg = _cfg(tmp_path, engine, overrides=['sampler.name="gvr"'])
    summary, rounds = _run_with_one_nan_update(tmp_path, monkeypatch, cls, cfg)
    assert [int(r["missing"]) for r in rounds] == [0, 1, 0, 0]
    per_task = [r for r in csv.DictReader(open(tmp_path / "r" / "metrics.csv"))
                if r["round"] == "2"]
    assert sum(int(r["local_trainings"]) for r in per_task) == int(rounds[1]["local_trainings"])


@pytest.mark.parametrize("engine, cls", ENGINES)
def test_a_huge_update_is_rejected_by_the_ratio_limit(tmp_path, monkeypatch, engine, cls):
    cfg = _cfg(tmp_path, engine, overrides=["server.max_norm_ratio=10"])
    clean = mmfl.run(cfg, tmp_path / "clean")
    _corrupt(monkeypatch, cls, 1e30)
    summary = mmfl.run(cfg, tmp_path / "r")
    rounds = list(csv.DictReader(open(tmp_path / "r" / "rounds.csv")))
    assert "1 updates rejected" in rounds[1]["note"] and "norm 1.7" not in rounds[0]["note"]
    assert "> " in rounds[1]["note"]
    for n in ("digits", "wave"):
        assert summary["tasks"][n]["accuracy"] > clean["tasks"][n]["accuracy"] - 0.15


def test_without_a_limit_a_huge_update_moves_the_model(tmp_path, monkeypatch):
    """The limit is what protects the model: the same corruption without it is accepted, and
    the training it poisons stops the run (exit 1) instead of completing with a broken model."""
    cfg = _cfg(tmp_path, "vectorized")
    _corrupt(monkeypatch, VectorizedEngine, 1e30)
    with pytest.raises(mmfl.NumericalError, match="non-finite"):
        mmfl.run(cfg, tmp_path / "r")
    rounds = list(csv.DictReader(open(tmp_path / "r" / "rounds.csv")))
    assert len(rounds) == 1  # round 1 kept; round 2 accepted the update and broke the model


def test_a_non_finite_global_model_ends_the_run_naming_the_round(tmp_path):
    cfg = _cfg(tmp_path, "vectorized", rounds=1, overrides=["server.lr=1e38"])
    with pytest.raises(mmfl.NumericalError, match=r"round 1: the global model of \w+ (is|gives "
                                                  "a) non-finite"):
        mmfl.run(cfg, tmp_path / "r")
    text = (tmp_path / "r" / "summary.json").read_text()
    summary = json.loads(text)  # valid JSON: no NaN literal
    assert "NaN" not in text and "Infinity" not in text
    assert summary["status"] == "failed" and "non-finite" in summary["error"]


def test_limits_are_validated_and_stay_out_of_config_toml_at_their_defaults(tmp_path):
    cfg = _cfg(tmp_path, "vectorized")
    assert cfg.to_dict()["server"] == {"lr": 1.0}
    on = cfg.replace(**{"server.max_update_norm": 5.0, "server.norm_action": "clip"})
    assert on.to_dict()["server"] == {"lr": 1.0, "max_update_norm": 5.0, "norm_action": "clip"}
    with pytest.raises(mmfl.ConfigError, match="server.norm_action: must be one of"):
        cfg.replace(**{"server.norm_action": "drop"})
    with pytest.raises(mmfl.ConfigError, match="server.max_norm_ratio: must be >= 0"):
        cfg.replace(**{"server.max_norm_ratio": -1.0})
