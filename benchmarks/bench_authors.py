"""Seconds per round of mmfl against the authors' code on configs/paper1_authors.toml, and each
side's fraction of the machine's measured FLOP limit for the same work.

Both sides run the same methods for the same rounds in this process's run, one after the other
(never at the same time), with the same number of torch threads:

* mmfl: ``mmfl.run`` of configs/paper1_authors.toml with ``sampler.name`` = method, ``rounds`` =
  ``--rounds``, ``threads`` = ``--threads``, through a counting subclass of the vectorized
  engine that adds up the samples each round trains (x local epochs), probes (LVR) and
  evaluates. Seconds per round from the run's timing.csv.
* the authors' code: ``--authors-cmd`` is a shell command template run once per method, with
  ``{method}``, ``{rounds}`` and ``{out}`` substituted; it must write ``{out}/rounds.csv`` with a
  ``seconds`` column per round (docs/reproduction.md: the scratch copy, its patches and the
  driver that does this). ``--authors-runs DIR`` instead reads earlier runs of their code
  (``DIR/<method>_s1/rounds.csv``, e.g. the differential study's): then the two sides were not
  measured in the same run, and the table says so. Without either only mmfl runs.

The FLOP limit: F = forward FLOPs of one sample of the model (mmfl's analytic count; the
authors' model is the same network). One round's work is 3 F per trained sample-epoch (forward
+ backward), F per probed or evaluated sample. The machine's limit for it is measured here on
one plain PyTorch loop of the same model with as many torch threads as the run's ``threads``
resolves to (``--threads 1,auto`` prints one table per setting): SGD steps on batches of 500
(training rate) and forward passes on batches of 500 (inference rate); the limit seconds of a
round are train_flops / training rate + inference_flops / inference rate, and a side's fraction
is limit seconds / its seconds per round. Round 1 is left out of the means (start-up work).

    .venv/bin/python benchmarks/bench_authors.py --methods random,lvr --rounds 4 \
        --authors-cmd 'bash /work/scratch/bench_authors_side.sh {method} {rounds} {out}'
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import mmfl
from mmfl.engines.vectorized import VectorizedEngine
from mmfl.experiment.config import load_config
from mmfl.registry import register
from mmfl.tasks.models import build_model
from mmfl.threads import resolve_threads

ROOT = Path(__file__).resolve().parents[1]
#: the authors' full-participation baseline runs on its own federation (--venn_list 1 0 0
#: --client_cpu 1 0 0): every client holds every task and has one processor
METHOD_SETS = {"full": ["clients.tasks_per_client=0", "clients.processors=1"]}
COUNTS: dict[str, float] = {"train": 0.0, "infer": 0.0}


@register("engine", "counting_vectorized")
class CountingEngine(VectorizedEngine):
    """The vectorized engine, adding up the samples of every train / probe / evaluate call."""

    def train(self, params, clients, tasks, round, corrections=None):
        for i, s in zip(np.asarray(clients).tolist(), np.asarray(tasks).tolist()):
            td = self.federation.tasks[s]
            COUNTS["train"] += len(td.client_indices[i]) * td.spec.local_epochs
        return super().train(params, clients, tasks, round, corrections)

    def probe_losses(self, params, clients, tasks):
        for i, s in zip(np.asarray(clients).tolist(), np.asarray(tasks).tolist()):
            COUNTS["infer"] += len(self.federation.tasks[s].client_indices[i])
        return super().probe_losses(params, clients, tasks)

    def evaluate(self, params):
        COUNTS["infer"] += sum(len(y) for y in self.test_y)
        return super().evaluate(params)


def machine_rates(model_name: str, threads: int, repeat: int = 5) -> tuple[float, float, float]:
    """(F forward FLOPs per sample, training samples/s, inference samples/s) of one plain
    PyTorch loop of the model on 28x28 inputs: SGD steps at batch 500 (the regime's batch),
    forward passes at the faster of batch 500 and 4,096 (mmfl's evaluation batch); best of
    ``repeat`` after a warm-up."""
    from mmfl.engines.base import count_flops

    torch.set_num_threads(threads)
    model = build_model(model_name, {}, (1, 28, 28), 10, init_seed=0)
    x = torch.randn(4096, 1, 28, 28)
    y = torch.randint(0, 10, (500,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    best_t = float("inf")
    rate_i = 0.0
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        F.nll_loss(model(x[:500]), y).backward()
        opt.step()
        best_t = min(best_t, time.perf_counter() - t0)
        with torch.no_grad():
            for b in (500, 4096):
                t0 = time.perf_counter()
                model(x[:b])
                rate_i = max(rate_i, b / (time.perf_counter() - t0))
    return float(count_flops(model, x[:1])), 500 / best_t, rate_i


def mmfl_side(method: str, rounds: int, threads: str, out: Path) -> tuple[float, float, float]:
    """(seconds per round, trained sample-epochs per round, inferred samples per round)."""
    cfg = load_config(ROOT / "configs" / "paper1_authors.toml",
                      [f"sampler.name={method}", f"rounds={rounds}", f"threads={threads}",
                       "engine=counting_vectorized", *METHOD_SETS.get(method, [])])
    COUNTS.update(train=0.0, infer=0.0)
    mmfl.run(cfg, out)
    with open(out / "timing.csv", newline="") as f:
        secs = np.array([float(r["round_seconds"]) for r in csv.DictReader(f)])
    return float(secs[1:].mean()), COUNTS["train"] / rounds, COUNTS["infer"] / rounds


def authors_side(template: str, method: str, rounds: int, out: Path) -> float:
    cmd = template.format(method=shlex.quote(method), rounds=rounds, out=shlex.quote(str(out)))
    subprocess.run(cmd, shell=True, check=True)
    return read_seconds(out)


def read_seconds(folder: Path) -> float:
    """Mean seconds per round (rounds 2..) of a ``rounds.csv`` of the authors' code."""
    with open(folder / "rounds.csv", newline="") as f:
        secs = np.array([float(r["seconds"]) for r in csv.DictReader(f)])
    return float(secs[1:].mean() if len(secs) > 1 else secs.mean())


def table(args: argparse.Namespace, threads: str) -> None:
    """Print the table of one thread setting (``threads`` = an int or "auto"; the limit is
    measured with as many torch threads as the setting resolves to on this machine)."""
    n = resolve_threads(threads if threads == "auto" else int(threads))
    f, train_rate, infer_rate = machine_rates("authors_cnn", n)
    print(f"threads = {threads}: authors_cnn {f / 1e6:.1f} MFLOP forward per sample; one plain "
          f"loop with {n} torch thread(s): {train_rate:,.0f} training samples/s "
          f"({3 * f * train_rate / 1e9:.1f} GFLOP/s), {infer_rate:,.0f} inference samples/s "
          f"({f * infer_rate / 1e9:.1f} GFLOP/s)\n")
    print("| method | limit s/round | mmfl s/round | mmfl % of limit | authors s/round "
          "| authors % of limit | authors / mmfl |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods.split(","):
            secs, train, infer = mmfl_side(m, args.rounds, threads, Path(tmp) / f"mmfl-{m}")
            limit = train / train_rate + infer / infer_rate
            row = [m, f"{limit:.2f}", f"{secs:.2f}", f"{100 * limit / secs:.0f}%"]
            a = None
            if args.authors_cmd:
                a = authors_side(args.authors_cmd, m, args.rounds, Path(tmp) / f"authors-{m}")
            elif args.authors_runs is not None and (args.authors_runs / f"{m}_s1").exists():
                a = read_seconds(args.authors_runs / f"{m}_s1")
            if a is not None:
                row += [f"{a:.2f}", f"{100 * limit / a:.0f}%", f"{a / secs:.2f}x"]
            else:
                row += ["-", "-", "-"]
            print("| " + " | ".join(row) + " |", flush=True)
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="random,lvr,gvr,full")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1",
                    help="comma-separated thread settings, each an int or auto (one table each)")
    ap.add_argument("--authors-cmd", default="", help="shell template, see the module doc")
    ap.add_argument("--authors-runs", type=Path, default=None,
                    help="folder of earlier runs of the authors' code (not the same run)")
    args = ap.parse_args(argv)
    if args.authors_runs is not None and not args.authors_cmd:
        print(f"authors' seconds per round read from earlier runs in {args.authors_runs} "
              "(not measured in this run)\n")
    for threads in args.threads.split(","):
        table(args, threads.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
