"""Scale and paper-federation benchmarks: federation size, round time, memory, throughput.

Run: ``.venv/bin/python benchmarks/bench_scale.py [--part scale|paper|all] [--clients 1000,100000]
[--repeat 2] [--models mlp,cnn] [--samplers random,lvr,gvr] [--cnn-train 6000]``

Every number is measured in this run, on this machine (the table headers say what is in them);
nothing here asserts on a time.

Part 1, scale (each N in a fresh subprocess, so peak memory does not mix):
    N clients, 3 tasks (mlp on ``synthetic``, natural partition, ``num_groups = N`` devices of
    ``mean_samples = 20``: every client holds one device of about 16 training samples, for every
    task; the three tasks share one generated dataset since their options are equal), one
    processor per client, ``clients.budget = 100`` processors per round, ``random`` sampler,
    ``vectorized`` engine, E = 5, batch 10. Evaluation is kept out of the way: ``eval_every``
    is larger than the run and ``test_samples = 200``; checkpoints only after the last round.

    * ``build s``: :func:`build_federation` (dataset generation, membership, partitions), cold.
    * ``setup s``: the runner's construction up to its first round (federation again, with the
      dataset cached in-process; allocator, engine, ``federation.json``).
    * ``round ms``: median wall time between consecutive rounds 2..R-1 (round 1 is warm-up; the
      last round is left out because it always evaluates and checkpoints).
    * ``peak RSS MiB``: ``VmHWM`` of the subprocess (targets: <= 4 GiB, round time within 20%
      between N = 1,000 and N = 100,000).

Part 2, the paper-1 federation (docs/algorithms.md section 8): N = 120 clients, one processor each,
S = 5 ``fashion_mnist`` tasks held by every client, label skew ``classes`` with class_ratio 0.3
(3 classes per client), quantity skew 90% of the clients share 10% of the data, C = 0.1 (m =
12), E = 5, batch 500 (full batch for small clients), lr 0.01.

    * round times of the samplers random, lvr, gvr with ``mlp`` and ``cnn`` (median over rounds
      2..R-1 as above; the final evaluation uses ``test_samples``). The cnn runs use a random
      ``--cnn-train`` samples per task (default 6,000 of 60,000): on a CPU one cnn round of
      lvr (which favours the data-rich clients and probes every sample) or gvr (which trains
      every pair) on the whole set takes many minutes.
    * throughput of gvr's full computation (``engine.train`` of every eligible pair: 5 tasks x
      120 clients) in samples/s (E * n_i summed), against a centralized PyTorch loop of the same
      model (nn.Module, torch.optim.SGD, autograd) whose per-step batch is the sum over one
      task's clients of min(batch, n_i), i.e. all clients' batches together (target >= 50%).
      ``--passes`` (default 2) alternates the two sides and reports each side's best pass and
      the ratio of every pass (a load change on a shared machine hits both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

SCALE_ROUNDS = 12


def peak_rss_mib() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    """Runner callback: wall time of each round (from the previous round's end)."""

    def __init__(self):
        self.marks: list[float] = []

    def on_start(self, cfg, federation, start_round):
        self.marks = [time.perf_counter()]

    def on_round(self, record):
        self.marks.append(time.perf_counter())

    def on_end(self, summary):
        pass

    def round_seconds(self) -> np.ndarray:
        return np.diff(self.marks)


def steady(seconds: np.ndarray) -> float:
    """Median of rounds 2..R-1 (round 1 warm-up, round R evaluates); round 2 if R <= 3.
    The median, not the mean: a round that another process on the machine slowed down
    should not decide the comparison."""
    inner = seconds[1:-1] if len(seconds) > 3 else seconds[1:2]
    return float(np.median(inner))


# --------------------------------------------------------------------------------------------
# part 1: scale


def scale_config(n: int, rounds: int = SCALE_ROUNDS):
    from mmfl.experiment.config import config_from_dict

    tasks = [{"name": f"syn{k}", "dataset": "synthetic", "model": "mlp", "lr": 0.05,
              "local_epochs": 5, "batch_size": 10, "test_samples": 200,
              "dataset_options": {"num_groups": n, "mean_samples": 20},
              "partition": {"kind": "natural"}} for k in range(3)]
    return config_from_dict({
        "name": f"scale{n}", "seed": 0, "rounds": rounds, "engine": "vectorized",
        "eval_every": 10_000, "checkpoint_every": 10_000,
        "clients": {"count": n, "budget": 100, "processors": 1, "tasks_per_client": 0},
        "sampler": {"name": "random"}, "tasks": tasks})


def scale_child(n: int, profile: str | None) -> dict:
    """One N, in this (fresh) process; returns the measurements."""
    from mmfl.experiment.federation import build_federation
    from mmfl.experiment.runner import Runner

    cfg = scale_config(n)
    t0 = time.perf_counter()
    fed = build_federation(cfg)
    build = time.perf_counter() - t0
    holders = int((fed.population.n_samples > 0).any(axis=1).sum())
    samples = int(fed.population.n_samples.sum())
    del fed
    timer = Timer()
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        Runner(cfg, out, callbacks=[timer]).run()
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)
    secs = timer.round_seconds()
    return {"N": n, "holders": holders, "samples": samples, "build": build,
            "setup": timer.marks[0] - t0, "round_ms": 1e3 * steady(secs),
            "rounds_ms": [round(1e3 * float(s)) for s in secs], "peak_mib": peak_rss_mib()}


