"""How much optimal (GVR) sampling can reduce the variance of the unbiased aggregate.

For one experiment config and one set of global models (the initial ones, or those of a run's
checkpoint), every client trains every task it holds (the full computation of GVR), and the
script compares the variance of the unbiased aggregate (docs/algorithms.md section 3) under the
uniform sampling of ``random`` and under the optimal probabilities of section 4 with the GVR
scores U_{i,s} = d_{i,s} ||G_{i,s}|| (one processor per client in the papers' settings):

    Var(p) = sum_{i,s} (1 / p_{i,s} - 1) U_{i,s}^2 = V(p) - sum U^2    (independent inclusion),

reported relative to the squared norm of the full-participation update, sum_s ||sum_i d G||^2.
Used by docs/reproduction.md to explain where optimal sampling helps (quantity skew) and where
it cannot (near-equal clients).

    .venv/bin/python scripts/variance_gain.py configs/paper1_mlp.toml [--checkpoint RUN_DIR] [--set k=v]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mmfl import registry
from mmfl.core.probabilities import optimal_probabilities, sampling_variance, uniform_probabilities
from mmfl.experiment import checkpoint
from mmfl.experiment.config import load_config
from mmfl.experiment.federation import build_federation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--checkpoint", help="run directory whose checkpoint gives the global models")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    cfg = load_config(args.config, overrides=args.set)
    torch.set_num_threads(1)
    fed = build_federation(cfg)
    pop = fed.population
    if (pop.capacity != 1).any():
        raise SystemExit("variance_gain.py: written for one processor per client (B_i = 1)")
    engine = registry.get("engine", "vectorized").obj(fed, seed=cfg.seed, threads=1)
    params, where, round_ = engine.init_params(), "initial models", 0
    if args.checkpoint:
        arrays, meta = checkpoint.load(Path(args.checkpoint) / "checkpoint.safetensors")
        params = [torch.from_numpy(arrays[f"param.{s}"].copy()) for s in range(pop.num_tasks)]
        where, round_ = f"models after round {meta['round']} of {args.checkpoint}", meta["round"]
    clients, tasks = np.nonzero(pop.holds)
    out = engine.train(params, clients, tasks, round_)
    d = pop.data_weight  # (N, S)
    norm = np.zeros(pop.n_samples.shape)
    full_sq = 0.0
    for s, g in out.updates.items():
        c = out.clients[out.tasks == s]
        norm[c, s] = torch.linalg.vector_norm(g.double(), dim=1).numpy()
        mean = torch.from_numpy(d[c, s]) @ g.double()  # sum_i d_{i,s} G_{i,s}
        full_sq += float(mean @ mean)
    u = d * norm
    m = float(fed.budget)
    rows = []
    for name, p in (("uniform (random)", uniform_probabilities(pop.holds, m)),
                    ("optimal (gvr)", optimal_probabilities(u, m))):
        var = sampling_variance(u, p) - float(np.sum(u ** 2))
        rows.append((name, var, var / full_sq))
    print(f"{cfg.name}: {pop.num_clients} clients, {pop.num_tasks} tasks, budget m = {m:g}, {where}")
    print(f"d_i,s: min {d[pop.holds].min():.2e}  max {d[pop.holds].max():.2e};  "
          f"d||G||: coefficient of variation {u[pop.holds].std() / u[pop.holds].mean():.2f}")
    for name, var, rel in rows:
        print(f"  {name:18s} Var = {var:.4e}   relative to ||full update||^2: {rel:.2f}")
    print(f"  variance ratio uniform / optimal: {rows[0][1] / rows[1][1]:.2f}")


if __name__ == "__main__":
    main()
