"""The report of a sweep: files, tables equal to the run directories, plots in a real browser."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from testkit import run_cli, tiny_config_text

from mmfl.errors import MmflError, ResultsError
from mmfl.experiment.config import load_config
from mmfl.experiment.report import group_runs, write_report
from mmfl.experiment.results import RunResults
from mmfl.experiment.sweep import plan_sweep, run_sweep

PNGS = {"accuracy.png", "tasks.png", "loss.png", "train_loss.png", "fairness.png", "cost.png",
        "cost_curve.png", "clients.png"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """2 samplers x 2 seeds of the tiny config (3 rounds)."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "tiny.toml").write_text(tiny_config_text(rounds=3), encoding="utf-8")
    plan = plan_sweep(load_config(root / "tiny.toml"), {"sampler.name": ["random", "full"]},
                      [1, 2], root / "sw")
    assert not run_sweep(plan).failures
    return root / "sw"


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory) -> Path:
    return write_report([sweep], tmp_path_factory.mktemp("report") / "rep")


def _has_sim_time(sweep: Path) -> bool:
    """Whether the runner writes a simulated clock (rounds.csv ``sim_time``)."""
    path = next(sweep.rglob("rounds.csv"))
    return "sim_time" in path.read_text(encoding="utf-8").splitlines()[0].split(",")


def _set_sim_time(folder: Path, per_round: float | None) -> None:
    """Rewrite every rounds.csv below ``folder``: sim_time = per_round x round, or no column."""
    for path in folder.rglob("rounds.csv"):
        rows = list(csv.DictReader(open(path, encoding="utf-8")))
        cols = [c for c in rows[0] if c != "sim_time"] + (["sim_time"] if per_round else [])
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, cols, extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({**row, "sim_time": (per_round or 0) * int(row["round"])})


def _summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.relative_to(sweep).as_posix(): json.loads(p.read_text())
            for p in sorted(sweep.rglob("summary.json"))}


def _md_table(md: str, title: str) -> list[list[str]]:
    """Body rows of the Markdown table under '## title' (cells stripped)."""
    block = md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split(" | ")] for r in rows[2:]]


def test_report_files_and_every_png_referenced(sweep, report):
    out = report.parent
    assert report.name == "report.html" and (out / "report.md").is_file()
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == PNGS | ({"sim_time.png"} if _has_sim_time(sweep) else set())
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = report.read_text(encoding="utf-8")
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(srcs) == sorted(pngs)  # relative, beside the page, each once
    assert "<link" not in page and "http" not in page  # self-contained but for the PNGs
    md = (out / "report.md").read_text(encoding="utf-8")
    assert sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == sorted(pngs)


