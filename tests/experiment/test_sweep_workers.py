"""Parallel sweeps with user components: registrations reach the spawn workers (notebook-style
sessions, where ``__main__`` has no file), and what cannot reach them is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from testkit import ROOT, tiny_config_text

import mmfl
from mmfl import registry
from mmfl.errors import ConfigError
from mmfl.experiment.config import load_config
from mmfl.experiment.sweep import plan_sweep, registrations_for_workers, restore_registrations

# a module on sys.path (imported by name) and one loaded from its file (not importable by name)
BY_NAME = '''
import os
import mmfl


@mmfl.register("dataset", "shifted_digits", options={})
def shifted_digits(options, data_dir, seed):
    """scikit-learn's digits, shifted by one: a user dataset."""
    from mmfl import registry

    d = registry.get("dataset", "digits").obj({}, data_dir, seed)
    return mmfl.Dataset("shifted_digits", d.x_train + 1.0, d.y_train, d.x_test + 1.0,
                        d.y_test, num_classes=d.num_classes, input_shape=d.input_shape)
'''
BY_FILE = '''
import os
import torch
import mmfl


@mmfl.register("model", "marked_mlp", options={"hidden": mmfl.Option(int, 12, "> 0", "width")})
def marked_mlp(options, input_shape, num_classes):
    """An MLP that leaves the id of the process that built it in $MARKS."""
    open(os.path.join(os.environ["MARKS"], str(os.getpid())), "w").close()
    n = 1
    for s in input_shape:
        n *= s
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n, options["hidden"]),
                               torch.nn.ReLU(), torch.nn.Linear(options["hidden"], num_classes),
                               torch.nn.LogSoftmax(1))
'''

# what a notebook cell does: no __main__ file, components from the user's modules
SESSION = '''
import importlib.util, json, os, sys
sys.path.insert(0, {lib!r})
import user_data                                   # registers dataset shifted_digits
spec = importlib.util.spec_from_file_location("user_model", {model_file!r})
user_model = importlib.util.module_from_spec(spec)
sys.modules["user_model"] = user_model
spec.loader.exec_module(user_model)                # registers model marked_mlp
import mmfl
cfg = mmfl.load_config({config!r}, overrides=["tasks[0].dataset=shifted_digits",
                                               "tasks[0].model=marked_mlp",
                                               "tasks[0].model_options.hidden=10"])
plan = mmfl.plan_sweep(cfg, {{"sampler.name": ["random", "full"]}}, [1], {out!r})
result = mmfl.run_sweep(plan, jobs=2)
print(json.dumps({{"pid": os.getpid(),
                  "outcomes": [[o.name, o.status, o.error] for o in result.outcomes]}}))
