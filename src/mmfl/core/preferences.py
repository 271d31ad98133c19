"""Clients' task preferences and refusals (docs/algorithms.md section 3.3).

Client i's willingness to train model s is w_{i,s} in [0, 1]: 1 willing, 0 a refusal, values in
between a soft preference (arXiv:2404.13841 v2, the journal version of FedFairMMFL, lets clients
prefer some tasks and refuse others). In mmfl:

* a refusal (w_{i,s} = 0) makes the pair ineligible: :func:`restrict_population` gives a
  population in which client i holds no data for s, so no sampler assigns it and d_{i,s} is
  renormalised over the willing holders (d'_{i,s} = n_{i,s} / sum_{j: w_{j,s} > 0} n_{j,s});
* a soft preference lets an assigned pair decline with probability 1 - w_{i,s}
  (:func:`decline`, one uniform number per assigned pair from its own stream): the pair is
  dropped before training, its slots are wasted;
* a preference-aware sampler reports the effective inclusion probability p_{s|b} w_{i(b),s} of
  every slot (:func:`effective_assignment`), so the 1/p-weighted aggregate stays unbiased over
  the willing pairs; without it the aggregate is biased by -sum_i (1 - w_{i,s}) d'_{i,s} G_{i,s}.

Pure numpy; every random number comes from the generator passed in; nothing mutates its inputs.
"""

from __future__ import annotations

import numpy as np

from mmfl.types import Assignment, Population

__all__ = ["decline", "draw_willingness", "effective_assignment", "restrict_population",
           "willingness_bias"]


def draw_willingness(levels: tuple[tuple[float, float], ...], shape: tuple[int, int],
                     rng: np.random.Generator) -> np.ndarray:
    """w_{i,s} drawn independently per pair from a discrete distribution.

    One uniform number per entry of the whole (N, S) grid, row by row, whether or not client i
    holds s, so a pair's value does not depend on the others' holdings (a population restricted
    by :func:`restrict_population` draws the same matrix again).

    Args:
        levels: ((w, probability), ...) with w in [0, 1] and probabilities summing to 1.
        shape: (N, S).
        rng: the generator; consumed by exactly N * S uniform draws.

    Returns:
        (N, S) float willingness matrix.
    """
    w = np.array([v for v, _ in levels], np.float64)
    prob = np.array([p for _, p in levels], np.float64)
    cdf = np.cumsum(prob)
    cdf[-1] = 1.0  # rounding in the sum must not leave a gap at the top
    u = rng.random(shape)
    return w[np.minimum(np.searchsorted(cdf, u, side="right"), len(w) - 1)]


def restrict_population(population: Population, willingness: np.ndarray) -> Population:
    """The population in which refused pairs (w_{i,s} = 0) hold no data: n'_{i,s} = 0 there.

    Every sampler then treats a refusal like a pair the client does not hold, and the data
    weights become d'_{i,s} = n_{i,s} / sum_{j: w_{j,s} > 0} n_{j,s}: unbiased aggregation
    targets the full-participation update of the willing holders.

    Args:
        population: the federation's population (N clients, S tasks).
        willingness: (N, S) float in [0, 1].

    Returns:
        ``population`` itself when nothing is refused, else a new Population.
    """
    refused = (np.asarray(willingness) <= 0) & population.holds
    if not refused.any():
        return population
    return Population(np.where(refused, 0, population.n_samples), population.capacity,
                      population.task_names)


def _slot_willingness(assignment: Assignment, willingness: np.ndarray) -> np.ndarray:
    """(K,) w_{client_k, task_k} of every slot."""
    return np.asarray(willingness, np.float64)[assignment.client, assignment.task]


def effective_assignment(assignment: Assignment, willingness: np.ndarray,
                         population: Population) -> Assignment:
    """The assignment with effective inclusion probabilities p_{s|b} w_{i(b),s}.

    A slot trains when it is drawn (probability p_{s|b}) and its client accepts (probability
    w_{i,s}, independently), so its coefficient d_{i,s} share / (p w) has expectation
    d_{i,s} share: unbiased (docs/algorithms.md section 3.3). Slots of refused pairs cannot be
    in ``assignment`` (:func:`restrict_population`).

    Args:
        assignment: the sampler's assignment.
        willingness: (N, S) float; > 0 on every slot's pair.
        population: gives i(b) for the rows of a processor-level probability matrix.

    Returns:
        A new Assignment: ``probability`` p w per slot, ``probabilities`` the (P, S) (or client-
        level (N, S)) matrix times w of each row's client, ``expected_slots`` its sum.

    Raises:
        ValueError: a slot's pair has w = 0.
    """
    w = np.asarray(willingness, np.float64)
    ws = _slot_willingness(assignment, w)
    if (ws <= 0).any():
        raise ValueError("effective_assignment: a slot of a refused pair (w = 0)")
    mat = assignment.probabilities
    rows = w[population.processor_client] if mat.shape[0] == population.num_processors else w
    return Assignment(assignment.processor, assignment.client, assignment.task,
                      assignment.probability * ws, assignment.share, mat * rows,
                      assignment.note)


def decline(assignment: Assignment, willingness: np.ndarray,
            rng: np.random.Generator) -> tuple[Assignment, np.ndarray]:
    """Each assigned (client, task) pair declines with probability 1 - w_{i,s}.

    One uniform number u per unique pair, in ``assignment.pairs()`` order (by task, then
    client); the pair declines when u >= w_{i,s}, so w = 1 never declines. A declining pair
    loses every slot (its processors idle: wasted budget).

    Args:
        assignment: the drawn assignment (K slots, U unique pairs).
        willingness: (N, S) float in [0, 1].
        rng: the generator; consumed by exactly U uniform draws.

    Returns:
        (the assignment without the declined pairs' slots, with their count in its note;
        (K,) bool, the slots that were declined).
    """
    clients, tasks = assignment.pairs()
    u = rng.random(clients.size)
    gone = u >= np.asarray(willingness, np.float64)[clients, tasks]
    if not gone.any():
        return assignment, np.zeros(assignment.num_slots, bool)
    width = int(clients.max()) + 1
    slots = np.isin(assignment.task * width + assignment.client,
                    tasks[gone] * width + clients[gone])
    kept = assignment.without_pairs(clients[gone], tasks[gone],
                                    note=f"{int(slots.sum())} slot(s) declined (preferences)")
    return kept, slots


def willingness_bias(willingness: np.ndarray, data_weight: np.ndarray,
                     updates: np.ndarray) -> np.ndarray:
    """(S, D) bias of the preference-unaware unbiased aggregate under declines:

        E[estimate_s] - sum_i d_{i,s} G_{i,s} = -sum_i (1 - w_{i,s}) d_{i,s} G_{i,s}

    Args:
        willingness: (N, S) w_{i,s}.
        data_weight: (N, S) d'_{i,s} of the restricted population (:func:`restrict_population`).
        updates: (N, S, D) G_{i,s}.

    Returns:
        (S, D) float.
    """
    return -np.einsum("is,isk->sk", (1.0 - np.asarray(willingness, np.float64)) *
                      np.asarray(data_weight, np.float64), np.asarray(updates, np.float64))
