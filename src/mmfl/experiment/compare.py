"""Run several samplers on one config with several seeds and tabulate accuracy and cost.

Each (sampler, seed) is an ordinary run directory ``OUT/<sampler>/seed-<seed>``; finished runs
are skipped and interrupted ones resumed, so the command can be re-issued after a crash.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mmfl.experiment.config import ExperimentConfig
from mmfl.experiment.runner import Callback, run

log = logging.getLogger(__name__)

COST_KEYS = ("local_trainings", "forward_passes", "scalar_uploads", "model_uploads")


def run_comparison(cfg: ExperimentConfig, samplers: Sequence[str], seeds: Sequence[int],
                   out: str | Path, *, data_dir: str | None = None,
                   callbacks: Iterable[Callback] = ()) -> list[dict]:
    """Run every sampler x seed (skipping finished runs); returns one summary per run."""
    out = Path(out)
    summaries = []
    for name in samplers:
        for seed in seeds:
            run_dir = out / name / f"seed-{seed}"
            done = _finished(run_dir)
            if done is not None:
                log.info("%s seed %d: finished already, skipped", name, seed)
                summaries.append(done)
                continue
            one = with_sampler(cfg, name).replace(seed=seed)
            log.info("%s seed %d -> %s", name, seed, run_dir)
            summaries.append(run(one, run_dir, resume=True, data_dir=data_dir,
                                 callbacks=list(callbacks)))
    return summaries


def with_sampler(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """``cfg`` with sampler ``name``: the sampler options that ``name`` also has are kept, the
    others dropped, and the aggregator reset to the sampler's default."""
    from mmfl import registry
    from mmfl.experiment.config import config_from_dict

    raw = cfg.to_dict()
    valid = registry.get("sampler", name, key="sampler.name").options
    old = raw["sampler"]
    raw["sampler"] = {"name": name, **{k: v for k, v in old.items() if k in valid}}
    return config_from_dict(raw)


def _finished(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    s = json.loads(path.read_text(encoding="utf-8"))
    return s if s.get("status") == "completed" else None


def comparison_table(summaries: Sequence[dict]) -> list[dict]:
    """Per sampler: mean/std over seeds of the final mean and min accuracy (and of the papers'
    last-window metric), and mean total costs."""
    rows = []
    for name in dict.fromkeys(s["sampler"] for s in summaries):
        mine = [s for s in summaries if s["sampler"] == name]
        mean = np.array([s["mean_accuracy"] for s in mine])
        low = np.array([s["min_accuracy"] for s in mine])
        row = {
            "sampler": name, "seeds": len(mine),
            "mean_accuracy": float(mean.mean()), "mean_accuracy_std": float(mean.std()),
            "min_accuracy": float(low.mean()), "min_accuracy_std": float(low.std()),
            "mean_accuracy_window": float(np.mean([s["mean_accuracy_window"] for s in mine])),
            "wall_seconds": float(np.mean([s.get("wall_seconds", np.nan) for s in mine])),
        }
        for k in COST_KEYS:
            row[k] = float(np.mean([s["cost"][k] for s in mine]))
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`comparison_table` rows."""
    head = ("| sampler | seeds | mean acc | min acc | mean acc (last 20) | local trainings "
            "| forward passes | scalar uploads | model uploads | s/run |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['seeds']} | {r['mean_accuracy']:.3f} ± {r['mean_accuracy_std']:.3f} "
            f"| {r['min_accuracy']:.3f} ± {r['min_accuracy_std']:.3f} | {r['mean_accuracy_window']:.3f} "
            f"| {r['local_trainings']:.0f} | {r['forward_passes']:.0f} | {r['scalar_uploads']:.0f} "
            f"| {r['model_uploads']:.0f} | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)
