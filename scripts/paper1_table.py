"""The paper-1 table from sweep folders: one row per sampler, the papers' metric (mean test
accuracy over the last evaluated rounds, at most 20, averaged over the models; and the worst
model's), mean ± std over seeds, with costs and wall seconds.

    .venv/bin/python scripts/paper1_table.py RUNS... [--markdown-out FILE]

RUNS are run directories or folders holding them (``mmfl sweep --out`` folders); only completed
runs are counted (a sweep still running contributes its finished runs). Columns: ``rounds``
(of the runs), ``window`` (evaluated rounds averaged), ``mean acc`` / ``worst acc`` (summary.json
``mean_accuracy_window`` / ``min_accuracy_window``), ``trainings/round`` (local trainings per
round), ``s/round`` (wall seconds per round, timing.csv, round 1 left out).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

#: the papers' order of the samplers
ORDER = ("random", "round_robin", "full", "fedfair", "group", "gvr", "lvr", "fairvr", "stalevr",
         "stalevre", "fedvarp", "mifa", "fedstale", "scaffold")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (a summary.json with status completed) at or below ``paths``."""
    runs = []
    for p in paths:
        for s in sorted([p / "summary.json"] if (p / "summary.json").exists()
                        else p.rglob("summary.json")):
            if json.loads(s.read_text(encoding="utf-8")).get("status") == "completed":
                runs.append(s.parent)
    return runs


def run_row(run: Path) -> dict:
    """The numbers of one completed run."""
    s = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    with open(run / "timing.csv", newline="") as f:
        secs = [float(r["round_seconds"]) for r in csv.DictReader(f)]
    return {
        "sampler": s["sampler"], "seed": s["seed"], "rounds": s["rounds_completed"],
        "window": s["final_window"], "mean": s["mean_accuracy_window"],
        "worst": s["min_accuracy_window"],
        "trainings": s["cost"]["local_trainings"] / max(s["rounds_completed"], 1),
        "seconds": float(np.mean(secs[1:] if len(secs) > 1 else secs)),
    }


def _pm(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def table(rows: list[dict]) -> str:
    """Markdown table, one line per sampler (ORDER first, then any other), seeds pooled."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["sampler"]].append(r)
    names = [n for n in ORDER if n in by] + sorted(n for n in by if n not in ORDER)
    out = ["| sampler | seeds | rounds | window | mean acc | worst acc | trainings/round | "
           "s/round |", "|---|---|---|---|---|---|---|---|"]
    for n in names:
        rs = by[n]
        rounds = sorted({r["rounds"] for r in rs})
        window = sorted({r["window"] for r in rs})
        out.append(
            f"| {n} | {len(rs)} | {'/'.join(map(str, rounds))} | {'/'.join(map(str, window))} | "
            f"{_pm([r['mean'] for r in rs])} | {_pm([r['worst'] for r in rs])} | "
            f"{np.mean([r['trainings'] for r in rs]):.1f} | "
            f"{_pm([r['seconds'] for r in rs], 1)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--markdown-out", type=Path, default=None)
    args = ap.parse_args(argv)
    runs = find_runs(args.runs)
    if not runs:
        print("no completed runs found", file=sys.stderr)
        return 1
    text = table([run_row(r) for r in runs])
    if args.markdown_out:
        args.markdown_out.write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