'''


def _python_c(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=full, cwd=tmp_path)


def test_notebook_style_sweep_with_user_components_runs_in_two_workers(tmp_path):
    lib, other, marks = tmp_path / "lib", tmp_path / "elsewhere", tmp_path / "marks"
    for d in (lib, other, marks):
        d.mkdir()
    (lib / "user_data.py").write_text(BY_NAME, encoding="utf-8")
    (other / "user_model.py").write_text(BY_FILE, encoding="utf-8")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(rounds=2), encoding="utf-8")
    out = tmp_path / "sw"
    code = SESSION.format(lib=str(lib), model_file=str(other / "user_model.py"),
                          config=str(cfg), out=str(out))
    r = _python_c(code, tmp_path, MARKS=str(marks))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["outcomes"] == [["sampler.name=random/seed=1", "completed", None],
                               ["sampler.name=full/seed=1", "completed", None]]
    for name, _, _ in doc["outcomes"]:
        s = json.loads((out / name / "summary.json").read_text())
        assert s["status"] == "completed" and s["rounds_completed"] == 2
        assert 'model = "marked_mlp"' in (out / name / "config.toml").read_text()
    # the user's model was built in the workers, not in the session's process
    pids = {int(p.name) for p in marks.iterdir()}
    assert pids and doc["pid"] not in pids


def test_component_defined_in_an_interactive_main_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(rounds=2), encoding="utf-8")
    out = tmp_path / "sw"
    code = textwrap.dedent(f'''
        import mmfl, torch

        @mmfl.register("model", "inline_mlp")
        def inline_mlp(options, input_shape, num_classes):
            n = int(torch.tensor(input_shape).prod())
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n, num_classes),
                                       torch.nn.LogSoftmax(1))

        cfg = mmfl.load_config({str(cfg)!r}, overrides=["tasks[1].model=inline_mlp"])
        plan = mmfl.plan_sweep(cfg, {{"sampler.name": ["random", "full"]}}, [1], {str(out)!r})
        try:
            mmfl.run_sweep(plan, jobs=2)
        except mmfl.ConfigError as e:
            print("ERROR", e)
        # the same sweep one run at a time, in this process, works
        print("JOBS1", [o.error or o.status for o in mmfl.run_sweep(plan, jobs=1).outcomes])
    ''')
    r = _python_c(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    error = [x for x in lines if x.startswith("ERROR")]
    assert len(error) == 1
    assert "model 'inline_mlp'" in error[0] and "__main__" in error[0]
    assert "jobs=1" in error[0] and "module" in error[0]
    assert lines[-1] == "JOBS1 ['completed', 'completed']"


def test_unused_unsendable_components_are_left_out_and_restore_round_trips(tmp_path,
                                                                          monkeypatch):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(rounds=2), encoding="utf-8")
    plan = plan_sweep(load_config(cfg), {"sampler.name": ["random", "full"]}, [1],
                      tmp_path / "sw")
    registry.names("model")
    monkeypatch.setitem(registry._REGISTRY, "model", dict(registry._REGISTRY["model"]))

    def local_model(options, input_shape, num_classes):  # defined inside a function
        raise AssertionError("never built")

    mmfl.register("model", "local_model")(local_model)
    mmfl.register("model", "sent_model", options={"k": mmfl.Option(int, 3)})(_module_level_model)
    items = registrations_for_workers(plan)  # local_model is not used by the plan: left out
    sent = {(k, n) for k, n, *_ in items}
    assert ("model", "sent_model") in sent and ("model", "local_model") not in sent
    assert not any(registry.get(k, n).builtin for k, n in sent)
    del registry._REGISTRY["model"]["sent_model"]
    assert restore_registrations(items) == {}
    e = registry.get("model", "sent_model")
    assert e.obj is _module_level_model and e.options["k"].default == 3
    # a used component that cannot be sent is an error naming it, before anything is written
    used = plan_sweep(load_config(cfg), {"tasks[1].model": ["local_model"]}, [1, 2],
                      tmp_path / "sw2")
    with pytest.raises(ConfigError, match="model 'local_model'.*inside a function"):
        mmfl.run_sweep(used, jobs=2)
    assert not (tmp_path / "sw2").exists()


def _module_level_model(options, input_shape, num_classes):
    raise AssertionError("never built")


@pytest.mark.slow
def test_unguarded_script_fails_with_the_main_guard_hint(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(rounds=1), encoding="utf-8")
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f'''
        import json
        import mmfl
        plan = mmfl.plan_sweep(mmfl.load_config({str(cfg)!r}),
                               {{"sampler.name": ["random", "full"]}}, [1], {str(tmp_path / "sw")!r})
        result = mmfl.run_sweep(plan, jobs=2)
        print(json.dumps([o.error for o in result.failures]))
    '''), encoding="utf-8")
    full = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600, env=full, cwd=tmp_path)
    errors = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(errors) == 2
    assert all("if __name__ == \"__main__\":" in e for e in errors), errors
    # the workers say it too, on stderr, in one line of their own
    assert "start the sweep under 'if __name__ == \"__main__\":'" in r.stderr
