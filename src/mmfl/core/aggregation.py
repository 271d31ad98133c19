"""Aggregators: turn an :class:`~mmfl.types.Assignment` into per-model coefficients.

An aggregator returns an :class:`~mmfl.types.AggregationPlan`; the engine then applies, per task s,

    w_s <- w_s - server_lr * sum_k coefficient[k] * G_{client[k], s}     (k with task[k] = s)

with G_{i,s} = w_s^t - w_{i,s} the uploaded update (docs/algorithms.md section 2). The runner sets
``server_lr`` (eta_g); plans built here carry the default 1.0. Pure numpy; inputs are never mutated.

* ``unbiased`` (docs/algorithms.md section 3): coefficient d_{i,s} * share / p summed over the slots
  of each unique active pair; its expectation is the full update over the AVAILABLE clients,
  sum_{i available} d_{i,s} G_{i,s} (d is normalised over all clients).
* ``average`` (docs/algorithms.md section 7, FedFairMMFL): per task, the data-size-weighted average
  of the assigned clients' models, as coefficients a_i = n_{i,s} / sum_j n_{j,s} (sum over the
  task's unique assigned clients) on G; tasks without an assigned client are unchanged.

:func:`apply_plan` is a numpy reference implementation of the update, for tests and engines.
"""

from __future__ import annotations

import numpy as np

from mmfl.registry import Component, register
from mmfl.types import AggregationPlan, Assignment, Population, RoundState

__all__ = [
    "Aggregator",
    "AverageAggregator",
    "UnbiasedAggregator",
    "apply_plan",
    "average_plan",
    "unbiased_plan",
]


class Aggregator(Component):
    """Base class of every aggregator. Constructed as ``cls(options, population)``.

    :meth:`plan` is pure; an aggregator with state (StaleVRE's decay) sets ``observes`` and
    updates it in :meth:`observe`, which the runner calls with the planned pairs.

    Attributes:
        uses_stale: True when plans carry stale terms; the runner then keeps a store of every
            pair's last update h_{i,s} and fills ``state.signals.stale_norm_sq`` / ``stale_dot``.
        observes: True when the runner must call :meth:`observe` after every plan.
    """

    uses_stale: bool = False
    observes: bool = False

    def __init__(self, options: dict | None, population: Population) -> None:
        super().__init__(options)
        self.population = population

    def plan(self, assignment: Assignment, state: RoundState) -> AggregationPlan:
        """The coefficients of round ``state.round`` for ``assignment``."""
        raise NotImplementedError

    def beta(self, state: RoundState) -> np.ndarray | None:
        """(N, S) stale coefficients beta_{i,s} this round will use (docs/algorithms.md section 6),
        given before allocation so that samplers can score with them; None if not stale."""
        return None

    def observe(self, clients: np.ndarray, tasks: np.ndarray, state: RoundState) -> None:
        """After :meth:`plan`: the round's planned pairs ((U,) clients and tasks) and the state
        it was planned with; no-op by default."""
        return None


def _pair_index(assignment: Assignment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(client (U,), task (U,), slot -> pair index (K,)) with pairs sorted by (task, client)."""
    client, task = assignment.pairs()
    if assignment.num_slots == 0:
        return client, task, np.zeros(0, np.int64)
    width = int(assignment.client.max()) + 1
    keys = task * width + client
    slot_keys = assignment.task * width + assignment.client
    return client, task, np.searchsorted(keys, slot_keys)


def unbiased_plan(assignment: Assignment, population: Population) -> AggregationPlan:
    """Unbiased inverse-probability coefficients (docs/algorithms.md section 3).

    coefficient(i, s) = sum over slots k of (i, s) of d_{i,s} * share_k / p_k, where share_k is
    1/B_i for processor slots and 1 for client-level slots. Slots of one client that drew the same
    model are merged into one pair (its update is computed once and used for both).

    Args:
        assignment: K slots.
        population: gives d_{i,s} (N, S).

    Returns:
        An :class:`AggregationPlan` with U unique pairs sorted by (task, client).
    """
    client, task, idx = _pair_index(assignment)
    d = population.data_weight[assignment.client, assignment.task]
    per_slot = d * assignment.share / assignment.probability
    coef = np.zeros(client.size)
    np.add.at(coef, idx, per_slot)
    return AggregationPlan(client=client, task=task, coefficient=coef)


def average_plan(assignment: Assignment, population: Population) -> AggregationPlan:
    """Data-size-weighted model averaging as update coefficients (docs/algorithms.md section 7).

    Coefficient a_i = n_{i,s} / sum_{j in A_s} n_{j,s} on G_{i,s}, A_s the unique clients
    assigned to s (equivalent to w_s <- sum a_i w_{i,s}). Duplicate slots of one pair count
    once. A task whose assigned clients all hold zero samples of it (impossible for the
    built-in samplers) gets equal weights 1/|A_s|. Arguments and result as
    :func:`unbiased_plan` (``population`` gives n_{i,s}).
    """
    client, task, _ = _pair_index(assignment)
    n = population.n_samples[client, task].astype(np.float64)
    s_count = population.num_tasks
    tot = np.bincount(task, weights=n, minlength=s_count)
    cnt = np.bincount(task, minlength=s_count).astype(np.float64)
    coef = np.where(tot[task] > 0, n / np.where(tot[task] > 0, tot[task], 1.0), 0.0)
    zero = tot[task] <= 0
    coef[zero] = 1.0 / cnt[task[zero]]
    return AggregationPlan(client=client, task=task, coefficient=coef)


@register("aggregator", "unbiased", options={},
          doc="Unbiased inverse-probability weights d * share / p (docs/algorithms.md section 3).")
class UnbiasedAggregator(Aggregator):
    """Unbiased aggregation (docs/algorithms.md section 3); see :func:`unbiased_plan`.

    E[update] = sum over available i of d_{i,s} G_{i,s} when the slot probabilities are the true
    inclusion probabilities (for ``full``: exactly that, deterministically).
    """

    def plan(self, assignment: Assignment, state: RoundState) -> AggregationPlan:
        return unbiased_plan(assignment, state.population)


@register("aggregator", "average", options={},
          doc="Per-task data-size-weighted average of assigned clients' models (FedFairMMFL).")
class AverageAggregator(Aggregator):
    """FedFairMMFL averaging (docs/algorithms.md section 7); see :func:`average_plan`."""

    def plan(self, assignment: Assignment, state: RoundState) -> AggregationPlan:
        return average_plan(assignment, state.population)


def apply_plan(
    params: list[np.ndarray], updates: dict[tuple[int, int], np.ndarray], plan: AggregationPlan
) -> list[np.ndarray]:
    """Numpy reference of the server update (returns new arrays; inputs untouched).

    Args:
        params: length-S list, params[s] the flat (or any-shape) array w_s.
        updates: (client, task) -> G_{i,s}, same shape as params[task]; must contain every pair
            of ``plan``.
        plan: the coefficients.

    Returns:
        New list: w_s - plan.server_lr * sum_k coefficient[k] * G_{client[k], s}.
    """
    out = [np.array(w, dtype=np.float64, copy=True) for w in params]
    for i, s, c in zip(plan.client.tolist(), plan.task.tolist(), plan.coefficient.tolist()):
        out[s] = out[s] - plan.server_lr * c * np.asarray(updates[(i, s)], dtype=np.float64)
    return out
