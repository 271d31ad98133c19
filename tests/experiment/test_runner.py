"""The round loop: run directory contents, determinism, checkpoint and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from testkit import ROOT, tiny_config_text

import mmfl
from mmfl.errors import ResultsError
from mmfl.experiment.config import load_config


def _cfg(tmp_path, rounds=4, sampler="random", overrides=()):
    p = tmp_path / f"cfg-{rounds}-{sampler}.toml"
    p.write_text(tiny_config_text(rounds=rounds, sampler=sampler), encoding="utf-8")
    return load_config(p, list(overrides))


def test_run_directory_contents(tmp_path):
    cfg = _cfg(tmp_path)
    summary = mmfl.run(cfg, tmp_path / "r")
    r = mmfl.read_results(tmp_path / "r")
    assert r.summary == summary
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    rows = r.metrics
    assert [(int(x["round"]), x["task"]) for x in rows] == [
        (t, n) for t in range(1, 5) for n in ("digits", "wave")]
    accs = {n: float(summary["tasks"][n]["accuracy"]) for n in ("digits", "wave")}
    assert summary["mean_accuracy"] == pytest.approx(np.mean(list(accs.values())))
    assert summary["min_accuracy"] == pytest.approx(min(accs.values()))
    # cost counters agree between the per-task and per-round tables
    rounds = r.rounds
    assert len(rounds) == 4
    for rr in rounds:
        per_task = [x for x in rows if x["round"] == rr["round"]]
        assert sum(int(x["local_trainings"]) for x in per_task) == int(rr["local_trainings"])
        assert int(rr["model_uploads"]) == int(rr["local_trainings"])
        assert int(rr["slots"]) == sum(int(x["slots"]) for x in per_task)
        assert int(rr["slots"]) >= int(rr["local_trainings"])
    fed = json.loads((tmp_path / "r" / "federation.json").read_text())
    assert fed["clients"] == 16 and len(fed["capacity"]) == 16
    assert r.config["sampler"]["name"] == "random"


def test_same_config_and_seed_gives_byte_identical_metrics(tmp_path):
    cfg = _cfg(tmp_path)
    mmfl.run(cfg, tmp_path / "a")
    mmfl.run(cfg, tmp_path / "b")
    for f in ("metrics.csv", "rounds.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    mmfl.run(cfg.replace(seed=4), tmp_path / "c")
    assert (tmp_path / "a" / "metrics.csv").read_bytes() != (tmp_path / "c" / "metrics.csv").read_bytes()


def test_eval_every_leaves_unevaluated_rounds_empty_and_evaluates_last(tmp_path):
    cfg = _cfg(tmp_path, rounds=5, overrides=["eval_every=2"])
    mmfl.run(cfg, tmp_path / "r")
    rows = mmfl.read_results(tmp_path / "r").metrics
    evaluated = sorted({int(x["round"]) for x in rows if x["accuracy"] != ""})
    assert evaluated == [2, 4, 5]
    assert len(rows) == 10


def test_refuses_to_overwrite_a_run(tmp_path):
    cfg = _cfg(tmp_path)
    mmfl.run(cfg, tmp_path / "r")
    before = (tmp_path / "r" / "metrics.csv").read_bytes()
    with pytest.raises(ResultsError, match="already holds a run"):
        mmfl.run(cfg, tmp_path / "r")
    assert (tmp_path / "r" / "metrics.csv").read_bytes() == before
    with pytest.raises(ResultsError, match=r"config differs .*seed"):
        mmfl.run(cfg.replace(seed=9), tmp_path / "r", resume=True)


def test_resume_extends_a_run_and_discards_torn_rows(tmp_path):
    """A run stopped after 3 rounds (with a torn half row, as a kill mid-write leaves) and then
    resumed to 6 rounds writes exactly what an uninterrupted 6-round run writes."""
    full = _cfg(tmp_path, rounds=6)
    mmfl.run(full, tmp_path / "full")
    mmfl.run(full.replace(rounds=3), tmp_path / "part")
    with open(tmp_path / "part" / "metrics.csv", "a") as f:
        f.write("4,digits,0.1")  # torn row of an unfinished round
    mmfl.run(full, tmp_path / "part", resume=True)
    for f in ("metrics.csv", "rounds.csv"):
        assert (tmp_path / "part" / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "part" / "summary.json").read_text())
    for k in ("mean_accuracy", "min_accuracy", "tasks", "cost", "mean_accuracy_window"):
        assert a[k] == b[k], k


def test_resume_restores_stateful_sampler(tmp_path):
    """fedfair reads the last losses: they come back from the checkpoint."""
    full = _cfg(tmp_path, rounds=5, sampler="fedfair")
    mmfl.run(full, tmp_path / "full")
    mmfl.run(full.replace(rounds=2), tmp_path / "part")
    mmfl.run(full, tmp_path / "part", resume=True)
    assert (tmp_path / "part" / "metrics.csv").read_bytes() == (tmp_path / "full" / "metrics.csv").read_bytes()


@pytest.mark.parametrize("kill_after_rows", [2, 5])
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, kill_after_rows):
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(tiny_config_text(rounds=14), encoding="utf-8")
    mmfl.run(load_config(cfg_path), tmp_path / "ref")

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mmfl.cli", "run", str(cfg_path), "--out", str(out),
           "--progress", "none"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rounds_file = out / "rounds.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if rounds_file.exists() and rounds_file.read_text().count("\n") > kill_after_rows:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = rounds_file.read_text().count("\n") - 1
    assert done < 14
    r = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for f in ("metrics.csv", "rounds.csv"):
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_checkpoint_loads_without_pickle(tmp_path):
    from safetensors.numpy import load_file

    mmfl.run(_cfg(tmp_path, rounds=2), tmp_path / "r")
    arrays = load_file(str(tmp_path / "r" / "checkpoint.safetensors"))
    assert {"param.0", "param.1"} <= set(arrays)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())


def test_non_finite_updates_stop_with_a_clear_error_and_keep_results(tmp_path):
    cfg = _cfg(tmp_path, rounds=6, overrides=["tasks[0].lr=1e30"])
    with pytest.raises(mmfl.NumericalError, match=r"round \d+: every update of digits was non-finite"):
        mmfl.run(cfg, tmp_path / "r")
    assert (tmp_path / "r" / "config.toml").exists()
    with open(tmp_path / "r" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert header[:4] == ["round", "task", "accuracy", "loss"]


@pytest.mark.parametrize("override, key", [
    ("tasks[1].model=cnn", "tasks[1].model"),               # cnn on 1-D data
    ("tasks[1].dataset_options.num_samples=1", "task wave"),  # empty test split
])
def test_model_and_data_errors_surface_before_anything_is_written(tmp_path, override, key):
    cfg = _cfg(tmp_path, overrides=[override])
    with pytest.raises(mmfl.MmflError, match=key.replace("[", r"\[").replace("]", r"\]")):
        mmfl.run(cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_write_failure_is_a_one_line_results_error(tmp_path):
    (tmp_path / "r" / "federation.json").mkdir(parents=True)
    (tmp_path / "r" / ".mmfl-run").write_text("")  # an mmfl folder, else ownership fails first
    with pytest.raises(ResultsError, match=r"federation\.json(\.tmp)?: cannot write results"):
        mmfl.run(_cfg(tmp_path), tmp_path / "r")


def test_failed_run_records_its_status(tmp_path):
    cfg = _cfg(tmp_path, rounds=6, overrides=["tasks[0].lr=1e30"])
    with pytest.raises(mmfl.NumericalError):
        mmfl.run(cfg, tmp_path / "r")
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["status"] == "failed" and "non-finite" in s["error"]


def test_resume_refuses_another_data_folder(tmp_path):
    cfg = _cfg(tmp_path, rounds=2)
    mmfl.run(cfg, tmp_path / "r")
    with pytest.raises(ResultsError, match="another config or data folder"):
        mmfl.run(cfg.replace(rounds=3), tmp_path / "r", resume=True, data_dir=str(tmp_path))


def test_extending_a_run_with_a_forced_final_evaluation_is_refused(tmp_path):
    cfg = _cfg(tmp_path, rounds=3, overrides=["eval_every=2"])
    mmfl.run(cfg, tmp_path / "r")
    with pytest.raises(ResultsError, match="not a multiple of eval_every"):
        mmfl.run(cfg.replace(rounds=6), tmp_path / "r", resume=True)


def test_seeds_beyond_32_bits_are_distinct(tmp_path):
    cfg = _cfg(tmp_path, rounds=1)
    mmfl.run(cfg.replace(seed=1), tmp_path / "a")
    mmfl.run(cfg.replace(seed=1 + 2**32), tmp_path / "b")
    assert (tmp_path / "a" / "metrics.csv").read_bytes() != (tmp_path / "b" / "metrics.csv").read_bytes()


def test_virtual_clock_and_stragglers(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,speed,bandwidth,availability\n"
                     + "".join(f"{i},{1.0 if i % 2 else 0.25},{1e6},1.0\n" for i in range(16)))
    cfg = _cfg(tmp_path, rounds=4, overrides=[f'system.trace="{trace}"'])
    s = mmfl.run(cfg, tmp_path / "a")
    rows = mmfl.read_results(tmp_path / "a").rounds
    secs = [float(r["sim_seconds"]) for r in rows]
    assert all(x > 0 for x in secs) and int(rows[-1]["stragglers"]) == 0
    assert float(rows[-1]["sim_time"]) == pytest.approx(sum(secs), abs=1e-5)  # 6 decimals in CSV
    assert s["sim_time"] == pytest.approx(sum(secs), abs=1e-5)
    assert set(s["time_to_accuracy"]) == {"digits", "wave"}
    # a deadline below every pair's time drops every update: the models never move
    tight = cfg.replace(**{"system.deadline": 1e-9})
    s2 = mmfl.run(tight, tmp_path / "b")
    res = mmfl.read_results(tmp_path / "b")
    assert all(int(r["stragglers"]) == int(r["local_trainings"]) for r in res.rounds)
    losses = {r["loss"] for r in res.metrics if r["task"] == "digits"}
    assert len(losses) == 1 and s2["sim_time"] == pytest.approx(4e-9)


@pytest.mark.parametrize("content, fragment", [
    ("client,speed\n0,1\n", "needs the columns"),
    ("client,speed,bandwidth,availability\n0,1,1e6,1\n", "no row for client 1"),
    ("client,speed,bandwidth,availability\n99,1,1e6,1\n", "outside 0..15"),
    ("client,speed,bandwidth,availability\n0,-1,1e6,1\n", "must be > 0"),
])
def test_bad_trace_files_are_one_line_errors(tmp_path, content, fragment):
    trace = tmp_path / "t.csv"
    trace.write_text(content)
    with pytest.raises(mmfl.DataError, match=fragment):
        mmfl.run(_cfg(tmp_path, overrides=[f'system.trace="{trace}"']), tmp_path / "r")
    assert not (tmp_path / "r").exists()
