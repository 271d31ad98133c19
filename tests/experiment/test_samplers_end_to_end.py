"""Every sampler runs through the real runner; cost counters follow each method's definition."""

from __future__ import annotations

import json

import numpy as np
import pytest
from testkit import tiny_config_text

import mmfl
from mmfl import registry
from mmfl.experiment.config import load_config


def _cfg(tmp_path, sampler, rounds=3, overrides=()):
    p = tmp_path / f"{sampler}.toml"
    p.write_text(tiny_config_text(rounds=rounds, sampler=sampler), encoding="utf-8")
    return load_config(p, list(overrides))


ALL = sorted(registry.names("sampler"))


@pytest.mark.parametrize("sampler", ALL)
def test_sampler_runs_and_accounts_costs(tmp_path, sampler):
    summary = mmfl.run(_cfg(tmp_path, sampler), tmp_path / "r")
    assert summary["status"] == "completed"
    res = mmfl.read_results(tmp_path / "r")
    fed = json.loads((tmp_path / "r" / "federation.json").read_text())
    eligible_pairs = int((np.array(fed["n_samples"]) > 0).sum())
    for row in res.rounds:
        trainings, probes = int(row["local_trainings"]), int(row["forward_passes"])
        uploads, scalars = int(row["model_uploads"]), int(row["scalar_uploads"])
        if sampler in ("gvr", "stalevr"):
            assert trainings == eligible_pairs and scalars == eligible_pairs
        elif sampler in ("lvr", "fairvr"):
            assert probes == eligible_pairs and scalars == probes and trainings == uploads
        elif sampler == "stalevre" and row["round"] == "1":
            assert trainings == eligible_pairs == uploads  # round 0 initialises every h
        elif sampler == "scaffold":  # G and Delta c per active pair
            assert probes == 0 and scalars == 0 and uploads == 2 * trainings
        else:
            assert probes == 0 and scalars == 0 and trainings == uploads
        stale = sampler in ("stalevr", "stalevre", "fedvarp", "mifa", "fedstale", "scaffold")
        assert (int(row["stale_bytes"]) > 0) == stale
    for task in summary["tasks"].values():
        assert np.isfinite(task["accuracy"]) and np.isfinite(task["loss"])


@pytest.mark.parametrize("sampler", ["lvr", "stalevre", "stalevr", "fedstale", "scaffold"])
def test_stateful_samplers_resume_exactly(tmp_path, sampler):
    overrides = ["sampler.freshness=0.5"] if sampler == "lvr" else []
    full = _cfg(tmp_path, sampler, rounds=5, overrides=overrides)
    mmfl.run(full, tmp_path / "full")
    mmfl.run(full.replace(rounds=2), tmp_path / "part")
    mmfl.run(full, tmp_path / "part", resume=True)
    for f in ("metrics.csv", "rounds.csv"):
        assert (tmp_path / "part" / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f


def test_float16_stale_storage_halves_memory(tmp_path):
    a = mmfl.run(_cfg(tmp_path, "fedvarp", rounds=1), tmp_path / "a")
    b = mmfl.run(_cfg(tmp_path, "fedvarp", rounds=1, overrides=["stale_dtype=float16"]), tmp_path / "b")
    ra, rb = mmfl.read_results(tmp_path / "a").rounds, mmfl.read_results(tmp_path / "b").rounds
    assert int(ra[0]["stale_bytes"]) == 2 * int(rb[0]["stale_bytes"])
    assert a["status"] == b["status"] == "completed"


@pytest.mark.parametrize("sampler", ["random", "lvr", "fedvarp", "stalevre"])
def test_clients_and_models_join_and_leave(tmp_path, sampler):
    """clients.join_* / leave_* and tasks[].start_round / stop_round (the dynamic setting)."""
    cfg = _cfg(tmp_path, sampler, rounds=6, overrides=[
        "clients.join_fraction=0.5", "clients.join_round=2",
        "clients.leave_fraction=0.25", "clients.leave_round=4",
        "tasks[1].start_round=1", "tasks[0].stop_round=5"])
    mmfl.run(cfg, tmp_path / "r")
    res = mmfl.read_results(tmp_path / "r")
    available = [int(r["available"]) for r in res.rounds]
    assert available == [8, 8, 16, 16, 12, 12]  # 16 clients: half join at 2, a quarter leave at 4
    wave = {int(r["round"]): int(r["slots"]) for r in res.metrics if r["task"] == "wave"}
    digits = {int(r["round"]): int(r["slots"]) for r in res.metrics if r["task"] == "digits"}
    assert wave[1] == 0 and digits[6] == 0          # inactive models get no slot
    assert sum(wave.values()) > 0 and sum(digits.values()) > 0
    # an inactive model's parameters do not move: its loss is unchanged in its inactive rounds
    loss = {int(r["round"]): r["loss"] for r in res.metrics if r["task"] == "digits"}
    assert loss[5] == loss[6]


def test_every_sampler_runs_on_the_quickstart(tmp_path):
    """The shipped quickstart (or its offline twin without Fashion-MNIST), 2 rounds per sampler."""
    from pathlib import Path

    from testkit import ROOT

    fm = Path("/usr/share/datasets/fashion-mnist")
    name = "quickstart.toml" if any(fm.glob("train-images*")) else "quickstart_offline.toml"
    base = load_config(ROOT / "configs" / name, ["rounds=2"])
    from mmfl.experiment.compare import with_sampler

    for sampler in ALL:
        s = mmfl.run(with_sampler(base, sampler), tmp_path / sampler)
        assert s["status"] == "completed" and s["sampler"] == sampler
        assert all(np.isfinite(t["accuracy"]) for t in s["tasks"].values()), sampler
