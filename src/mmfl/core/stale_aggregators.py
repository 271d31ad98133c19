"""Stale-update aggregation (docs/algorithms.md section 6) and the baselines built on it.

The server keeps h_{i,s}, the last update of each pair, and applies the estimator of
docs/algorithms.md section 6.1 (unbiased for any beta fixed before the draw). As plan
coefficients: a fresh pair gets c_{i,s} = sum over its slots of d share / p (section 3), every
stored pair of an active model the stale coefficient e_{i,s} = beta_{i,s} (d_{i,s} - c_{i,s})
(c = 0 for inactive pairs). The runner then stores h_{i,s} <- G_{i,s} for the active pairs.

* ``stalevr``, ``stalevre``: the optimal / estimated beta (docs/algorithms.md section 6.2).
* ``fedvarp`` (beta = 1), ``fedstale`` (fixed beta), ``mifa`` (no 1/p, biased by design):
  docs/algorithms.md section 6.3.
"""

from __future__ import annotations

import numpy as np

from mmfl.core.aggregation import Aggregator, unbiased_plan
from mmfl.registry import Option, register
from mmfl.types import AggregationPlan, Assignment, Population, RoundState

B0 = Option(float, 0.9, "0..1",
            "beta of a pair right after it was active (StaleVRE's b0). 0.9 as in the authors' "
            "main2.py; with 1.0 and score = stored, a pair whose beta never decays scores 0 and "
            "is never sampled again")
BETA = Option(float, 0.5, "0..1", "fixed stale-update coefficient beta (FedStale)")
IDLE_MODEL = Option(str, "stale", "one of stale|skip",
                    "a model no slot trains in a round: stale = its stale sum sum_i beta d h is "
                    "applied (the estimator of docs/algorithms.md section 6.1, unbiased); skip = "
                    "the model is left unchanged that round, as the authors' aggregation loop "
                    "does (biased: the stale terms' expectation is missing)", authors="skip")


def stale_plan(assignment: Assignment, population: Population, beta: np.ndarray,
               stored: np.ndarray) -> AggregationPlan:
    """Unbiased stale-update coefficients for a (N, S) ``beta`` (section 6).

    Args:
        assignment: the round's slots.
        population: gives d_{i,s}.
        beta: (N, S) float beta_{i,s}.
        stored: (N, S) bool, pairs with a nonzero stored update h.

    Returns:
        The plan of :func:`unbiased_plan` plus stale terms e_{i,s} = beta (d - c) over the
        stored pairs, sorted by (task, client).
    """
    fresh = unbiased_plan(assignment, population)
    c = np.zeros(population.n_samples.shape)
    c[fresh.client, fresh.task] = fresh.coefficient
    e = np.where(stored, np.nan_to_num(beta) * (population.data_weight - c), 0.0)
    tasks, clients = np.nonzero((e != 0).T)
    return AggregationPlan(fresh.client, fresh.task, fresh.coefficient,
                           stale_client=clients, stale_task=tasks,
                           stale_coefficient=e[clients, tasks])


def _stored(state: RoundState) -> np.ndarray:
    """(N, S) bool: pairs with a stored update, on models active this round."""
    hn = state.signals.stale_norm_sq
    if hn is None:
        raise ValueError("stale aggregation needs signals.stale_norm_sq (the runner's store)")
    stored = np.nan_to_num(hn) > 0
    if state.task_active is not None:
        stored &= np.asarray(state.task_active, bool)[None, :]
    return stored


class StaleAggregator(Aggregator):
    """Base of the section 6 aggregators: subclasses define :meth:`beta`."""

    uses_stale = True

    def plan(self, assignment: Assignment, state: RoundState) -> AggregationPlan:
        beta = state.signals.beta if state.signals.beta is not None else self.beta(state)
        stored = _stored(state)
        if self.opt("idle_model") == "skip":  # no stale terms for a model without fresh slots
            stored &= np.isin(np.arange(stored.shape[1]), assignment.task)[None, :]
        return stale_plan(assignment, state.population, beta, stored)


@register("aggregator", "fedvarp", options={"idle_model": IDLE_MODEL},
          doc="Stale-update aggregation with beta = 1 (FedVARP).")
class FedVARPAggregator(StaleAggregator):
    def beta(self, state):
        return np.ones(state.population.n_samples.shape)


@register("aggregator", "fedstale", options={"beta": BETA, "idle_model": IDLE_MODEL},
          doc="Stale-update aggregation with a fixed beta (FedStale).")