def test_markdown_tables_equal_the_summaries(sweep, report):
    md = (report.parent / "report.md").read_text(encoding="utf-8")
    summaries = _summaries(sweep)
    rows = _md_table(md, "Runs")
    assert len(rows) == 4
    for row in rows:
        name = re.fullmatch(r"\[(.+)\]\(<(.+)>\)", row[0])
        s = summaries[name.group(1)]
        assert (report.parent / name.group(2) / "summary.json").is_file()  # the link works
        assert row[1] == s["sampler"] and row[2] == str(s["seed"])
        assert row[3] == f"{s['mean_accuracy']:.4f}" and row[4] == f"{s['min_accuracy']:.4f}"
        assert row[5:7] == [f"{s['tasks'][t]['accuracy']:.4f}" for t in ("digits", "wave")]
        assert row[7:9] == [str(s["cost"]["local_trainings"]), str(s["cost"]["model_uploads"])]

    def pm(values, digits=4):
        return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"

    by = {name: [s for s in summaries.values() if s["sampler"] == name]
          for name in ("random", "full")}
    final = {r[0]: r for r in _md_table(md, "Final accuracy")}
    assert set(final) == {"random", "full"}
    for name, mine in by.items():
        assert final[name][1] == "2"
        assert final[name][2] == pm([s["mean_accuracy"] for s in mine])
        assert final[name][3] == pm([s["min_accuracy"] for s in mine])
    fair = {r[0]: r for r in _md_table(md, "Fairness across tasks (final)")}
    cost = {r[0]: r for r in _md_table(md, "Cost and accuracy")}
    for name, mine in by.items():
        assert fair[name][3] == pm([s["max_min_accuracy"] for s in mine])
        assert cost[name][2] == pm([s["cost"]["local_trainings"] for s in mine], 0)
    best = max(np.mean([s["mean_accuracy"] for s in mine]) for mine in by.values())
    target = re.search(r"## Rounds to target accuracy (\S+)", md).group(1)
    assert target == f"{0.9 * best:.4f}"
    reached = {r[0]: r for r in _md_table(md, f"Rounds to target accuracy {target}")}
    for name, mine in by.items():  # the mean accuracy per round, from metrics.csv
        hits = []
        for s in mine:
            rows_ = list(csv.DictReader(open(sweep / f"sampler.name={name}/seed={s['seed']}"
                                             / "metrics.csv")))
            for t in (1, 2, 3):
                acc = [float(x["accuracy"]) for x in rows_ if int(x["round"]) == t]
                if np.mean(acc) >= 0.9 * best:
                    hits.append(t)
                    break
        assert reached[name][1] == f"{len(hits)}/2"
        assert reached[name][2] == (pm(hits, 1) if hits else "–")
    assert ("simulated s until then" in md) == _has_sim_time(sweep)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _dump_dom(browser: str, page: Path, profile: Path) -> str:
    r = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_headless_chromium_loads_the_page_and_every_image(report, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    dom = _dump_dom(browser, report, tmp_path / "profile")
    n = len(list(report.parent.glob("*.png")))
    assert n >= len(PNGS) and f'data-images-loaded="{n}/{n}"' in dom
    assert "Rounds to target accuracy" in dom and "sampler.name=full/seed=2" in dom
    # the loss curves and the table against the baseline
    for src in ("loss.png", "train_loss.png", "clients.png", "cost_curve.png"):
        assert f'<img src="{src}"' in dom
    assert '<h2 id="significance">Against the baseline (random)</h2>' in dom
    assert "too few seeds (2 pairs" in dom
    # the check itself notices a missing image
    broken = tmp_path / "broken"
    shutil.copytree(report.parent, broken)
    (broken / "cost.png").unlink()
    dom = _dump_dom(browser, broken / "report.html", tmp_path / "profile")
    assert f'data-images-loaded="{n - 1}/{n}"' in dom


def test_sim_time_column_and_runs_left_out(sweep, tmp_path):
    copy = tmp_path / "sw"
    shutil.copytree(sweep, copy)
    _set_sim_time(copy, 2.5)
    running = copy / "sampler.name=full/seed=9"
    shutil.copytree(copy / "sampler.name=full/seed=1", running)
    s = json.loads((running / "summary.json").read_text())
    (running / "summary.json").write_text(json.dumps({**s, "status": "running", "seed": 9}))
    out = write_report([copy / "sampler.name=full", copy / "sampler.name=random"],
                       tmp_path / "rep", target=0.3)
    md = (out.parent / "report.md").read_text(encoding="utf-8")
    rows = {r[0]: r for r in _md_table(md, "Rounds to target accuracy 0.3000")}
    header = md.split("## Rounds to target accuracy 0.3000\n", 1)[1]
    assert "simulated s until then" in header.split("\n## ", 1)[0]
    # simulated seconds to target = 2.5 s per round x rounds to target
    assert float(rows["full"][-1].split(" ± ")[0]) == pytest.approx(
        2.5 * float(rows["full"][2].split(" ± ")[0]), abs=0.06)
    assert (out.parent / "sim_time.png").is_file()
    assert "sim_time.png" in out.read_text(encoding="utf-8")
    assert "## Left out" in md and "seed=9`: status running" in md
    assert len(_md_table(md, "Runs")) == 4
    # without the column (runs of a runner without a simulated clock): no column, no plot
    _set_sim_time(copy, None)
    out = write_report([copy], tmp_path / "rep2", target=0.3)
    md = (out.parent / "report.md").read_text(encoding="utf-8")
    assert "simulated" not in md and not (out.parent / "sim_time.png").exists()
    assert {p.name for p in out.parent.glob("*.png")} == PNGS


def test_group_labels_use_the_keys_that_differ():
    def fake(seed, **sampler):
        cfg = {"name": "x", "seed": seed, "threads": seed, "rounds": 3,
               "clients": {"active_rate": sampler.pop("rate", 0.1)}, "sampler": sampler,
               "tasks": [{"name": "a", "lr": 0.1}]}
        return RunResults(Path(f"/r/{seed}"), cfg, {"tasks": {"a": {}}}, [], [])

    groups, keys = group_runs([fake(1, name="gvr", alpha=1.0), fake(2, name="gvr", alpha=1.0),
                               fake(1, name="random")])
    assert [g.label for g in groups] == ["gvr", "random"] and keys == ["sampler.name"]
    assert groups[0].seeds == [1, 2]  # the seed (and threads) do not split groups
    groups, keys = group_runs([fake(1, name="gvr", alpha=1.0), fake(1, name="gvr", alpha=2.0),
                               fake(1, name="random")])
    assert [g.label for g in groups] == ["sampler.name=gvr, sampler.alpha=1.0",
                                         "sampler.name=gvr, sampler.alpha=2.0",
                                         "sampler.name=random"]
    groups, keys = group_runs([fake(1, name="gvr", rate=0.1), fake(1, name="gvr", rate=0.2)])
    assert [g.label for g in groups] == ["clients.active_rate=0.1", "clients.active_rate=0.2"]
    groups, _ = group_runs([fake(1, name="gvr"), fake(2, name="gvr")])
    assert len(groups) == 1 and groups[0].label == "gvr"
    # options of one sampler label only the groups of that sampler that they tell apart
    groups, keys = group_runs([fake(1, name="random", draw="fixed"),
                               fake(1, name="group_pipeline", within="uniform", groups=2),
                               fake(1, name="group_pipeline", within="optimal", groups=2),
                               fake(1, name="fedfair", alpha=3.0, draw="fixed")])
    assert [g.label for g in groups] == ["sampler.name=random",
                                         "sampler.name=group_pipeline, sampler.within=uniform",
                                         "sampler.name=group_pipeline, sampler.within=optimal",
                                         "sampler.name=fedfair"]
    assert keys == ["sampler.name", "sampler.within"]


def test_errors_missing_runs_and_matplotlib(sweep, tmp_path, monkeypatch):
    with pytest.raises(ResultsError, match="no such"):
        write_report([tmp_path / "nope"], tmp_path / "rep")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match="holds no run directory"):
        write_report([tmp_path / "empty"], tmp_path / "rep")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MmflError, match=r"mmfl\[plot\]"):
        write_report([sweep], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_report_cli(sweep, tmp_path):
    r = run_cli("report", str(sweep / "sampler.name=full"), str(sweep / "sampler.name=random"),
                "--out", str(tmp_path / "rep"), "--target", "0.25")
    assert r.returncode == 0, r.stderr
    assert "report.html" in r.stdout and (tmp_path / "rep" / "report.html").is_file()
    md = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    assert "## Rounds to target accuracy 0.2500" in md and "Target: given" in md
    r = run_cli("report", str(tmp_path / "missing"), "--out", str(tmp_path / "rep2"))
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_groups_come_in_grid_order(report):
    """The sweep's grid says random, then full: so do the report's tables (not alphabetical)."""
    md = (report.parent / "report.md").read_text(encoding="utf-8")
    rows = [r[0] for r in _md_table(md, "Runs")]
    samplers = [re.search(r"sampler\.name=(\w+)", r).group(1) for r in rows]
    assert samplers == ["random", "random", "full", "full"]


def test_significance_table_of_the_sweep(sweep, report):
    """full against random over seeds 1 and 2: the paired difference, and no p-value (2 pairs)."""
    md = (report.parent / "report.md").read_text(encoding="utf-8")
    rows = _md_table(md, "Against the baseline (random)")
    summaries = _summaries(sweep).values()
    by = {name: {s["seed"]: s for s in summaries if s["sampler"] == name}
          for name in ("random", "full")}
    for row, key in zip(rows, ("mean_accuracy", "min_accuracy")):
        d = [by["full"][seed][key] - by["random"][seed][key] for seed in (1, 2)]
        assert row[:4] == ["full", "random", key.replace("_", " "), "2"]
        assert row[6] == f"{np.mean(d):+.4f}"
        assert row[7:10] == ["–", "–", "–"] and row[10].startswith("too few seeds (2 pairs")
    assert len(rows) == 2


def test_report_cli_baseline(sweep, tmp_path):
    r = run_cli("report", str(sweep), "--out", str(tmp_path / "rep"), "--baseline", "full")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    rows = _md_table(md, "Against the baseline (full)")
    assert [row[:3] for row in rows] == [["random", "full", "mean accuracy"],
                                         ["random", "full", "min accuracy"]]
    r = run_cli("report", str(sweep), "--out", str(tmp_path / "rep2"), "--baseline", "gvr")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(
        "--baseline: must name a sampler of the runs (one of: random, full) (got 'gvr')")
    assert not (tmp_path / "rep2").exists()


def test_loss_curves_read_metrics_csv(sweep):
    """The loss plots' data: test loss and train_loss per run, round and task (NaN where a task
    had no client)."""
    from mmfl.experiment.report import _read_run, _stats

    runs = [_read_run(d.parent) for d in sorted(sweep.rglob("metrics.csv"))]
    groups, _ = group_runs(runs)
    for g in groups:
        st = _stats(g)
        for i, run in enumerate(g.runs):
            rows = list(csv.DictReader(open(run.path / "metrics.csv", encoding="utf-8")))
            for column in ("loss", "train_loss"):
                rounds, values = getattr(st, column)
                for row in rows:
                    t, k = int(row["round"]), g.tasks.index(row["task"])
                    if row[column]:
                        assert values[i, list(rounds).index(t), k] == float(row[column])
                    else:  # not evaluated / no client: no point at that round
                        assert t not in rounds or np.isnan(values[i, list(rounds).index(t), k])


def test_clients_axis_is_not_squashed_by_a_full_first_round(tmp_path):
    """A first round with every client (30) above later rounds of about 5: the y axis spans the
    later rounds, the first value is named in the panel title and marked on the top edge."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mmfl.experiment import plots

    x = np.arange(1, 7)
    spiky = (x, np.array([30.0, 5, 6, 4, 5, 6]), np.array([30.0, 4, 5, 3, 4, 5]),
             np.array([30.0, 6, 7, 5, 6, 7]))
    flat = (x, np.full(6, 5.0), np.full(6, 4.0), np.full(6, 6.0))
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for s in (spiky, flat):
        ax.plot(s[0], s[1])
    note = plots._clip_first(ax, [spiky, None, flat], ["stalevre", "gvr", "random"], "round")
    # the later rounds' bands span 3..7; a margin of 8% of the span 4 = 0.32 on either side
    assert ax.get_ylim() == pytest.approx((2.68, 7.32))
    assert note == "round 1 off scale (▲): stalevre 30"
    assert [tuple(line.get_xydata()[0]) for line in ax.lines[2:]] == [(1.0, pytest.approx(7.32))]
    # nothing far off scale: the axis and the title stay as they are. A first value of 11
    # is below 7.32 + (7.32 - 2.68) = 11.96, i.e. showing it does not double the axis height
    mild = (x, np.array([11.0, 5, 6, 4, 5, 6]), np.array([11.0, 4, 5, 3, 4, 5]),
            np.array([11.0, 6, 7, 5, 6, 7]))
    for case in ([flat], [mild, flat]):
        ax2 = Figure().subplots()
        ax2.plot(x, case[0][1])
        before = ax2.get_ylim()
        assert plots._clip_first(ax2, case, ["a", "b"], "round") == ""
        assert ax2.get_ylim() == before and len(ax2.lines) == 1
    # through band_panels: the PNG is written
    path = plots.band_panels(tmp_path / "clients.png", [
        {"title": "digits", "series": [spiky, flat], "clip_first": True}],
        ["stalevre", "random"], ylabel="clients")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_legend_columns_fit_the_figure_width():
    """Long group labels get fewer legend columns, so the legend is not cut at the edges."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from mmfl.experiment.plots import LEGEND_CHAR_IN, LEGEND_HANDLE_IN, _legend_columns

    long = ["sampler.name=group_pipeline, sampler.within=uniform"] * 6
    fig = Figure(figsize=(9.1, 3.6))
    cols = _legend_columns(fig, long)
    assert cols == 2 and cols * (len(long[0]) * LEGEND_CHAR_IN + LEGEND_HANDLE_IN) <= 9.1
    assert _legend_columns(fig, ["gvr", "lvr", "random", "full", "fedfair"]) == 4
    assert _legend_columns(Figure(figsize=(2.0, 2.0)), long) == 1
