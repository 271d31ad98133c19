"""Run directories as pandas DataFrames: RunResults.to_frame and mmfl.collect (the contract of
issue 15), and the short reprs of results."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys

import pandas as pd  # the analysis extra: scripts/setup.sh installs it for the tests
import pytest
from testkit import ROOT, tiny_config_text

import mmfl
from mmfl.errors import ConfigError, MmflError, ResultsError
from mmfl.experiment import tomlio
from mmfl.experiment.config import load_config
from mmfl.experiment.frames import config_value
from mmfl.experiment.results import METRICS_COLUMNS, ROUNDS_COLUMNS
from mmfl.experiment.sweep import plan_sweep, run_sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2 x 2 sweep (sampler x processors) with seeds 1, 2; 3 rounds, evaluated every 2."""
    tmp = tmp_path_factory.mktemp("frames")
    cfg = tmp / "tiny.toml"
    cfg.write_text(tiny_config_text(rounds=3), encoding="utf-8")
    base = load_config(cfg, ["eval_every=2"])
    grid = {"sampler.name": ["random", "full"], "clients.processors": [{"1": 0.5, "2": 0.5}, 2]}
    plan = plan_sweep(base, grid, [2, 1], tmp / "sw")
    result = run_sweep(plan)
    assert not result.failures
    # a lone run beside the sweep (not part of any sweep)
    mmfl.run(base.replace(seed=7, rounds=2), tmp / "lone")
    return tmp, plan, result


def _csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_to_frame_metrics_rounds_summary(sweep):
    tmp, plan, _ = sweep
    run_dir = plan.out / plan.runs[0].name
    res = mmfl.read_results(run_dir)
    m = res.to_frame("metrics")
    assert list(m.columns) == list(METRICS_COLUMNS) and m.shape == (3 * 2, 9)
    for c in METRICS_COLUMNS:
        if c != "task":
            assert pd.api.types.is_numeric_dtype(m[c]), c
    assert m["round"].dtype == "int64" and m["clients"].dtype == "int64"
    assert list(m["task"]) == ["digits", "wave"] * 3
    # round 1 was not evaluated: empty cells are NaN; the others equal the CSV's numbers
    assert m.loc[m["round"] == 1, "accuracy"].isna().all()
    assert m.loc[m["round"] == 1, "train_loss"].notna().all()
    rows = _csv(run_dir / "metrics.csv")
    for (_, got), want in zip(m.iterrows(), rows):
        for c in ("accuracy", "loss", "train_loss", "slots"):
            assert (math.isnan(got[c]) if want[c] == "" else got[c] == float(want[c])), (c, want)
    r = res.to_frame("rounds")
    assert list(r.columns) == list(ROUNDS_COLUMNS) and len(r) == 3
    assert r["note"].map(type).eq(str).all()
    assert all(pd.api.types.is_numeric_dtype(r[c]) for c in ROUNDS_COLUMNS if c != "note")
    assert list(r["round"]) == [1, 2, 3] and r["sim_time"].is_monotonic_increasing
    s = res.to_frame("summary")
    assert len(s) == 1 and s.loc[0, "status"] == "completed"
    assert s.loc[0, "tasks.digits.accuracy"] == res.summary["tasks"]["digits"]["accuracy"]
    assert s.loc[0, "cost.local_trainings"] == res.summary["cost"]["local_trainings"]
    # time_to_accuracy: the same two columns per task and target whether reached or not
    for task in ("digits", "wave"):
        for target in ("0.5", "0.9"):
            for field in ("round", "sim_time"):
                col = f"time_to_accuracy.{task}.{target}.{field}"
                assert pd.api.types.is_numeric_dtype(s[col]), col
    assert s["time_to_accuracy.wave.0.9.round"].isna().all()
    with pytest.raises(ConfigError, match="table: must be one of metrics, rounds, summary"):
        res.to_frame("timing")


def test_collect_adds_grid_keys_and_seed_in_grid_order(sweep):
    tmp, plan, _ = sweep
    df = mmfl.collect(plan.out)
    assert list(df.columns[:4]) == ["run", "sampler.name", "clients.processors", "seed"]
    assert list(df.columns[4:]) == list(METRICS_COLUMNS)
    assert len(df) == 8 * 3 * 2
    # runs in the sweep's (grid) order, not alphabetical
    order = list(dict.fromkeys(df["run"]))
    assert order == [str(plan.out / r.name) for r in plan.runs]
    assert list(dict.fromkeys(df["sampler.name"])) == ["random", "full"]
    # a table value is its TOML text, a number stays a number
    assert set(df["clients.processors"]) == {tomlio.scalar({"1": 0.5, "2": 0.5}), 2}
    assert df["seed"].dtype == "int64" and set(df["seed"]) == {1, 2}
    for r in plan.runs:  # every row carries its run's values
        mine = df[df["run"] == str(plan.out / r.name)]
        assert (mine["seed"] == r.seed).all()
        assert (mine["sampler.name"] == r.overrides["sampler.name"]).all()
        assert len(mine) == 6
    # one DataFrame per question: mean final accuracy per sampler
    final = df[df["round"] == 3].groupby("sampler.name")["accuracy"].mean()
    assert set(final.index) == {"random", "full"} and final.notna().all()
    s = mmfl.collect([plan.out], table="summary")
    assert len(s) == 8 and list(s.columns[:4]) == ["run", "sampler.name", "clients.processors",
                                                   "seed"]
    assert pd.api.types.is_numeric_dtype(s["mean_accuracy"])
    want = {str(plan.out / r.name): json.loads((plan.out / r.name / "summary.json").read_text())
            for r in plan.runs}
    for _, row in s.iterrows():
        assert row["mean_accuracy"] == want[row["run"]]["mean_accuracy"]
    rounds = mmfl.collect(plan.out, table="rounds")
    assert len(rounds) == 8 * 3 and "note" in rounds.columns


