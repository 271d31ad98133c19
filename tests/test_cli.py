"""The ``mmfl`` command end to end (subprocesses, like a user)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys

import pytest
from testkit import ROOT, run_cli


def test_run_end_to_end_writes_contract_files(tiny_config, tmp_path):
    out = tmp_path / "run"
    r = run_cli("run", str(tiny_config), "--out", str(out), "--set", "rounds=3")
    assert r.returncode == 0, r.stderr
    assert "done:" in r.stdout and "mean accuracy" in r.stdout
    # not a terminal: plain log lines with round, accuracies and ETA
    assert "round 3/3" in r.stderr and "ETA" in r.stderr and "digits=" in r.stderr
    for f in ("config.toml", "metrics.csv", "summary.json", "rounds.csv", "checkpoint.safetensors"):
        assert (out / f).stat().st_size > 0, f
    s = json.loads((out / "summary.json").read_text())
    assert set(s["tasks"]) == {"digits", "wave"} and s["rounds_completed"] == 3
    assert "rounds = 3" in (out / "config.toml").read_text()


def test_resume_of_a_finished_run_is_a_no_op(tiny_config, tmp_path):
    out = tmp_path / "run"
    assert run_cli("run", str(tiny_config), "--out", str(out), "--set", "rounds=2").returncode == 0
    before = (out / "metrics.csv").read_bytes()
    r = run_cli("run", str(tiny_config), "--out", str(out), "--set", "rounds=2", "--resume")
    assert r.returncode == 0, r.stderr
    assert (out / "metrics.csv").read_bytes() == before


def test_existing_run_without_resume_exits_2(tiny_config, tmp_path):
    out = tmp_path / "run"
    assert run_cli("run", str(tiny_config), "--out", str(out), "--set", "rounds=1").returncode == 0
    r = run_cli("run", str(tiny_config), "--out", str(out), "--set", "rounds=1")
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr


def test_describe_prints_the_federation_without_training(tiny_config, tmp_path):
    r = run_cli("describe", str(tiny_config), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "clients N = 16" in out and "processors P =" in out and "budget m =" in out
    assert "task 0 digits" in out and "classes per client min 3, median 3, max 3" in out
    assert "partition dirichlet" in out
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.toml"]  # nothing written


def test_missing_dataset_files_exit_2_with_install_hint(tiny_config, tmp_path, monkeypatch):
    import mmfl.tasks.datasets as datasets

    cfg = tmp_path / "f.toml"
    cfg.write_text(tiny_config.read_text().replace('dataset = "digits"', 'dataset = "fashion_mnist"'))
    # run in-process with the Debian folder hidden and an empty data dir
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    from mmfl.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["describe", str(cfg), "--data-dir", str(empty)])
    assert rc == 2


def test_missing_dataset_message(tiny_config, tmp_path, monkeypatch, capsys):
    import mmfl.tasks.datasets as datasets

    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    cfg = tmp_path / "f.toml"
    cfg.write_text(tiny_config.read_text().replace('dataset = "digits"', 'dataset = "fashion_mnist"'))
    from mmfl.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", str(cfg), "--data-dir", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and err.count("\n") == 1


def test_help_everywhere():
    for args in ([], ["run"], ["describe"], ["components"]):
        r = run_cli(*args, "--help")
        assert r.returncode == 0 and "usage: mmfl" in r.stdout, args
    r = run_cli("run", "--help")
    for flag in ("--out", "--set", "--resume", "--data-dir", "--progress"):
        assert flag in r.stdout


def test_components_lists_registered_names():
    r = run_cli("components")
    assert r.returncode == 0
    for name in ("digits", "fashion_mnist", "mnist1d", "synthetic", "logreg", "mlp", "cnn",
                 "random", "round_robin", "full", "fedfair", "unbiased", "average", "sequential"):
        assert f"  {name} " in r.stdout, name


def test_core_imports_without_torch():
    code = ("import sys, mmfl, mmfl.core.allocators, mmfl.core.aggregation, mmfl.core.metrics, "
            "mmfl.experiment.config, mmfl.registry; mmfl.registry.names('sampler'); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_example_registers_custom_components_and_runs(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "custom_components.py"))
    summary = mod["main"](str(tmp_path / "custom"))
    assert summary["sampler"] == "biggest_first"
    assert summary["tasks"]["blobs"]["accuracy"] > 0.5  # 4 classes: chance is 0.25
    import mmfl.registry as registry

    assert "blobs" in registry.names("dataset") and "tiny_mlp" in registry.names("model")


def test_example_own_model_trains_logits_and_loads_back(tmp_path):
    mod = runpy.run_path(str(ROOT / "examples" / "own_model.py"))
    accuracy = mod["main"](str(tmp_path / "own"))
    summary = json.loads((tmp_path / "own" / "summary.json").read_text())
    assert accuracy == summary["tasks"]["digits"]["accuracy"] > 0.5  # 10 classes
    assert (tmp_path / "own" / "models" / "digits.safetensors").exists()


@pytest.mark.slow
def test_quickstart_config_learns_every_task(tmp_path):
    """The quickstart (or its offline twin): every task ends clearly above chance (0.1)."""
    from pathlib import Path

    name = "quickstart.toml" if Path("/usr/share/datasets/fashion-mnist").exists() else "quickstart_offline.toml"
    r = run_cli("run", str(ROOT / "configs" / name), "--out", str(tmp_path / "q"), timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert s["clients"] >= 50 and s["rounds"] >= 20 and len(s["tasks"]) >= 3
    for task, v in s["tasks"].items():
        assert v["accuracy"] > 0.4, (task, v)


def test_compare_runs_samplers_by_seeds_and_resumes(tiny_config, tmp_path):
    out = tmp_path / "cmp"
    args = ("compare", str(tiny_config), "--samplers", "random,full", "--seeds", "0,1",
            "--set", "rounds=2", "--out", str(out))
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    table = (out / "table.md").read_text()
    assert table.count("\n| random | 2 |") == 1 and "| full | 2 |" in table
    for name in ("random", "full"):
        for seed in (0, 1):
            s = json.loads((out / name / f"seed-{seed}" / "summary.json").read_text())
            assert s["status"] == "completed" and s["seed"] == seed and s["sampler"] == name
    stamp = (out / "full" / "seed-1" / "metrics.csv").stat().st_mtime_ns
    r = run_cli(*args)
    assert r.returncode == 0 and "skipped" in r.stderr
    assert (out / "full" / "seed-1" / "metrics.csv").stat().st_mtime_ns == stamp
    bad = run_cli("compare", str(tiny_config), "--samplers", "random,nope", "--out", str(out))
    assert bad.returncode == 2 and "--samplers" in bad.stderr and "Traceback" not in bad.stderr


def test_version_prints_the_package_version():
    import mmfl

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mmfl {mmfl.__version__}"
    assert mmfl.__version__.count(".") >= 2


def test_compare_has_jobs_and_the_seed_default_of_sweep(tiny_config, tmp_path):
    helps = [run_cli(cmd, "--help").stdout for cmd in ("compare", "sweep")]
    for h in helps:
        assert "--jobs" in h and "default: the config's seed" in " ".join(h.split())
    out = tmp_path / "cmp"
    r = run_cli("compare", str(tiny_config), "--samplers", "random,full", "--set", "rounds=2",
                "--jobs", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "[2/2]" in r.stderr  # the sweep's progress lines: the runs went to workers
    table = (out / "table.md").read_text()
    assert "| random | 1 |" in table and "| full | 1 |" in table
    # no --seeds: the config's seed (3 in the tiny config), as for sweep
    for name in ("random", "full"):
        s = json.loads((out / name / "seed-3" / "summary.json").read_text())
        assert s["status"] == "completed" and s["seed"] == 3
    assert sorted(p.name for p in (out / "random").iterdir()) == ["seed-3"]
    sw = tmp_path / "sw"
    assert run_cli("sweep", str(tiny_config), "--set", "rounds=1", "--out", str(sw)).returncode == 0
    assert [p.name for p in sw.iterdir() if p.is_dir()] == ["seed=3"]
    for args in (["--jobs", "0"], ["--seeds", "1,1"]):
        bad = run_cli("compare", str(tiny_config), "--samplers", "random", "--out",
                      str(tmp_path / "bad"), *args)
        assert bad.returncode == 2 and args[0] in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_data_fetch_of_an_unknown_dataset_exits_2(tmp_path):
    r = run_cli("data", "fetch", "no_such_dataset", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "no_such_dataset" in r.stderr and "Traceback" not in r.stderr


def test_describe_warns_about_classes_no_client_holds(tmp_path):
    """A class-ratio partition over few clients leaves classes out: describe says which."""
    from testkit import tiny_config_text

    p = tmp_path / "c.toml"
    p.write_text(tiny_config_text(rounds=1), encoding="utf-8")
    r = run_cli("describe", str(p), "--set", "clients.count=2", "--set",
                'tasks[0].partition={kind = "classes", class_ratio = 0.2}')
    assert r.returncode == 0, r.stderr
    warn = [line for line in r.stdout.splitlines() if "held by no client" in line]
    assert len(warn) == 1 and "classes [" in warn[0]
    r = run_cli("describe", str(p))
    assert "held by no client" not in r.stdout