class FedStaleAggregator(StaleAggregator):
    def beta(self, state):
        return np.full(state.population.n_samples.shape, float(self.opt("beta")))


@register("aggregator", "stalevr", options={"idle_model": IDLE_MODEL},
          doc="Stale-update aggregation with the optimal beta = <G,h>/||h||^2.")
class StaleVRAggregator(StaleAggregator):
    """beta_{i,s} = <G_{i,s}, h_{i,s}> / ||h_{i,s}||^2 (0 where h = 0): the projection minimising
    ||G - beta h||. Needs a fresh G of every pair before allocation (full computation)."""

    def beta(self, state):
        sig = state.signals
        if sig.stale_dot is None:
            raise ValueError("stalevr aggregation needs signals.stale_dot (full computation)")
        hn = np.nan_to_num(sig.stale_norm_sq)
        return np.divide(np.nan_to_num(sig.stale_dot), hn, out=np.zeros_like(hn), where=hn > 0)


SCHEDULE = Option(str, "paper", "one of paper|authors",
                  "StaleVRE's betahat after an activation in round L: paper = b0 - r (t - L); "
                  "authors = b0 - r (t - L - 1), the decay starting one round later as in the "
                  "authors' code", authors="authors")


@register("aggregator", "stalevre", options={"b0": B0, "schedule": SCHEDULE,
                                             "idle_model": IDLE_MODEL},
          doc="Stale-update aggregation with beta decaying linearly in staleness (StaleVRE).")
class StaleVREAggregator(StaleAggregator):
    """StaleVRE's estimated beta (docs/algorithms.md section 6.2).

    State per pair (N, S): ``last``, the round it was last active (-1 never), and a decay rate
    r. In round t, betahat = max(0, b0 - r (t - last)) (``schedule = "authors"``: t - last - 1),
    0 for a pair never active. On reactivation after dt rounds, r <- (b0 - beta*) / dt with the
    realised beta* = <G_new, h_old> / ||h_old||^2 (b0 when h_old = 0); r = 0 on the first.
    The state is updated by :meth:`observe` (the runner calls it after :meth:`plan`).
    """

    observes = True

    def __init__(self, options, population):
        super().__init__(options, population)
        shape = population.n_samples.shape
        self.last = np.full(shape, -1, dtype=np.int64)
        self.rate = np.zeros(shape)

    @property
    def b0(self) -> float:
        return float(self.opt("b0"))

    def beta(self, state):
        dt = state.round - self.last
        if self.opt("schedule") == "authors":
            dt = dt - 1
        return np.where(self.last >= 0, np.maximum(0.0, self.b0 - self.rate * dt), 0.0)

    def observe(self, clients: np.ndarray, tasks: np.ndarray, state: RoundState) -> None:
        """Update decay rates and last-active rounds of the active pairs (after aggregation)."""
        sig = state.signals
        hn = np.nan_to_num(sig.stale_norm_sq[clients, tasks])
        dot = np.nan_to_num(sig.stale_dot[clients, tasks]) if sig.stale_dot is not None else 0 * hn
        star = np.where(hn > 0, dot / np.where(hn > 0, hn, 1.0), self.b0)
        last = self.last[clients, tasks]
        dt = state.round - last
        self.rate[clients, tasks] = np.where(last >= 0, (self.b0 - star) / np.maximum(dt, 1), 0.0)
        self.last[clients, tasks] = state.round

    def state_dict(self):
        return {"last": self.last.copy(), "rate": self.rate.copy()}

    def load_state_dict(self, state):
        self.last[...] = state["last"]
        self.rate[...] = state["rate"]


@register("aggregator", "mifa", doc="MIFA: average of every client's latest update (no 1/p).")
class MIFAAggregator(Aggregator):
    """MIFA (docs/algorithms.md section 6.3): w_s <- w_s - eta_g sum_i d_{i,s} h_{i,s}, h replaced
    by the fresh G for the active pairs first (no 1/p; biased by design)."""

    uses_stale = True

    def plan(self, assignment, state):
        pop = state.population
        client, task = assignment.pairs()
        d = pop.data_weight
        active = np.zeros(d.shape, bool)
        active[client, task] = True
        stale = _stored(state) & ~active
        tasks, clients = np.nonzero(stale.T)
        return AggregationPlan(client, task, d[client, task], stale_client=clients,
                               stale_task=tasks, stale_coefficient=d[clients, tasks])
