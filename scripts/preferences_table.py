"""The table of docs/preferences.md: every sampler without preferences, and with them unaware
and preference-aware, from the sweep folders that docs/preferences.md's commands write::

    .venv/bin/python scripts/preferences_table.py BASE_SWEEP PREFS_SWEEP

Per sampler and condition, means over the seeds of: the final mean accuracy over the models,
the final accuracy of the worst model (fairness), the slots declined as a share of the slots
drawn (wasted budget), and the updates aggregated per round (rounds.csv ``model_uploads``).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path


def runs(sweep: Path) -> list[tuple[dict, Path]]:
    """(overrides with the seed, run directory) of every completed run of a sweep folder."""
    index = json.loads((sweep / "index.json").read_text(encoding="utf-8"))
    return [({**r["overrides"], "seed": r["seed"]}, sweep / name)
            for name, r in index["runs"].items() if r["status"] == "completed"]


def measures(run: Path) -> dict[str, float]:
    """Final mean and worst-model accuracy, declined share of the drawn slots, updates per
    round, of one run directory."""
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    with open(run / "rounds.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    declined = sum(int(r.get("declined") or 0) for r in rows)
    drawn = sum(int(r["slots"]) for r in rows) + declined
    return {"mean": summary["mean_accuracy"], "worst": summary["min_accuracy"],
            "declined": declined / drawn if drawn else 0.0,
            "updates": sum(int(r["model_uploads"]) for r in rows) / len(rows)}


def table(base: Path, prefs: Path) -> str:
    """The markdown table (samplers in the order of the base sweep's grid)."""
    acc: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    for over, run in runs(base):
        acc[over["sampler.name"], "none"].append(measures(run))
    for over, run in runs(prefs):
        cond = "aware" if over.get("sampler.preference_aware") else "unaware"
        acc[over["sampler.name"], cond].append(measures(run))
    order = json.loads((base / "index.json").read_text())["grid"]["sampler.name"]
    conds = ("none", "unaware", "aware")

    def mean(sampler, cond, key, fmt):
        vals = [m[key] for m in acc.get((sampler, cond), [])]
        return fmt.format(sum(vals) / len(vals)) if vals else "-"

    lines = ["| sampler | mean acc: none / unaware / aware | worst model: none / unaware / "
             "aware | declined share (unaware / aware) | updates per round: none / unaware / "
             "aware |", "|---|---|---|---|---|"]
    for s in order:
        lines.append("| " + " | ".join([
            s,
            " / ".join(mean(s, c, "mean", "{:.3f}") for c in conds),
            " / ".join(mean(s, c, "worst", "{:.3f}") for c in conds),
            " / ".join(mean(s, c, "declined", "{:.1%}") for c in conds[1:]),
            " / ".join(mean(s, c, "updates", "{:.1f}") for c in conds),
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="sweep folder without preferences")
    ap.add_argument("prefs", type=Path, help="sweep folder with clients.preferences, "
                    "gridded over sampler.preference_aware")
    a = ap.parse_args()
    print(table(a.base, a.prefs))


if __name__ == "__main__":
    main()
