"""The world a round runs in: who is online (availability, churn), which models train (the
task schedule), and the simulated clock that finds stragglers (:mod:`mmfl.core.clock`)."""

from __future__ import annotations

import numpy as np

from mmfl.core.clock import SystemProfile, pair_seconds, round_clock
from mmfl.experiment.config import ExperimentConfig
from mmfl.rng import AVAILABILITY, CHURN, stream
from mmfl.types import Population

__all__ = ["Environment"]


class Environment:
    """Availability, churn, task schedule and straggler clock of one run.

    Args:
        cfg: the experiment (``clients`` churn keys, ``tasks`` schedule, ``system``).
        population: the federation's population (N clients, S tasks).
        profile: per-client speeds, bandwidths and availability.
        flops: (S,) training FLOPs per sample of each model.
        model_bytes: (S,) upload size of each model's update.
    """

    def __init__(self, cfg: ExperimentConfig, population: Population, profile: SystemProfile,
                 flops: np.ndarray, model_bytes: np.ndarray):
        self.cfg = cfg
        self.population = population
        self.profile = profile
        self.flops = flops
        self.model_bytes = model_bytes
        self.epochs = np.array([t.local_epochs for t in cfg.tasks])

    def available(self, t: int) -> np.ndarray:
        """(N,) bool: online in round t (random availability, late joiners, leavers)."""
        c = self.cfg.clients
        n = self.population.num_clients
        online = np.ones(n, dtype=bool)
        avail = self.profile.availability
        if (avail < 1.0).any():
            online &= stream(self.cfg.seed, AVAILABILITY, t).random(n) < avail
        if c.join_fraction or c.leave_fraction:
            order = stream(self.cfg.seed, CHURN).permutation(n)  # fixed for the whole run
            late = order[: int(round(c.join_fraction * n))]
            gone = order[n - int(round(c.leave_fraction * n)):] if c.leave_fraction else order[:0]
            if t < c.join_round:
                online[late] = False
            if c.leave_round and t >= c.leave_round:
                online[gone] = False
        return online

    def task_active(self, t: int) -> np.ndarray | None:
        """(S,) bool: models trained in round t ([start_round, stop_round)), None if all."""
        act = np.array([t >= k.start_round and not (k.stop_round and t >= k.stop_round)
                        for k in self.cfg.tasks])
        return None if act.all() else act

    def _seconds(self, clients, tasks, train, probe) -> np.ndarray:
        return pair_seconds(self.profile, clients, tasks, train, probe, self.flops,
                            self.model_bytes, self.cfg.system.flops_per_second)

    def _train_seconds(self, clients: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        n = self.population.n_samples
        return self._seconds(clients, tasks, self.epochs[tasks] * n[clients, tasks],
                             np.zeros(len(clients)))

    def clock(self, out, measured) -> tuple[float, np.ndarray]:
        """Simulated duration of the round and the (K,) bool of ``out``'s pairs past the
        deadline. Loss probes, a probe set and a full computation (``measured``, a
        :class:`~mmfl.experiment.signals.Measurements`) form a first phase that every measured
        pair finishes before sampling; the active pairs' training is the second (with a full
        computation it already happened in the first, and the deadline applies there)."""
        n = self.population.n_samples
        dl = self.cfg.system.deadline
        first = 0.0
        if measured.probe_pairs is not None:
            c, s = measured.probe_pairs
            first = float(self._seconds(c, s, np.zeros(len(c)), n[c, s]).max(initial=0.0))
        if measured.probe_set is not None:  # the probe set trains before sampling
            p = measured.probe_set
            first = max(first, float(self._train_seconds(p.clients, p.tasks).max(initial=0.0)))
        full = measured.full
        if full is not None:
            duration, on_time = round_clock(self._train_seconds(full.clients, full.tasks), dl)
            width = n.shape[0]
            late_keys = (full.tasks * width + full.clients)[~on_time]
            return first + duration, np.isin(out.tasks * width + out.clients, late_keys)
        duration, on_time = round_clock(self._train_seconds(out.clients, out.tasks), dl)
        return first + duration, ~on_time
