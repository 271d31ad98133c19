"""Per-round wall time of engine ``flower`` (Flower simulation, Ray) against ``vectorized``.

Run: ``.venv/bin/python benchmarks/bench_flower_engine.py [--config configs/quickstart.toml]
[--rounds 10] [--pack pair,node] [--ray-cpus 2]`` (needs the ``flower`` extra).

Both engines run the same experiment (the config with ``rounds`` = ``--rounds``) through
:func:`mmfl.run` in this process, one after the other; each run directory's ``timing.csv``
gives the wall seconds of every round (training, aggregation and evaluation: the same
server-side work for both engines, so the difference is what Flower adds: messages, the
ClientApps' (de)serialisation and one-pair-at-a-time training in Ray workers). The per-round
figure is the mean of rounds 2..R (round 1 of the flower engine still warms the Ray workers:
shard loading, model building); start-up is the run's wall time minus its rounds (flower: Ray,
one virtual SuperNode per client, shards, node discovery). ``configs/quickstart.toml`` needs
Fashion-MNIST; without it the offline variant is used.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rounds(run: Path) -> tuple[list[float], list[float]]:
    """(round seconds, training seconds) of every round (timing.csv)."""
    with open(run / "timing.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return ([float(r["round_seconds"]) for r in rows], [float(r["train_seconds"]) for r in rows])


def _mean_accuracy(run: Path) -> float:
    import json

    return float(json.loads((run / "summary.json").read_text())["mean_accuracy"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.toml"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--pack", default="pair,node",
                    help="comma-separated flower.pack values to measure (pair, node)")
    ap.add_argument("--ray-cpus", type=int, default=2)
    args = ap.parse_args(argv)

    import mmfl
    from mmfl.errors import DataError

    cfg = mmfl.load_config(args.config, [f"rounds={args.rounds}", "eval_every=1"])
    try:
        from mmfl.experiment.federation import build_federation

        build_federation(cfg)
    except DataError as e:
        offline = ROOT / "configs" / "quickstart_offline.toml"
        print(f"{Path(args.config).name}: {e}; using {offline.name}")
        args.config = str(offline)
        cfg = mmfl.load_config(offline, [f"rounds={args.rounds}", "eval_every=1"])

    load0 = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-flower-engine-") as tmp:
        runs = [("vectorized", cfg.replace(engine="vectorized"))]
        for pack in [p.strip() for p in args.pack.split(",") if p.strip()]:
            runs.append((f"flower ({pack})", cfg.replace(**{
                "engine": "flower", "flower.pack": pack, "flower.ray_cpus": args.ray_cpus})))
        for label, c in runs:
            out = Path(tmp) / label.replace(" ", "_").replace("(", "").replace(")", "")
            t0 = time.perf_counter()
            mmfl.run(c, out)
            total = time.perf_counter() - t0
            secs, train = _rounds(out)
            results[label] = (total, secs, train, _mean_accuracy(out))
            print(f"{label}: {total:.1f} s in all", file=sys.stderr)

    n, r = cfg.clients.count, args.rounds
    print(f"{Path(args.config).name}: N={n} clients (= virtual SuperNodes), {len(cfg.tasks)} "
          f"tasks, R={r} rounds, Ray num_cpus={args.ray_cpus} (1 per ClientApp), "
          f"{os.cpu_count()} CPUs visible")
    def steady(x):  # mean of rounds 2..R
        return sum(x[1:]) / max(len(x) - 1, 1)

    base = steady(results["vectorized"][1])
    base_train = steady(results["vectorized"][2])
    header = (f"{'engine':<16} {'start-up s':>10} {'ms/round':>9} {'ratio':>7} "
              f"{'overhead ms/round':>17} {'train ms/round':>14} {'mean acc':>8}")
    print(header)
    print("-" * len(header))
    for label, (total, secs, train, acc) in results.items():
        print(f"{label:<16} {total - sum(secs):>10.2f} {1e3 * steady(secs):>9.1f} "
              f"{steady(secs) / base:>6.1f}x {1e3 * (steady(secs) - base):>17.1f} "
              f"{1e3 * steady(train):>14.1f} {acc:>8.4f}")
    print(f"(train ms/round: local training and aggregation only; vectorized "
          f"{1e3 * base_train:.1f} ms; the rest of a round is the same evaluation)")
    for label, (_, secs, _, _) in results.items():
        print(f"{label} rounds (ms): " + ", ".join(f"{1e3 * s:.0f}" for s in secs))
    print(f"load average (1 min) before / after: {load0:.2f} / {os.getloadavg()[0]:.2f} "
          "(other processes slow both sides; compare runs made at similar load)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
