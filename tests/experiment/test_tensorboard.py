"""[logging] tensorboard: the rounds as TensorBoard event files, read back with tensorboard's
own reader."""

from __future__ import annotations

import csv

import pytest
from testkit import run_cli, tiny_config_text

import mmfl
from mmfl.experiment.config import load_config

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_files_hold_the_rounds_of_metrics_csv(tmp_path):
    p = tmp_path / "cfg.toml"
    p.write_text(tiny_config_text(rounds=3), encoding="utf-8")
    cfg = load_config(p, [f'logging.tensorboard="{tmp_path / "tb"}"'])
    mmfl.run(cfg, tmp_path / "r")
    got = _scalars(tmp_path / "tb")
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    for task in ("digits", "wave"):
        want = [(int(r["round"]), float(r["accuracy"])) for r in rows if r["task"] == task]
        assert [s for s, _ in got[f"accuracy/{task}"]] == [s for s, _ in want]
        assert [v for _, v in got[f"accuracy/{task}"]] == pytest.approx([v for _, v in want], abs=1e-6)
        assert len(got[f"clients/{task}"]) == 3
    rounds = list(csv.DictReader(open(tmp_path / "r" / "rounds.csv")))
    assert [v for _, v in got["cost/local_trainings"]] == [int(r["local_trainings"])
                                                          for r in rounds]
    assert {"accuracy/mean", "accuracy/worst", "sim_time", "seconds/round"} <= set(got)
    # an execution setting: not in config.toml's fingerprinted part, may change on resume
    assert "logging" in mmfl.read_results(tmp_path / "r").config
    more = load_config(p, [f'logging.tensorboard="{tmp_path / "tb2"}"', "rounds=4"])
    mmfl.run(more, tmp_path / "r", resume=True)
    assert [s for s, _ in _scalars(tmp_path / "tb2")["accuracy/digits"]] == [4]


def test_cli_flag(tmp_path):
    p = tmp_path / "cfg.toml"
    p.write_text(tiny_config_text(rounds=1), encoding="utf-8")
    r = run_cli("run", str(p), "--out", str(tmp_path / "r"), "--tensorboard",
                str(tmp_path / "tb"), "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert "accuracy/digits" in _scalars(tmp_path / "tb")
    assert "[logging]" not in (tmp_path / "cfg.toml").read_text()
