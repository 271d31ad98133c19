"""The differential table of docs/reproduction.md: mmfl against the authors' code, per round.

Reads the authors' per-round CSVs (``<method>_s<seed>/rounds.csv`` or ``<method>_s<seed>.csv``,
with columns ``round, seconds, train_seconds, eval_seconds, acc_task0..acc_task{S-1}``, written
by the logging patch listed in docs/reproduction.md) and mmfl sweep folders (``mmfl sweep ...
--grid sampler.name=... --seeds ...``: ``sampler.name=<method>/seed=<seed>/metrics.csv`` and
``timing.csv``, or the copies in docs/paper1_authors/mmfl/<sweep>/<method>_s<seed>/), and prints,
for each method and side, the mean test accuracy over the models and the worst model's accuracy
at the chosen rounds (and, with ``--window``, their means over a window of rounds) as mean ± std
over the seeds, and the seconds per round (mean over rounds 2.., training + evaluation; round 1
carries start-up work).

    .venv/bin/python scripts/differential.py --authors docs/paper1_authors/authors \
        --mmfl docs/paper1_authors/mmfl/authors --methods random,lvr --rounds 1,5,10,20,30 \
        --window 21-30
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def authors_run(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(R, S) accuracies and (R,) seconds per round of one run of the authors' code (a run
    folder with ``rounds.csv``, or that CSV itself)."""
    rows = _rows(path if path.suffix == ".csv" else path / "rounds.csv")
    tasks = sorted(k for k in rows[0] if k.startswith("acc_task"))
    acc = np.array([[float(r[k]) for k in tasks] for r in rows])
    return acc, np.array([float(r["seconds"]) for r in rows])


def mmfl_run(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(R, S) accuracies (NaN where a round was not evaluated) and (R,) seconds per round."""
    rows = _rows(folder / "metrics.csv")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    rounds = max(int(r["round"]) for r in rows)
    acc = np.full((rounds, len(tasks)), np.nan)
    for r in rows:
        if r["accuracy"] != "":
            acc[int(r["round"]) - 1, tasks.index(r["task"])] = float(r["accuracy"])
    secs = np.array([float(r["round_seconds"]) for r in _rows(folder / "timing.csv")])
    return acc, secs


def collect(kind: str, root: Path, method: str, label: str) -> list[tuple[np.ndarray, np.ndarray]]:
    if kind == "authors":
        found = sorted(root.glob(f"{method}_s*"))
        return [authors_run(f) for f in found
                if f.suffix == ".csv" or (f / "rounds.csv").exists()]
    # a sweep folder (sampler.name=M/seed=S) or the copies in docs/paper1_authors (M_sS)
    folders = sorted((root / f"sampler.name={method}").glob("seed=*")) or sorted(
        root.glob(f"{method}_s*"))
    return [mmfl_run(f) for f in folders  # a run that has not finished a round yet is left out
            if (f / "metrics.csv").exists() and len(_rows(f / "metrics.csv"))]


def fmt(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    if len(v) == 0 or np.isnan(v).all():
        return "-"
    v = v[~np.isnan(v)]
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def table(sides: list[tuple[str, str, Path]], methods: list[str], rounds: list[int],
          window: tuple[int, int] | None = None) -> str:
    head = ["method", "code", "seeds"] + [f"round {r}: mean / worst" for r in rounds]
    if window:
        head.append(f"rounds {window[0]}-{window[1]}: mean / worst")
    head.append("s/round")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        for label, kind, root in sides:
            runs = collect(kind, root, m, label)
            if not runs:
                continue
            cells = [m, label, str(len(runs))]
            for r in rounds:
                mean = [a[r - 1].mean() for a, _ in runs if len(a) >= r]
                worst = [a[r - 1].min() for a, _ in runs if len(a) >= r]
                cells.append(f"{fmt(mean)} / {fmt(worst)}" if mean else "-")
            if window:
                a, b = window
                done = [acc for acc, _ in runs if len(acc) >= b]
                mean = [np.nanmean(acc[a - 1:b].mean(axis=1)) for acc in done]
                worst = [np.nanmean(acc[a - 1:b].min(axis=1)) for acc in done]
                cells.append(f"{fmt(mean)} / {fmt(worst)}" if done else "-")
            secs = [s[1:].mean() if len(s) > 1 else s.mean() for _, s in runs]
            cells.append(fmt(secs).replace(".000", ""))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--authors", type=Path, help="folder of the authors' runs")
    ap.add_argument("--mmfl", type=Path, action="append", default=[],
                    help="mmfl sweep folder (repeatable)")
    ap.add_argument("--mmfl-label", action="append", default=[],
                    help="label of each --mmfl folder (default: mmfl, mmfl 2, ...)")
    ap.add_argument("--methods", default="random,lvr")
    ap.add_argument("--rounds", default="1,5,10,20,30")
    ap.add_argument("--window", default="", help="FIRST-LAST: also the mean over these rounds "
                    "(runs that reached LAST)")
    args = ap.parse_args(argv)
    sides = []
    if args.authors:
        sides.append(("authors", "authors", args.authors))
    for k, root in enumerate(args.mmfl):
        label = args.mmfl_label[k] if k < len(args.mmfl_label) else ("mmfl" if k == 0 else f"mmfl {k + 1}")
        sides.append((label, "mmfl", root))
    window = tuple(int(v) for v in args.window.split("-")) if args.window else None
    rounds = [int(r) for r in args.rounds.split(",")] if args.rounds else []
    print(table(sides, args.methods.split(","), rounds, window))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
