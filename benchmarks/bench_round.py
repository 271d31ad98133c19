"""End-to-end speed where users feel it: seconds per round, the time a round spends outside
training and evaluation, and the start-up of a run. Every number is measured in this run.

Run: ``.venv/bin/python benchmarks/bench_round.py [--rounds 30] [--clients 100]``

* ``vectorized`` / ``sequential``: median wall seconds of a whole round (from the end of one
  round, its tables and checkpoint written, to the end of the next; rounds 2 .. R-1, no
  evaluation in them) of ``--clients`` active clients doing one
  local step each over 2 digits tasks (N = clients, one processor each, C = 1, batch 64 >= every
  client's samples, checkpoint every round); ``ratio`` = sequential / vectorized (issue target:
  >= 5x at 100 clients).
* ``outside train+eval``: the median, over the same rounds, of the round's wall time minus the
  time spent in the engine's ``train``, ``probe_losses`` and ``evaluate`` (measured by a timing
  subclass of the engine): allocation, aggregation and apply, bookkeeping, the tables and the
  checkpoint (target: <= 5 ms at 100 clients).
* ``start-up``: wall seconds of ``mmfl run configs/quickstart.toml --set rounds=1`` in a fresh
  process, minus that round's own seconds: imports, data, federation, models, the run folder.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def config(clients: int, rounds: int, engine: str):
    from mmfl.experiment.config import config_from_dict

    task = {"dataset": "digits", "model": "mlp", "lr": 0.1, "local_epochs": 1, "batch_size": 64,
            "partition": {"kind": "iid"}}
    return config_from_dict({
        "name": "bench_round", "seed": 0, "rounds": rounds, "engine": engine,
        "eval_every": 10 ** 6, "threads": 1,
        "clients": {"count": clients, "active_rate": 1.0, "processors": 1},
        "sampler": {"name": "random"},
        "tasks": [{"name": "a", **task}, {"name": "b", **task}],
    })


def timed_engine(cls, spent: list[float]):
    """A subclass of engine ``cls`` that adds the seconds of train, probe_losses and evaluate
    to ``spent[-1]`` (a new entry is appended per round by the caller)."""

    class Timed(cls):
        def _timed(self, name, *args, **kwargs):
            t = time.perf_counter()
            try:
                return getattr(super(), name)(*args, **kwargs)
            finally:
                spent[-1] += time.perf_counter() - t

        def train(self, *a, **k):
            return self._timed("train", *a, **k)

        def probe_losses(self, *a, **k):
            return self._timed("probe_losses", *a, **k)

        def evaluate(self, *a, **k):
            return self._timed("evaluate", *a, **k)

    return Timed


class RoundMark:
    """Callback: the wall clock at the end of every round (after its tables and checkpoint),
    and a new entry of ``spent`` per round."""

    def __init__(self, spent: list[float]):
        self.spent = spent
        self.marks: list[float] = []

    def on_start(self, cfg, federation, start_round):
        self.spent[:] = [0.0]
        self.marks = [time.perf_counter()]

    def on_round(self, record):
        self.marks.append(time.perf_counter())
        self.spent.append(0.0)

    def on_end(self, summary):
        pass


def run_engine(engine: str, clients: int, rounds: int, folder: Path) -> tuple[float, float]:
    """(median round seconds, median seconds outside train/probe/evaluate) of one run."""
    from mmfl import registry
    from mmfl.experiment.runner import Runner

    cfg = config(clients, rounds, engine)
    spent: list[float] = [0.0]
    cls = timed_engine(registry.get("engine", engine).obj, spent)
    mark = RoundMark(spent)
    runner = Runner(cfg, folder / engine, callbacks=[mark],
                    engine_factory=lambda fed: cls(fed, seed=cfg.seed, threads=1))
    runner.run()
    wall = np.diff(mark.marks)  # round k: from the end of round k-1 to the end of round k
    inside = np.array(spent[:len(wall)])
    keep = slice(1, len(wall) - 1)  # not round 1 (warm-up) nor the last (it evaluates)
    return float(np.median(wall[keep])), float(np.median((wall - inside)[keep]))


def start_up(folder: Path) -> tuple[float, float]:
    """(wall seconds of a 1-round quickstart in a fresh process, that round's seconds)."""
    out = folder / "quickstart"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmfl.cli", "run", str(ROOT / "configs/quickstart.toml"),
                    "--set", "rounds=1", "--out", str(out), "--progress", "none"],
                   check=True, capture_output=True)
    wall = time.perf_counter() - t
    with open(out / "timing.csv", newline="") as f:
        first = float(next(csv.DictReader(f))["round_seconds"])
    return wall, first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, default=100)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        res = {e: run_engine(e, args.clients, args.rounds, folder)
               for e in ("vectorized", "sequential")}
        wall, first = start_up(folder)
    print(f"{args.clients} active clients, 1 local step each, 2 digits tasks, {args.rounds} "
          "rounds, checkpoint every round, one torch thread\n")
    print(f"{'engine':<12}{'s/round':>10}{'outside train+eval ms':>24}")
    for e, (r, o) in res.items():
        print(f"{e:<12}{r:>10.4f}{o * 1e3:>24.2f}")
    ratio = res["sequential"][0] / res["vectorized"][0]
    print(f"\nratio sequential / vectorized: {ratio:.1f}x (target >= 5x)")
    print(f"vectorized outside train+eval: {res['vectorized'][1] * 1e3:.2f} ms "
          f"(target <= 5 ms at 100 clients)")
    print(f"start-up of the quickstart to the end of round 1: {wall:.2f} s "
          f"(of which round 1: {first:.2f} s; start-up {wall - first:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
