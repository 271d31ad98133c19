"""Device conformance and speed: the same experiments with ``device = "cpu"`` and on a GPU.

Run: ``.venv/bin/python benchmarks/bench_device.py [--rounds 4] [--clients 40] [--device cuda]``

For each case (one per vectorized-engine path: the batched-matmul ``mlp``, the grouped-conv
``cnn``, the ``torch.func`` generic path with a regression model, and the batch-norm CNN with
Adam of ``examples/own_model.py``, which trains one client at a time, and an MLP with batch
norm and plain SGD, whose batch norm the generic path batches) and each engine
(``vectorized``, ``sequential``), the experiment runs ``--rounds`` rounds on the CPU and, when
torch sees a GPU, on ``--device``:

* ``max |d acc|``, ``max |d loss|``: conformance, the largest difference between the CPU's and
  the device's test accuracy (R^2 for the regression case) and test loss over every evaluated
  round and task (float32 rounding differs between the two; mmfl.engines.device lists the
  determinism switches);
* ``rerun``: the largest difference between two runs on the device (0 where its kernels are
  deterministic);
* ``cpu s/round``, ``dev s/round``: median wall seconds per round (``timing.csv``, the first
  round left out: it pays CUDA's start-up), and their ratio.

Without a GPU the script says so and times the CPU side only. Every number is measured in the
run; nothing is asserted on a time.
"""

from __future__ import annotations

import argparse
import csv
import runpy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import mmfl

ROOT = Path(__file__).resolve().parents[1]

#: (label, task table); the examples' models and datasets are registered at start
CASES = [
    ("mlp digits (batched matmul)", {"dataset": "digits", "model": "mlp", "lr": 0.1,
                                     "batch_size": 16, "local_epochs": 2}),
    ("cnn digits (grouped conv)", {"dataset": "digits", "model": "cnn", "lr": 0.05,
                                   "model_options": {"hidden": 128}, "batch_size": 8}),
    ("regression diabetes (vmap)", {"dataset": "diabetes", "model": "regressor", "lr": 0.01,
                                    "optimizer": "adam", "batch_size": 16, "local_epochs": 2}),
    ("BN CNN + Adam digits", {"dataset": "digits", "model": "small_cnn", "lr": 0.01,
                              "optimizer": "adam", "batch_size": 16}),
    ("BN MLP + SGD digits (batched BN)", {"dataset": "digits", "model": "bn_mlp_bench",
                                          "lr": 0.05, "batch_size": 16, "local_epochs": 2,
                                          "partition": {"kind": "iid"}}),
]


def run_case(task: dict, engine: str, device: str, rounds: int, clients: int,
             out: Path) -> tuple[np.ndarray, float]:
    """(R x S x 2 accuracy and loss, median seconds per round after the first) of one run."""
    cfg = mmfl.config_from_dict({
        "name": "bench-device", "seed": 0, "rounds": rounds, "engine": engine, "device": device,
        "threads": 1, "clients": {"count": clients, "active_rate": 0.5},
        "sampler": {"name": "random"}, "tasks": [{"name": "t", **task}]})
    mmfl.run(cfg, out)
    with open(out / "metrics.csv", newline="") as f:
        metrics = np.array([[float(r["accuracy"]), float(r["loss"])] for r in csv.DictReader(f)])
    with open(out / "timing.csv", newline="") as f:
        seconds = [float(r["round_seconds"]) for r in csv.DictReader(f)]
    return metrics, float(np.median(seconds[1:] if len(seconds) > 1 else seconds))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=40)
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU")
    ap.add_argument("--cases", default="", help="comma-separated case numbers (default: all)")
    args = ap.parse_args(argv)
    for example in ("own_model.py", "regression.py"):  # registers small_cnn, diabetes, ...
        runpy.run_path(str(ROOT / "examples" / example))
    bn_mlp = runpy.run_path(str(ROOT / "benchmarks" / "bench_engine.py"))["bn_mlp"]
    mmfl.register("model", "bn_mlp_bench")(bn_mlp)
    gpu = torch.cuda.is_available()
    chosen = [int(c) for c in args.cases.split(",") if c] or range(len(CASES))
    print(f"torch {torch.__version__}; " + (
        f"device {args.device}: {torch.cuda.get_device_name(torch.device(args.device))}" if gpu
        else "no GPU is available (torch.cuda.is_available() is False): CPU side only"))
    print(f"{args.rounds} rounds, {args.clients} clients, half of them active per round")
    head = (f"{'case':<33} {'engine':<11} {'cpu s/round':>11} {'dev s/round':>11} "
            f"{'speed-up':>8} {'max |d acc|':>11} {'max |d loss|':>12} {'rerun':>8}")
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory(prefix="mmfl-bench-device-") as tmp:
        for c in chosen:
            label, task = CASES[c]
            for engine in ("vectorized", "sequential"):
                base = Path(tmp) / f"{c}-{engine}"
                cpu, t_cpu = run_case(task, engine, "cpu", args.rounds, args.clients,
                                      base / "cpu")
                cols = ["-"] * 5
                if gpu:
                    dev, t_dev = run_case(task, engine, args.device, args.rounds,
                                          args.clients, base / "dev")
                    again, _ = run_case(task, engine, args.device, args.rounds, args.clients,
                                        base / "again")
                    d = np.abs(dev - cpu).max(axis=0)
                    cols = [f"{t_dev:.4f}", f"{t_cpu / t_dev:.2f}x", f"{d[0]:.2e}",
                            f"{d[1]:.2e}", f"{np.abs(again - dev).max():.1e}"]
                print(f"{label:<33} {engine:<11} {t_cpu:>11.4f} {cols[0]:>11} {cols[1]:>8} "
                      f"{cols[2]:>11} {cols[3]:>12} {cols[4]:>8}")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
