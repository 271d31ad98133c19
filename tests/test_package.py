"""The package as a user installs it: the wheel built from the source tree (not an editable
install), installed into a fresh virtual environment, used from outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from testkit import ROOT, tiny_config_text

import mmfl


def _source_files() -> list[str]:
    """The repository's files as a fresh clone would have them (tracked, plus new files that
    are not ignored), relative to ROOT."""
    r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in r.stdout.splitlines() if (ROOT / f).is_file()]


def _run(args, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{args}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_from_outside_the_repository(tmp_path):
    files = _source_files()
    tree = tmp_path / "tree"  # a copy: building writes build/ and *.egg-info beside the sources
    for f in files:
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tree / f)
    wheels = tmp_path / "wheels"
    # the build backend of the current environment: no download, no isolation
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--disable-pip-version-check", "-q", "-w", str(wheels), str(tree)])
    [whl] = list(wheels.glob("*.whl"))
    assert whl.name == f"mmfl-{mmfl.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        meta = z.read(f"mmfl-{mmfl.__version__}.dist-info/METADATA").decode()
    assert f"Version: {mmfl.__version__}" in meta and "Provides-Extra: analysis" in meta
    assert "mmfl/py.typed" in names
    # every file of the package that is not Python source is package data in the wheel
    data = [f[len("src/"):] for f in files if f.startswith("src/mmfl/")
            and not f.endswith(".py") and "__pycache__" not in f]
    assert "mmfl/flower/fab/pyproject.toml" in data
    assert [f for f in data if f not in names] == []

    # a fresh venv; its dependencies (torch pinned, CPU) come from this environment's
    # site-packages through a .pth path entry, so nothing is downloaded
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                     ).stdout.strip())
    (site / "deps-of-the-test.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", str(whl)])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    mmfl_bin = venv / "bin" / "mmfl"
    r = _run([str(mmfl_bin), "--version"], cwd=outside, env=env)
    assert r.stdout.strip() == f"mmfl {mmfl.__version__}"
    where = _run([str(py), "-c", "import json, mmfl, importlib.resources as r; "
                  "app = r.files('mmfl.flower') / 'fab' / 'pyproject.toml'; "
                  "print(json.dumps([mmfl.__file__, str(app), app.is_file()]))"],
                 cwd=outside, env=env)
    init, app, app_ok = json.loads(where.stdout)
    assert Path(init).is_relative_to(site) and Path(app).is_relative_to(site) and app_ok
    (outside / "tiny.toml").write_text(tiny_config_text(rounds=1), encoding="utf-8")
    r = _run([str(mmfl_bin), "run", "tiny.toml", "--out", "run", "--progress", "none"],
             cwd=outside, env=env)
    assert "done: run" in r.stdout
    s = json.loads((outside / "run" / "summary.json").read_text())
    assert s["status"] == "completed" and s["rounds_completed"] == 1