def test_collect_of_single_run_dirs_and_a_lone_run(sweep):
    tmp, plan, _ = sweep
    inside = plan.out / plan.runs[-1].name  # a run directory of the sweep, given by itself
    df = mmfl.collect([inside, tmp / "lone"], table="summary")
    assert list(df["run"]) == [str(inside), str(tmp / "lone")]
    # the lone run is in no sweep: its grid values come from its config.toml
    assert list(df["sampler.name"]) == [plan.runs[-1].overrides["sampler.name"], "random"]
    assert list(df["seed"]) == [plan.runs[-1].seed, 7]
    assert list(df["rounds_completed"]) == [3, 2]
    lone = mmfl.collect(tmp / "lone")
    assert list(lone.columns[:2]) == ["run", "seed"] and len(lone) == 2 * 2
    with pytest.raises(ResultsError, match="no such run directory"):
        mmfl.collect(tmp / "absent")
    with pytest.raises(ConfigError):
        mmfl.collect(tmp / "lone", table="metric")


def test_damaged_cell_names_the_file(sweep, tmp_path):
    import shutil

    tmp, plan, _ = sweep
    run_dir = tmp_path / "copy"
    shutil.copytree(plan.out / plan.runs[0].name, run_dir)
    text = (run_dir / "metrics.csv").read_text().splitlines()
    cells = text[2].split(",")
    cells[2] = "0.5x"
    text[2] = ",".join(cells)
    (run_dir / "metrics.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(ResultsError, match=r"metrics.csv: column accuracy .*'0.5x'"):
        mmfl.read_results(run_dir).to_frame("metrics")


def test_index_json_damaged_or_foreign(sweep, tmp_path):
    import shutil

    tmp, plan, _ = sweep
    folder = tmp_path / "sw"
    shutil.copytree(plan.out / plan.runs[0].name, folder / "a")
    (folder / "index.json").write_text("{not json")
    with pytest.raises(ResultsError, match=r"index.json: not a JSON object"):
        mmfl.collect(folder)
    # above a run given by itself, an index.json that is not a sweep's is not ours: ignored
    (folder / "index.json").write_text('{"pages": []}')
    df = mmfl.collect(folder / "a", table="summary")
    assert list(df.columns[:2]) == ["run", "seed"] and len(df) == 1


def test_without_pandas_the_error_names_the_extra(sweep, monkeypatch):
    tmp, plan, _ = sweep
    res = mmfl.read_results(plan.out / plan.runs[0].name)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    for call in (lambda: res.to_frame("metrics"), lambda: mmfl.collect(plan.out)):
        with pytest.raises(MmflError) as e:
            call()
        assert "mmfl[analysis]" in str(e.value) and "\n" not in str(e.value)


def test_config_value_addresses_tasks_by_index_and_name():
    config = {"seed": 3, "sampler": {"name": "gvr"},
              "tasks": [{"name": "a", "lr": 0.1}, {"name": "b", "lr": 0.2}]}
    assert config_value(config, "sampler.name") == "gvr"
    assert config_value(config, "tasks[1].lr") == 0.2
    assert config_value(config, "tasks.0.lr") == 0.1
    assert config_value(config, "tasks.b.lr") == 0.2
    assert config_value(config, "tasks.c.lr") is None
    assert config_value(config, "nosuch.key") is None


def test_reprs_are_one_short_line(sweep):
    tmp, plan, result = sweep
    res = mmfl.read_results(plan.out / plan.runs[0].name)
    text = repr(res)
    assert text == (f"RunResults({str(plan.out / plan.runs[0].name)!r}, tasks=[digits, wave], "
                    "rounds=3/3, status=completed)")
    r = repr(result)
    assert "\n" not in r and len(r) < 300 and "[[tasks]]" not in r
    assert r.startswith(f"SweepResult({str(plan.out)!r}, runs=8, tasks=[digits, wave], rounds=3")
    assert "8 completed, 0 skipped, 0 failed" in r or "0 completed, 8 skipped, 0 failed" in r
    p = repr(plan)
    assert "\n" not in p and len(p) < 300
    assert "grid=[sampler.name=2, clients.processors=2]" in p and "seeds=[2, 1]" in p
    assert "\n" not in repr(plan.runs[0]) and len(repr(result.outcomes[0])) < 200


@pytest.mark.slow
def test_readme_pandas_workflow_runs(tmp_path):
    """The README's "Results in pandas" script, on the tiny config with 2 rounds."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Results in pandas", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert "mmfl.collect(" in code and ".savefig(" in code and "jobs=2" in code
    (tmp_path / "tiny.toml").write_text(tiny_config_text(rounds=2), encoding="utf-8")
    code = code.replace("configs/quickstart.toml", "tiny.toml").replace("rounds=20", "rounds=2")
    (tmp_path / "workflow.py").write_text(code, encoding="utf-8")
    r = subprocess.run([sys.executable, "workflow.py"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "runs" / "sw" / "accuracy.png").stat().st_size > 1000
    lines = r.stdout.splitlines()
    assert "mean_accuracy" in lines[0] and [x.split()[0] for x in lines[3:]] == [
        "random", "gvr", "stalevre"]
