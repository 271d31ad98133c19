"""Engine ``flower`` under Flower's simulation engine (``run_simulation``, Ray; 2 CPUs).

Each test starts Ray and one virtual SuperNode per client (about 10-20 s each); marked
``flower`` so the quick loop (``-m "not flower"``) skips them. The conformance of a plain run
with ``vectorized`` is in tests/engines/test_conformance.py."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import numpy as np
import pytest

from testkit import assert_metrics_match

import mmfl
from mmfl.experiment import checkpoint, runner
from mmfl.experiment.config import config_from_dict

BASE = {
    "name": "flower-sim", "seed": 5, "rounds": 3, "engine": "flower",
    "clients": {"count": 6, "active_rate": 0.5, "processors": {1: 0.5, 2: 0.5}},
    "sampler": {"name": "random"},
    "flower": {"round_timeout": 60.0, "node_wait": 60.0, "ray_cpus": 2},
    "tasks": [
        {"name": "digits", "dataset": "digits", "model": "mlp", "lr": 0.1, "batch_size": 16,
         "local_epochs": 2, "partition": {"kind": "dirichlet", "alpha": 0.5},
         "model_options": {"hidden": 16}},
        {"name": "wave", "dataset": "mnist1d", "model": "logreg", "lr": 0.2, "batch_size": 10,
         "dataset_options": {"num_samples": 400}},
    ],
}


def _config(**changes):
    raw = {**BASE, **changes}
    return config_from_dict(raw)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _close(a, b, tol=1e-4):
    """metrics.csv of two runs: same assignment columns, metrics within tol."""
    ra, rb = _rows(a / "metrics.csv"), _rows(b / "metrics.csv")
    assert len(ra) == len(rb) > 0
    assert_metrics_match(ra, rb, tol)
    pa, _ = checkpoint.load(a / runner.CHECKPOINT)
    pb, _ = checkpoint.load(b / runner.CHECKPOINT)
    for k in pa:
        if k.startswith("param."):
            np.testing.assert_allclose(pb[k], pa[k], rtol=0, atol=1e-5)


def test_importing_mmfl_does_not_import_flower():
    code = ("import sys, mmfl; from mmfl import registry; names = registry.names('engine'); "
            "assert 'flower' in names, names; assert 'flwr' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_missing_flower_is_a_one_line_config_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flwr" else real(name, *a))
    with pytest.raises(mmfl.ConfigError, match=r"pip install 'mmfl\[flower\]'"):
        mmfl.run(_config(), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.flower
@pytest.mark.parametrize("sampler, pack", [("lvr", "node"), ("scaffold", "pair")])
def test_probes_and_scaffold_match_vectorized(tmp_path, sampler, pack):
    """LVR's loss probes (query.probe messages) with one message per node, and SCAFFOLD's
    corrections (sent with each pair): the same run as engine vectorized."""
    pytest.importorskip("flwr")
    flower = {**BASE["flower"], "pack": pack}
    mmfl.run(_config(engine="vectorized", sampler={"name": sampler}), tmp_path / "vec")
    mmfl.run(_config(sampler={"name": sampler}, flower=flower), tmp_path / "fl")
    _close(tmp_path / "vec", tmp_path / "fl")
    rounds = _rows(tmp_path / "fl" / "rounds.csv")
    assert all(r["missing"] == "0" for r in rounds)
    if sampler == "lvr":
        assert all(int(r["forward_passes"]) > 0 for r in rounds)


def _faulty_client_app(broken: int):
    """mmfl's ClientApp, except that client ``broken`` raises at every training message
    (built inside a function so Ray ships it by value to its workers)."""
    from flwr.clientapp import ClientApp

    from mmfl.flower import client as fc

    app = ClientApp()

    @app.query("discover")
    def discover(msg, context):
        return fc.discover(msg, context)

    @app.train()
    def train(msg, context):
        if int(context.node_config["partition-id"]) == broken:
            raise RuntimeError(f"client {broken} is broken")
        return fc.train(msg, context)

    return app


@pytest.mark.flower
def test_a_failing_client_app_leaves_its_pairs_missing(tmp_path):
    """Client 1's ClientApp raises (Flower error code 2) whenever it trains: every round
    completes with the other replies, its pairs are recorded as missing, the run finishes."""
    pytest.importorskip("flwr")
    from mmfl.experiment.runner import Runner
    from mmfl.flower.simulation import host_run

    cfg = _config(rounds=4, clients={**BASE["clients"], "active_rate": 1.0})
    summary = host_run(Runner(cfg, tmp_path / "run"), client_app=_faulty_client_app(1))
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    rounds = _rows(tmp_path / "run" / "rounds.csv")
    assert len(rounds) == 4
    assert all(int(r["missing"]) >= 1 and "missing (no reply)" in r["note"] for r in rounds)
    metrics = _rows(tmp_path / "run" / "metrics.csv")
    assert all(r["accuracy"] != "" and int(r["clients"]) >= 1 for r in metrics)


@pytest.mark.flower
def test_mmfl_run_command_with_engine_flower(tmp_path):
    """The CLI contract (`mmfl run CONFIG --set engine=flower`): exit 0, the usual run
    directory, no other library's INFO lines, and what the start-up waits for."""
    pytest.importorskip("flwr")
    cfg = tmp_path / "c.toml"
    from mmfl.experiment import tomlio

    cfg.write_text(tomlio.dumps(_config(rounds=2, engine="vectorized").to_dict()),
                   encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "mmfl.cli", "run", str(cfg), "--out",
                          str(tmp_path / "run"), "--set", "engine=flower", "--progress", "none"],
                         capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("config.toml", "metrics.csv", "rounds.csv", "summary.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert 'engine = "flower"' in (tmp_path / "run" / "config.toml").read_text()
    # other libraries' INFO lines stay out of mmfl's output (they appear with --verbose):
    # alembic's migrations, Ray's start-up ("...\tINFO worker.py:... -- Started a local Ray
    # instance"), Flower's ("INFO :      ..."); every INFO line left is in mmfl's format
    text = out.stdout + out.stderr
    noise = [line for line in text.splitlines() if "alembic" in line.lower()
             or "INFO" in line and not re.match(r"\d\d:\d\d:\d\d INFO ", line)]
    assert noise == [], noise[:5]
    # instead, the wait for Ray and the nodes is said
    assert "starting Flower's simulation engine (Ray, 2 CPUs) with 6 virtual SuperNodes" in text
    assert "flower: 6 Flower nodes serve 6 of 6 clients" in text


@pytest.mark.flower
def test_an_existing_run_directory_fails_before_flower_starts(tmp_path, monkeypatch):
    """Input errors (here: --out already holds a run) come before the simulation starts."""
    pytest.importorskip("flwr")
    import flwr.simulation

    def started(*args, **kwargs):
        raise AssertionError("the simulation should not start")

    monkeypatch.setattr(flwr.simulation, "run_simulation", started)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("round\n")
    # "already holds a run", or, without mmfl's run marker, "metrics.csv: exists and was not
    # written by mmfl": either way an input error before Flower starts
    with pytest.raises(mmfl.ResultsError, match=r"already holds a run|metrics.csv: exists"):
        mmfl.run(_config(), out)


@pytest.mark.flower
def test_ctrl_c_interrupts_the_run_and_it_resumes(tmp_path):
    """SIGINT to ``mmfl run`` with engine flower: exit 130, the run is recorded as interrupted
    and the process ends (the ServerApp's thread stops waiting); --resume then finishes it
    with the metrics of an uninterrupted run."""
    pytest.importorskip("flwr")
    import json
    import signal
    import time

    from mmfl.experiment import tomlio

    cfg = tmp_path / "c.toml"
    cfg.write_text(tomlio.dumps(_config(rounds=400).to_dict()), encoding="utf-8")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmfl.cli", "run", str(cfg), "--out", str(out),
           "--progress", "log"]
    from testkit import default_sigint

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)  # noqa: PLW1509 - one signal() call
    try:
        deadline = time.monotonic() + 240
        while not (out / "rounds.csv").exists() or len(_rows(out / "rounds.csv")) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no round finished"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    done = len(_rows(out / "rounds.csv"))
    assert 2 <= done < 400
    cfg.write_text(tomlio.dumps(_config(rounds=done + 1).to_dict()), encoding="utf-8")
    res = subprocess.run([*cmd[:-2], "--progress", "none", "--resume"], capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    mmfl.run(_config(rounds=done + 1, engine="sequential"), tmp_path / "seq")
    assert (out / "metrics.csv").read_text() == (tmp_path / "seq" / "metrics.csv").read_text()