def part_scale(sizes: list[int], repeat: int, profile_dir: str | None) -> None:
    print("== scale: 3 synthetic/mlp tasks, natural partition (one device of ~16 train samples "
          "per client and task), 1 processor per client, budget 100, random sampler, "
          "vectorized engine, E=5, batch 10")
    print(f"   evaluation kept out: eval_every > rounds, test_samples=200; {SCALE_ROUNDS} rounds, "
          f"round ms = median of rounds 2..{SCALE_ROUNDS - 1} (1 = warm-up, last = "
          f"eval+checkpoint); the sizes run {repeat}x interleaved, 'vs first' compares with "
          "the first size of the same pass")
    head = (f"{'N':>8} {'samples':>10} {'build s':>8} {'setup s':>8} {'round ms':>9} "
            f"{'vs first':>8} {'peak RSS MiB':>13}  rounds ms")
    print(head)
    print("-" * len(head))
    for _ in range(repeat):
        base = None
        for n in sizes:
            cmd = [sys.executable, os.path.abspath(__file__), "--child-scale", str(n)]
            if profile_dir:
                cmd += ["--profile", os.path.join(profile_dir, f"scale{n}.prof")]
            done = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if done.returncode:
                print(f"{n:>8} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            base = base or r["round_ms"]
            print(f"{n:>8,} {r['samples']:>10,} {r['build']:>8.2f} {r['setup']:>8.2f} "
                  f"{r['round_ms']:>9.1f} {r['round_ms'] / base:>7.2f}x {r['peak_mib']:>13.0f}  "
                  f"{r['rounds_ms']}")
            sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# part 2: the paper-1 federation


def paper_config(model: str, sampler: str, rounds: int, train_samples: int = 0):
    from mmfl.experiment.config import config_from_dict

    tasks = [{"name": f"fmnist{k}", "dataset": "fashion_mnist", "model": model, "lr": 0.01,
              "local_epochs": 5, "batch_size": 500, "test_samples": 1000,
              "train_samples": train_samples,
              "partition": {"kind": "classes", "class_ratio": 0.3,
                            "quantity_skew": {"clients": 0.9, "data": 0.1}}}
             for k in range(5)]
    return config_from_dict({
        "name": f"paper1-{model}-{sampler}", "seed": 0, "rounds": rounds,
        "engine": "vectorized", "eval_every": 10_000, "checkpoint_every": 10_000,
        "clients": {"count": 120, "active_rate": 0.1, "processors": 1, "tasks_per_client": 0},
        "sampler": {"name": sampler}, "tasks": tasks})


def paper_rounds(model: str, sampler: str, rounds: int, train_samples: int) -> tuple[float, list]:
    from mmfl.experiment.runner import Runner

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        Runner(paper_config(model, sampler, rounds, train_samples), out, callbacks=[timer]).run()
    secs = timer.round_seconds()
    return steady(secs), [round(float(s), 2) for s in secs]


def central_throughput(fed, step_batch: int, samples: int, seed: int = 0) -> float:
    """samples/s of a plain PyTorch loop of task 0's model, batch ``step_batch``."""
    import torch
    import torch.nn.functional as F

    from mmfl.tasks.models import build_model

    td = fed.tasks[0]
    ds, cfg = td.dataset, td.spec
    torch.set_num_threads(1)  # as the engine (threads = 1)
    model = build_model(cfg.model, dict(cfg.model_options), ds.input_shape, ds.num_classes, seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    x = torch.from_numpy(np.ascontiguousarray(ds.x_train, np.float32))
    y = torch.from_numpy(np.ascontiguousarray(ds.y_train, np.int64))
    steps = max(2, samples // step_batch)
    order = torch.from_numpy(np.random.default_rng(seed).integers(0, len(y), (steps, step_batch)))

    def step(t):
        b = order[t]
        opt.zero_grad(set_to_none=True)
        F.nll_loss(model(x[b]), y[b]).backward()
        opt.step()

    step(0)  # warm-up
    t0 = time.perf_counter()
    for t in range(1, steps):
        step(t)
    return (steps - 1) * step_batch / (time.perf_counter() - t0)


def full_computation_throughput(model: str, train_samples: int, max_pairs: int = 0,
                                passes: int = 1) -> dict:
    """gvr's full computation (every eligible pair trains) vs the centralized loop.

    ``max_pairs`` > 0 trains only that many pairs of task 0, drawn at random (a fixed stream),
    with the centralized batch built from the same clients. With ``passes`` > 1 the two sides
    alternate (vec, central, vec, central, ...) so that a change of machine load hits both;
    each side's best pass is reported, and ``ratios`` holds vec/central of every pass."""
    from mmfl import registry
    from mmfl.experiment.federation import build_federation

    cfg = paper_config(model, "gvr", 1, train_samples)
    fed = build_federation(cfg)
    eng = registry.get("engine", "vectorized").obj(fed, seed=cfg.seed, threads=cfg.threads)
    params = eng.init_params()
    tasks, clients = np.nonzero(fed.population.n_samples.T > 0)
    if max_pairs:
        pick = np.sort(np.random.default_rng(0).choice(
            np.flatnonzero(tasks == 0), size=min(max_pairs, int((tasks == 0).sum())),
            replace=False))
        tasks, clients = tasks[pick], clients[pick]
    E, batch = cfg.tasks[0].local_epochs, cfg.tasks[0].batch_size
    samples = int(fed.population.n_samples[clients, tasks].sum()) * E
    n0 = fed.population.n_samples[clients[tasks == 0], 0]
    step_batch = int(np.minimum(n0[n0 > 0], batch).sum())
    eng.train(params, clients[:2], tasks[:2], 0)  # warm-up (first-call set-up, allocator)
    vec, central = [], []
    for _ in range(max(1, passes)):
        t0 = time.perf_counter()
        eng.train(params, clients, tasks, 0)
        vec.append(samples / (time.perf_counter() - t0))
        central.append(central_throughput(fed, step_batch, int(n0.sum()) * E))
    return {"pairs": len(clients), "samples": samples, "seconds": samples / max(vec),
            "vec": max(vec), "central": max(central), "step_batch": step_batch,
            "ratios": [v / c for v, c in zip(vec, central)]}


def part_paper(models: list[str], samplers: list[str], cnn_train: int, cnn_pairs: int,
               skip: set[str], passes: int = 1) -> None:
    print("\n== paper-1 federation: N=120, S=5 fashion_mnist, classes 0.3 (3 classes/client), "
          "quantity skew 90%/10%, C=0.1 (m=12), E=5, batch 500, lr 0.01; vectorized engine, "
          "threads=1 (the config default; the centralized loop below runs with the same)")
    print("   round s = median of rounds 2..R-1 (round 1 warm-up, round R evaluates with "
          "test_samples=1000); mlp R=4, cnn R=3 (round 2 only)")
    head = f"{'model':<5} {'sampler':<7} {'train set':>10} {'round s':>8}  all rounds s"
    print(head)
    print("-" * len(head))
    for model in models:
        for sampler in samplers:
            ts = cnn_train if model == "cnn" else 0
            rounds = 4 if model == "mlp" else 3
            if f"{model}:{sampler}" in skip:
                print(f"{model:<5} {sampler:<7} {'':>10} {'skipped':>8}  (--skip {model}:{sampler})")
                continue
            mean, secs = paper_rounds(model, sampler, rounds, ts)
            label = f"{ts}/task" if ts else "full"
            print(f"{model:<5} {sampler:<7} {label:>10} {mean:>8.2f}  {secs}")
            sys.stdout.flush()
    if passes <= 0:
        return
    print("\n   gvr full computation (all 600 pairs, E=5; cnn: --cnn-pairs random pairs of task 0) "
          "vs centralized loop of one model, per-step batch = sum_i min(500, n_i) over one "
          "task's (listed) clients")
    head = (f"{'model':<5} {'train set':>10} {'pairs':>5} {'samples':>10} {'seconds':>8} "
            f"{'vec samples/s':>14} {'step batch':>10} {'central samples/s':>18} "
            f"{'vec/central':>11}")
    print(head)
    print("-" * len(head))
    for model in models:
        ts = cnn_train if model == "cnn" else 0
        r = full_computation_throughput(model, ts, cnn_pairs if model == "cnn" else 0, passes)
        label = f"{ts}/task" if ts else "full"
        print(f"{model:<5} {label:>10} {r['pairs']:>5} {r['samples']:>10,} {r['seconds']:>8.2f} "
              f"{r['vec']:>14,.0f} {r['step_batch']:>10,} {r['central']:>18,.0f} "
              f"{100 * r['vec'] / r['central']:>10.0f}%  per pass "
              f"{', '.join(f'{100 * x:.0f}%' for x in r['ratios'])}")
        sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("scale", "paper", "all"), default="all")
    ap.add_argument("--clients", default="1000,100000", help="scale: comma-separated N")
    ap.add_argument("--repeat", type=int, default=2, help="scale: interleaved passes")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--samplers", default="random,lvr,gvr",
                    help="paper round timings ('' = none, only the throughput table)")
    ap.add_argument("--cnn-train", type=int, default=6000,
                    help="train_samples per task of the cnn runs (0 = the whole 60,000)")
    ap.add_argument("--cnn-pairs", type=int, default=24,
                    help="cnn throughput: train this many random pairs of task 0 (0 = all 600)")
    ap.add_argument("--skip", default="cnn:gvr",
                    help="model:sampler round timings to skip (comma-separated; cnn:gvr trains "
                         "all 600 pairs per round: with --cnn-train 6000 about 150,000 CNN "
                         "sample-steps, minutes per round on a CPU)")
    ap.add_argument("--passes", type=int, default=2,
                    help="paper throughput: alternating vec/central passes (best of each; "
                         "0 = skip the throughput table)")
    ap.add_argument("--profile-dir", default=None, help="scale: write cProfile stats per N here")
    ap.add_argument("--child-scale", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_scale:
        print(json.dumps(scale_child(args.child_scale, args.profile)))
        return 0
    if args.part in ("scale", "all"):
        part_scale([int(c) for c in args.clients.split(",") if c], args.repeat, args.profile_dir)
    if args.part in ("paper", "all"):
        part_paper(args.models.split(","), [x for x in args.samplers.split(",") if x],
                   args.cnn_train, args.cnn_pairs, set(filter(None, args.skip.split(","))),
                   args.passes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
