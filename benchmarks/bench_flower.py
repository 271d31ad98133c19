"""Per-round speed of mmfl's engines vs Flower's simulation engine on the same FedAvg workload.

Run: ``.venv/bin/python benchmarks/bench_flower.py [--clients 50] [--sampled 20] [--rounds 5]``
(needs the ``bench`` extra: ``.venv/bin/pip install -e '.[bench]'``, i.e. flwr[simulation]).

The workload (one task, defaults): ``mlp`` on ``synthetic`` data (FedProx synthetic(1, 1), one
natural group per client), ``--partition`` iid, N = ``--clients`` clients, K = ``--sampled``
clients per round drawn uniformly without replacement from ``numpy.random.default_rng(seed)``
(one list per round, computed once and given to both sides), E = ``--epochs`` local epochs of
plain SGD (lr ``--lr``) with batch B = ``--batch``, then FedAvg: the new global model is the
n_i-weighted average of the K returned models.

* mmfl (``vectorized`` and ``sequential``): per round ``engine.train`` + an AggregationPlan with
  coefficients n_i / sum n (mmfl's ``average`` aggregator) + ``engine.apply``; best of
  ``--repeat`` whole runs. Start-up = build_federation + engine construction.
* Flower 1.42 (``flwr.simulation.run_simulation``, Ray backend, N virtual SuperNodes, Ray
  limited to ``--ray-cpus`` CPUs, 1 CPU per ClientApp, torch/OMP threads 1 in every actor):
  ``benchmarks/flower_fedavg``. Its ClientApp trains on the batches of mmfl's
  ``local_batches`` (same seed, round, client, task) with ``torch.optim.SGD`` from the same
  initial parameters (``build_model`` with mmfl's init seed), so the final models agree up to
  float32 rounding. Start-up (Ray, actors, node discovery, one warm-up ``query`` message per
  node) is reported on its own and is not in the per-round time; a round is: build the
  messages, ``grid.send_and_receive`` until all K replies are in, FedAvg. Flower's
  ``ms/round`` is the mean of rounds 2..R (round 1 still pays for warm-up inside Ray); the mean
  of all R rounds, the fastest round and every round are printed under the table.

Every number is measured in this run. ``ratio`` is Flower's per-round time over the row's
(target of the fast-engine issue: Flower / vectorized >= 20x). ``max |dw|`` is the largest
absolute difference between the row's final flat parameters and Flower's after R rounds.
"""

from __future__ import annotations

import os

# threads must be pinned before torch (and Ray) start; Ray actors inherit these variables
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmfl import registry  # noqa: E402
from mmfl.experiment.config import config_from_dict  # noqa: E402
from mmfl.experiment.federation import build_federation  # noqa: E402
from mmfl.rng import torch_seed  # noqa: E402
from mmfl.tasks.models import build_model  # noqa: E402
from mmfl.types import AggregationPlan  # noqa: E402

HERE = Path(__file__).resolve().parent


def experiment(args) -> dict:
    """The mmfl config (as a plain dict) both sides rebuild the federation from."""
    part = {"kind": args.partition}
    if args.partition == "dirichlet":
        part["alpha"] = args.alpha
    task = {"name": "t", "dataset": args.dataset, "model": args.model, "lr": args.lr,
            "local_epochs": args.epochs, "batch_size": args.batch, "partition": part}
    if args.dataset == "synthetic":
        task["dataset_options"] = {"num_groups": args.clients, "mean_samples": args.samples}
    return {"name": "bench-flower", "seed": args.seed, "rounds": args.rounds,
            "clients": {"count": args.clients, "active_rate": 1.0},
            "sampler": {"name": "full"}, "tasks": [task]}


def sample_rounds(n_clients: int, k: int, rounds: int, seed: int) -> list[list[int]]:
    """Per round, K distinct clients drawn uniformly (sorted); the same lists for every side."""
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(n_clients, size=k, replace=False).tolist()) for _ in range(rounds)]


