"""Run several samplers on one config with several seeds and tabulate accuracy and cost.

A thin layer over :mod:`mmfl.experiment.sweep`: the sweep of ``sampler.name`` x seeds, with the
run directories named ``OUT/<sampler>/seed-<seed>``; finished runs are skipped and interrupted
ones resumed, so the command can be re-issued after a crash.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mmfl.errors import MmflError
from mmfl.experiment.config import ExperimentConfig
from mmfl.experiment.recording import Callback
from mmfl.experiment.sweep import SweepCallback, plan_sweep, run_sweep, with_sampler

log = logging.getLogger(__name__)

__all__ = ["COST_KEYS", "comparison_table", "format_table", "run_comparison", "with_sampler"]

COST_KEYS = ("local_trainings", "forward_passes", "scalar_uploads", "model_uploads")


def _name(overrides: Mapping[str, Any], seed: int) -> str:
    return f"{overrides['sampler.name']}/seed-{seed}"


def run_comparison(cfg: ExperimentConfig, samplers: Sequence[str], seeds: Sequence[int],
                   out: str | Path, *, data_dir: str | None = None,
                   callbacks: Iterable[Callback] = (), jobs: int = 1,
                   sweep_callbacks: Iterable[SweepCallback] = ()) -> list[dict]:
    """Run every sampler x seed (skipping finished runs); returns one summary per run.

    ``jobs`` runs at a time in worker processes (as :func:`~mmfl.experiment.sweep.run_sweep`);
    ``callbacks`` are runner callbacks (only with ``jobs == 1``), ``sweep_callbacks`` receive
    the sweep's progress. Raises MmflError listing the failed runs, after every other run has
    finished.
    """
    plan = plan_sweep(cfg, {"sampler.name": list(samplers)}, seeds, out, naming=_name)
    result = run_sweep(plan, jobs=jobs, data_dir=data_dir, run_callbacks=list(callbacks),
                       callbacks=list(sweep_callbacks))
    if result.failures:
        raise MmflError("failed runs: " + "; ".join(f"{o.name}: {o.error}"
                                                    for o in result.failures))
    return [s for s in result.summaries if s is not None]


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
