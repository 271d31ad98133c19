"""Text description of a federation (``mmfl describe``)."""

from __future__ import annotations

import numpy as np

from mmfl.experiment.config import ExperimentConfig
from mmfl.experiment.federation import Federation
from mmfl.experiment.preferences import Preferences


def _stats(x: np.ndarray) -> str:
    if len(x) == 0:
        return "-"
    return f"min {int(x.min())}, median {int(np.median(x))}, max {int(x.max())}"


def unheld_classes(td) -> list[int]:
    """Classes of a task (TaskData) that no client holds a training sample of."""
    ds = td.dataset
    if ds.regression:  # real-valued targets: no classes
        return []
    parts = [idx for idx in td.client_indices if len(idx)]
    held = np.unique(ds.y_train[np.concatenate(parts)]) if parts else np.zeros(0, np.int64)
    return sorted(set(range(ds.num_classes)) - set(held.tolist()))


def describe_federation(cfg: ExperimentConfig, fed: Federation) -> str:
    """A multi-line summary: clients, processors, budget, and per task the partition."""
    pop = fed.population
    cap_vals, cap_counts = np.unique(pop.capacity, return_counts=True)
    lines = [
        f"experiment {cfg.name!r}: seed {cfg.seed}, {cfg.rounds} rounds, engine {cfg.engine}, "
        f"sampler {cfg.sampler.name}",
        f"clients N = {pop.num_clients}; processors P = {pop.num_processors} "
        f"(B_i: {', '.join(f'{v} x{c}' for v, c in zip(cap_vals, cap_counts))}); "
        f"budget m = {fed.budget} updates per round; availability {cfg.clients.availability:g}",
        "tasks per client: "
        + ", ".join(f"{k}: {c}" for k, c in zip(*np.unique(pop.holds.sum(1), return_counts=True))),
    ]
    prefs = Preferences.from_config(cfg, pop).summary()  # clients.preferences
    if prefs["refused_pairs"] or prefs["soft_pairs"]:
        lines.append(f"preferences: {prefs['refused_pairs']} held pairs refused (never assigned), "
                     f"{prefs['soft_pairs']} soft (decline with probability 1 - w); sampler "
                     f"{'preference-aware' if prefs['aware'] else 'unaware'}")
    costs = cfg.clients.costs  # clients.costs: mmfl's own auction (docs/incentives.md)
    if costs != 0:
        c = f"uniform [{costs[0]:g}, {costs[1]:g})" if isinstance(costs, tuple) else f"{costs:g}"
        lines.append(f"incentives: costs per pair {c}, payment budget B = "
                     f"{cfg.clients.payment_budget:g} per round (mmfl's own auction, not the "
                     f"paper's); recruitment-"
                     f"{'aware' if cfg.clients.recruitment_aware else 'unaware'}")
    for s, td in enumerate(fed.tasks):
        t, ds = cfg.tasks[s], td.dataset
        n = pop.n_samples[:, s]
        held = n > 0
        regression = ds.regression
        opts = ", ".join(f"{k}={v}" for k, v in t.partition.options.items())
        if regression:
            y = np.asarray(ds.y_train, np.float64)
            kind, per_client = f"{ds.num_classes} regression targets", ""
            targets = f"    train targets: mean {y.mean():.4g}, std {y.std():.4g} (loss mse)"
        else:
            classes = np.array([len(np.unique(ds.y_train[idx]))
                                for idx in td.client_indices if len(idx)])
            kind = f"{ds.num_classes} classes"
            per_client = f"; classes per client {_stats(classes)}"
            hist = np.bincount(ds.y_train, minlength=ds.num_classes).tolist()
            targets = f"    train label histogram {hist}"
        lines += [
            f"task {s} {t.name}: dataset {t.dataset} ({len(ds.y_train)} train / {len(ds.y_test)} "
            f"test, {kind}, input {tuple(ds.input_shape)}), model {t.model}, "
            f"lr {t.lr:g}, E {t.local_epochs}, batch {t.batch_size}",
            f"    partition {t.partition.kind}({opts}); held by {int(held.sum())} clients; "
            f"samples per client {_stats(n[held])}{per_client}",
            targets,
        ]
        unheld = unheld_classes(td)
        if unheld:
            lines.append(f"    warning: classes {unheld} are held by no client: the model never "
                         "trains on them, yet they are in its test set")
    return "\n".join(lines)