def run_mmfl(engine, fed, rounds, w0: torch.Tensor, repeat: int):
    """(best mean seconds per round, final flat params) of R FedAvg rounds with ``engine``
    from the initial parameters ``w0``."""
    n = fed.population.n_samples[:, 0]
    best, final = float("inf"), None
    for _ in range(repeat):
        # not engine.init_params(): the sequential engine trains its module in place, so after
        # a train() that returns the last client's weights, not the initial ones
        params = [w0.clone()]
        t0 = time.perf_counter()
        for t, clients in enumerate(rounds):
            clients = np.asarray(clients, np.int64)
            tasks = np.zeros(len(clients), np.int64)
            out = engine.train(params, clients, tasks, t)
            plan = AggregationPlan(client=clients, task=tasks,
                                   coefficient=n[clients] / n[clients].sum())
            params = engine.apply(params, out, plan)
        best = min(best, (time.perf_counter() - t0) / len(rounds))
        final = params[0]
    return best, final


def run_flower(spec: str, rounds, init: list[np.ndarray], args) -> dict:
    """Run the Flower simulation; returns the ServerApp's ``results`` plus total/teardown times."""
    try:
        from flwr.simulation import run_simulation
    except ImportError as e:
        raise SystemExit(f"flwr is not installed ({e}); install the bench extra: "
                         ".venv/bin/pip install -e '.[bench]'") from None
    sys.path.insert(0, str(HERE))  # Flower hands sys.path to the Ray workers as PYTHONPATH
    from flower_fedavg.client_app import app as client_app
    from flower_fedavg.server_app import make_server_app

    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    results: dict = {}
    t0 = time.perf_counter()
    server_app = make_server_app(spec, rounds, init, args.clients, results, t0)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": args.ray_cpus, "num_gpus": 0,
                      "log_to_driver": bool(args.verbose)},
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_name="ray", backend_config=backend_config,
                   verbose_logging=args.verbose)
    done = time.perf_counter()
    if "error" in results:
        raise RuntimeError(f"Flower ServerApp failed: {results['error']!r}") from results["error"]
    if "final" not in results:
        raise RuntimeError("the Flower simulation ended without running the ServerApp's rounds "
                           "(run with --verbose to see Flower's log)")
    results["total_s"] = done - t0
    results["teardown_s"] = done - results["end"]
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50, help="N clients (= Flower SuperNodes)")
    ap.add_argument("--sampled", type=int, default=20, help="K clients per round")
    ap.add_argument("--rounds", type=int, default=5, help="R rounds")
    ap.add_argument("--epochs", type=int, default=2, help="E local epochs")
    ap.add_argument("--batch", type=int, default=16, help="B batch size")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--samples", type=int, default=200, help="synthetic: mean samples per group")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    ap.add_argument("--alpha", type=float, default=0.3, help="dirichlet concentration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the mmfl engines")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs Ray may use (num_cpus)")
    ap.add_argument("--repeat", type=int, default=3, help="mmfl: best of this many runs")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="max |w_flower - w_mmfl| accepted after R rounds (exit 1 above it)")
    ap.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    args = ap.parse_args(argv)
    if not 0 < args.sampled <= args.clients:
        ap.error("--sampled must be in 1..--clients")

    load0 = os.getloadavg()[0]
    raw = experiment(args)
    spec = json.dumps(raw, sort_keys=True)
    rounds = sample_rounds(args.clients, args.sampled, args.rounds, args.seed)

    t0 = time.perf_counter()
    fed = build_federation(config_from_dict(raw))
    t_fed = time.perf_counter() - t0
    engines = {}
    for name in ("vectorized", "sequential"):
        t0 = time.perf_counter()
        engines[name] = registry.get("engine", name).obj(fed, seed=args.seed, threads=args.threads)
        engines[name + "_startup"] = t_fed + time.perf_counter() - t0
    torch.set_num_threads(args.threads)

    # Flower starts from the same initial model as mmfl (mmfl's init seed for task 0)
    td = fed.tasks[0]
    model = build_model(td.spec.model, dict(td.spec.model_options),
                        tuple(td.dataset.input_shape), td.dataset.num_classes,
                        torch_seed(args.seed, "init", 0))
    init = [p.detach().numpy().copy() for p in model.parameters()]
    w0 = engines["vectorized"].init_params()[0].clone()
    assert torch.equal(torch.from_numpy(np.concatenate([a.ravel() for a in init])), w0)

    n = fed.population.n_samples[:, 0]
    steps = sum(int(np.ceil(n[i] / args.batch)) * args.epochs for r in rounds for i in r)
    print(f"torch {torch.__version__}, mmfl threads={args.threads}, Ray num_cpus={args.ray_cpus} "
          f"(1 per ClientApp), {os.cpu_count()} CPUs visible")
    print(f"workload: {args.model} on {args.dataset} ({args.partition}), N={args.clients}, "
          f"K={args.sampled}, R={args.rounds}, E={args.epochs}, B={args.batch}, lr={args.lr}, "
          f"D={w0.numel()} parameters, {len(td.dataset.y_train)} train samples, "
          f"{steps / args.rounds:.0f} local SGD steps per round (all clients)")
    sys.stdout.flush()

    timing, final = {}, {}
    for name in ("vectorized", "sequential"):
        timing[name], final[name] = run_mmfl(engines[name], fed, rounds, w0, args.repeat)

    flower = run_flower(spec, rounds, init, args)
    w_flower = torch.from_numpy(np.concatenate([a.ravel() for a in flower["final"]]))
    # Flower's per-round time: rounds 2..R (round 1 still pays for warm-up inside Ray); the
    # mean over all R rounds is printed below the table as well
    steady = flower["round_s"][1:] or flower["round_s"]
    r_fl = float(np.mean(steady))
    r_all = float(np.mean(flower["round_s"]))

    rows = [("mmfl vectorized", engines["vectorized_startup"], timing["vectorized"],
             final["vectorized"]),
            ("mmfl sequential", engines["sequential_startup"], timing["sequential"],
             final["sequential"]),
            ("Flower simulation (Ray)", flower["startup_s"], r_fl, w_flower)]
    header = (f"{'engine':<24} {'start-up s':>10} {'ms/round':>9} {'ratio':>7} "
              f"{'max |dw| vs Flower':>18} {'test acc':>8}")
    print()
    print(header)
    print("-" * len(header))
    evaluator = engines["vectorized"]
    worst = 0.0
    for label, startup, per_round, w in rows:
        diff = float((w - w_flower).abs().max())
        worst = max(worst, diff)
        acc, _ = evaluator.evaluate([w])
        print(f"{label:<24} {startup:>10.2f} {1e3 * per_round:>9.1f} {r_fl / per_round:>6.1f}x "
              f"{diff:>18.2e} {acc[0]:>8.4f}")
    print()
    seq_vec = float((final["sequential"] - final["vectorized"]).abs().max())
    print(f"max |dw| sequential vs vectorized: {seq_vec:.2e}; "
          f"initial-to-final max |dw|: {float((w_flower - w0).abs().max()):.2e}")
    print(f"Flower per round, mean over all {args.rounds} rounds: {1e3 * r_all:.1f} ms "
          f"(ratio to vectorized {r_all / timing['vectorized']:.1f}x, to sequential "
          f"{r_all / timing['sequential']:.1f}x); the table uses rounds 2..{args.rounds}")
    best = min(steady)
    print(f"Flower's fastest round (of rounds 2..{args.rounds}): {1e3 * best:.1f} ms "
          f"(ratio to vectorized {best / timing['vectorized']:.1f}x)")
    print("Flower rounds (ms): " + ", ".join(f"{1e3 * s:.0f}" for s in flower["round_s"])
          + "; of which ClientApp training summed over clients (ms): "
          + ", ".join(f"{1e3 * s:.0f}" for s in flower["client_train_s"]))
    print(f"Flower start-up {flower['startup_s']:.2f} s (Ray + {args.clients} SuperNodes + one "
          f"warm-up query each), teardown {flower['teardown_s']:.2f} s, "
          f"run_simulation total {flower['total_s']:.2f} s")
    print("load average (1 min) before / after: {:.2f} / {:.2f} on {} CPUs (other processes "
          "on the machine slow both sides; compare runs made at similar load)".format(
              load0, os.getloadavg()[0], os.cpu_count()))
    ok = worst <= args.tolerance
    print(f"final models agree within {args.tolerance:g}: {'yes' if ok else 'NO'} "
          f"(worst {worst:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
