"""Sweeps: grid parsing, planning (up-front validation), worker processes, resume, failures."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
from testkit import ROOT, run_cli, tiny_config_text

import mmfl
from mmfl.errors import ConfigError, ResultsError
from mmfl.experiment.config import load_config
from mmfl.experiment.sweep import (SweepCallback, parse_grid, parse_seeds, plan_sweep,
                                   run_sweep)

NAMES = [f"sampler.name={s}/seed={k}" for s in ("random", "full") for k in (1, 2)]


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(tiny_config_text(rounds=3), encoding="utf-8")
    return p


def test_parse_grid_values_and_errors():
    g = parse_grid(["sampler.name=gvr, random", "clients.active_rate=0.1,0.2",
                    "clients.processors={1 = 0.5, 2 = 0.5},2", "tasks[0].lr=1e-2"])
    assert g == {"sampler.name": ["gvr", "random"], "clients.active_rate": [0.1, 0.2],
                 "clients.processors": [{"1": 0.5, "2": 0.5}, 2], "tasks[0].lr": [0.01]}
    for bad in (["sampler.name"], ["=1,2"], ["sampler.name=gvr,"], ["seed=1,2"],
                ["rounds=1", "rounds=2"], ["rounds=1,1"]):
        with pytest.raises(ConfigError) as e:
            parse_grid(bad)
        assert e.value.key == "--grid"
    assert parse_seeds("3, 1") == [3, 1]
    for bad in ("1,x", "", "-1", "1,1"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def test_plan_validates_every_combination_before_anything_runs(cfg, tmp_path):
    base = load_config(cfg)
    out = tmp_path / "sw"
    plan = plan_sweep(base, parse_grid(["sampler.name=random,gvr", "clients.active_rate=0.2,0.4"]),
                      [5, 6], out)
    assert len(plan.runs) == 8 and not out.exists()
    first = plan.runs[0]
    assert first.name == "sampler.name=random/clients.active_rate=0.2/seed=5"
    assert first.config.seed == 5 and first.config.clients.active_rate == 0.2
    assert {r.config.sampler.name for r in plan.runs} == {"random", "gvr"}
    # gvr's option alpha is not an option of random: only that combination is invalid
    with pytest.raises(ConfigError, match="sampler.alpha"):
        plan_sweep(base, parse_grid(["sampler.name=gvr,random", "sampler.alpha=0.5"]), [1], out)
    for grid, key in ((["clients.active_rate=0.5,7"], "clients.active_rate"),
                      (["sampler.name=random,nope"], "sampler.name"), (["nosuch.key=1"], "nosuch")):
        with pytest.raises(ConfigError) as e:
            plan_sweep(base, parse_grid(grid), [1], out)
        assert e.value.key == key
    assert not out.exists()
    # a run folder holding a run of another config is refused up front
    mmfl.run(base.replace(seed=1), out / "seed=1")
    with pytest.raises(ResultsError, match="differs"):
        plan_sweep(base.replace(**{"clients.active_rate": 0.5}), {}, [1], out)


def test_sweep_cli_with_workers_and_second_invocation_skips_all(cfg, tmp_path):
    out = tmp_path / "sw"
    args = ("sweep", str(cfg), "--grid", "sampler.name=random,full", "--seeds", "1,2",
            "--jobs", "2", "--out", str(out))
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "4 completed, 0 skipped" in r.stdout and "[4/4]" in r.stderr
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["runs"]) == sorted(NAMES) and index["failures"] == []
    for name in NAMES:
        s = json.loads((out / name / "summary.json").read_text())
        assert s["status"] == "completed" and s["rounds_completed"] == 3
        assert f"sampler.name={s['sampler']}/seed={s['seed']}" == name
        assert index["runs"][name]["overrides"] == {"sampler.name": s["sampler"]}
        assert index["runs"][name]["status"] == "completed"
    stamps = {n: (out / n / "metrics.csv").stat().st_mtime_ns for n in NAMES}
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "0 completed, 4 skipped" in r.stdout and r.stderr.count("skipped") == 4
    assert stamps == {n: (out / n / "metrics.csv").stat().st_mtime_ns for n in NAMES}


class _Recorder(SweepCallback):
    def __init__(self):
        self.ends, self.updates, self.final = [], 0, None

    def on_update(self, progress):
        self.updates += 1
        assert progress.done < progress.total and progress.running

    def on_run_end(self, progress, outcome):
        self.ends.append((outcome.name, outcome.status, progress.done))

    def on_end(self, progress):
        self.final = (progress.done, progress.total, progress.skipped, progress.failed)


class _StopAfter:
    """A runner callback that interrupts the run after ``n`` rounds (like Ctrl-C)."""

    def __init__(self, n):
        self.n = n

    def on_start(self, cfg, federation, start_round):
        pass

    def on_round(self, record):
        if record.round == self.n:
            raise KeyboardInterrupt

    def on_end(self, summary):
        pass


def test_interrupted_run_is_resumed_and_finished_ones_skipped(cfg, tmp_path):
    out = tmp_path / "sw"
    plan = plan_sweep(load_config(cfg), {"sampler.name": ["random", "full"]}, [1, 2], out)
    done, cut = plan.runs[0], plan.runs[3]
    mmfl.run(done.config, out / done.name)
    with pytest.raises(KeyboardInterrupt):
        mmfl.run(cut.config, out / cut.name, callbacks=[_StopAfter(2)])
    assert json.loads((out / cut.name / "summary.json").read_text())["status"] == "interrupted"
    stamp = (out / done.name / "metrics.csv").stat().st_mtime_ns
    rec = _Recorder()
    result = run_sweep(plan, callbacks=[rec])
    status = {o.name: (o.status, o.start_round) for o in result.outcomes}
    assert status == {done.name: ("skipped", 3), plan.runs[1].name: ("completed", 0),
                      plan.runs[2].name: ("completed", 0), cut.name: ("completed", 2)}
    assert (out / done.name / "metrics.csv").stat().st_mtime_ns == stamp
    assert rec.final == (4, 4, 1, 0) and [e[2] for e in rec.ends] == [1, 2, 3, 4]
    assert rec.updates >= 3 * 2
    # the resumed run equals an uninterrupted one
    mmfl.run(cut.config, tmp_path / "whole")
    assert ((out / cut.name / "metrics.csv").read_text()
            == (tmp_path / "whole" / "metrics.csv").read_text())
    assert result.summaries[3]["mean_accuracy"] == pytest.approx(
        json.loads((tmp_path / "whole" / "summary.json").read_text())["mean_accuracy"])


def test_failing_combination_does_not_stop_the_others(cfg, tmp_path):
    out = tmp_path / "sw"
    r = run_cli("sweep", str(cfg), "--grid", "tasks[0].lr=0.1,1e38", "--grid",
                "sampler.name=random,full", "--seeds", "1", "--out", str(out))
    assert r.returncode == 1, r.stderr
    bad = [f"tasks[0].lr=1e+38/sampler.name={s}/seed=1" for s in ("random", "full")]
    good = [f"tasks[0].lr=0.1/sampler.name={s}/seed=1" for s in ("random", "full")]
    assert "2 completed, 0 skipped (finished before), 2 failed" in r.stdout
    for name in bad:
        assert re.search(rf"failed: {re.escape(name)}: round \d+: .*digits", r.stderr)
    assert "Traceback" not in r.stderr
    index = json.loads((out / "index.json").read_text())
    assert sorted(f["name"] for f in index["failures"]) == sorted(bad)
    assert all("non-finite" in f["error"] for f in index["failures"])
    for name in good:
        assert json.loads((out / name / "summary.json").read_text())["status"] == "completed"
        assert index["runs"][name]["status"] == "completed"


@pytest.mark.parametrize("grid, key", [
    ("sampler.bogus=1,2", "sampler.bogus"),
    ("clients.active_rate=0.5,x", "clients.active_rate"),
    ("sampler.name", "--grid"),
])
def test_bad_grid_exits_2_naming_the_key_before_running(cfg, tmp_path, grid, key):
    out = tmp_path / "sw"
    r = run_cli("sweep", str(cfg), "--grid", "sampler.name=random,full", "--grid", grid,
                "--seeds", "1", "--out", str(out))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mmfl: error: {key}")
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_stops_worker_runs_after_their_round_and_the_sweep_resumes(cfg, tmp_path):
    out = tmp_path / "sw"
    args = ["sweep", str(cfg), "--set", "rounds=30", "--grid", "sampler.name=random,full",
            "--seeds", "1,2", "--jobs", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.Popen([sys.executable, "-m", "mmfl.cli", *args], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/*/metrics.csv")):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "run the same command again" in err and "Traceback" not in err
    states = [json.loads(s.read_text())["status"] for s in out.glob("*/*/summary.json")]
    assert "interrupted" in states and "running" not in states and len(states) < 4
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "resumed after round" in r.stderr
    for s in out.glob("*/*/summary.json"):
        assert json.loads(s.read_text())["status"] == "completed"
