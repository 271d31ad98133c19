"""Allocators (client samplers + model assignment): random, round_robin, full, fedfair.

An allocator turns a :class:`~mmfl.types.RoundState` into an :class:`~mmfl.types.Assignment`:
which processors train which model this round, and with which inclusion probability
(docs/algorithms.md sections 1 and 7). Everything here is pure numpy; all randomness comes from the
``rng`` argument of :meth:`Allocator.allocate`, and no function mutates its inputs.

Notation (docs/algorithms.md section 1): ``i`` client (N), ``s`` model/task (S), ``b`` processor (P),
``B_i`` processors of client i (contiguous: ``population.first_processor[i]`` ..
``first_processor[i] + B_i - 1``), ``m`` budget, ``p_{s|b}`` inclusion probability.

The drawing rules and processor-level building blocks live in :mod:`mmfl.core.drawing`;
:func:`fedfair_distribution` (the alpha-fair model distribution of FedFairMMFL) is reusable.
"""

from __future__ import annotations

import numpy as np

from mmfl.core.drawing import (DRAW_OPTION, draw, fixed_assignment, held_uniform, row_patterns,
                               uniform_processor_rates)
from mmfl.registry import Component, Option, register
from mmfl.types import Assignment, Population, RoundState, Signal

__all__ = [
    "Allocator",
    "FairAllocator",
    "FullAllocator",
    "RandomAllocator",
    "RoundRobinAllocator",
    "fedfair_distribution",
    "round_robin_schedule",
]


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class Allocator(Component):
    """Base class of every sampler. Constructed as ``cls(options, population, seed)``.

    Attributes:
        default_aggregator: registry name of the aggregator used when the config says "default".
        needs_fresh_task_losses: ``RoundState.task_losses`` and ``task_accuracies`` hold the
            latest evaluation ((S,) test-split values); when True they are of the current
            global models: the runner evaluates them before allocating if the previous round
            was not evaluated.
    """

    default_aggregator: str = "unbiased"
    needs_fresh_task_losses: bool = False
    #: signals the runner gathers before :meth:`allocate` (:class:`~mmfl.types.Signal`; the
    #: values land in :class:`~mmfl.types.Signals`)
    requires: frozenset[Signal] = frozenset()
    #: when True the runner calls :meth:`observe` after every aggregation
    observes: bool = False
    #: when True :meth:`observe` needs ``update_norm`` of the aggregated pairs also in rounds
    #: without a full computation (the runner then computes it from the round's updates)
    observes_update_norm: bool = False
    #: when True the runner hands the clients' class sets to :meth:`set_held_classes` once,
    #: before round 0 (label grouping; the core never sees the data itself)
    needs_held_classes: bool = False

    def __init__(self, options: dict | None, population: Population, seed: int = 0) -> None:
        super().__init__(options)
        self.population = population
        self.seed = int(seed)

    def allocate(self, state: RoundState, rng: np.random.Generator) -> Assignment:
        """The assignment of round ``state.round``; every random draw comes from ``rng``."""
        raise NotImplementedError

    def requires_at(self, round: int) -> frozenset[Signal]:
        """The signals to gather before round ``round``'s allocation (:attr:`requires` by
        default; a sampler whose needs change over the rounds overrides this)."""
        return self.requires

    def probe_pairs(self, state: RoundState) -> np.ndarray:
        """(N, S) bool: pairs whose local loss is probed this round (when
        ``Signal.LOCAL_LOSS`` is required); all eligible pairs by default."""
        return state.eligible

    def set_held_classes(self, held: list[np.ndarray]) -> None:
        """Per task s an (N, K_s) bool matrix: client i holds a training sample of class c
        (called once when :attr:`needs_held_classes`; no-op by default)."""
        return None

    def observe(self, clients: np.ndarray, tasks: np.ndarray, state: RoundState) -> None:
        """Called by the runner after aggregation with the round's aggregated pairs ((U,)
        clients and tasks) and the state whose signals hold, for those pairs, ``update_norm``
        (||G|| / eta_s; in rounds without a full computation only with
        :attr:`observes_update_norm`) and, with a stale store, ``stale_dot`` / ``stale_norm_sq`` of the h
        stored before this round; no-op by default."""
        return None


# --------------------------------------------------------------------------------------------
# random
# --------------------------------------------------------------------------------------------


@register(
    "sampler",
    "random",
    options={
        "draw": DRAW_OPTION,
        "probability": Option(
            str,
            "true",
            "one of true|authors",
            "true: aggregate with the true inclusion probability q_b / |S_i| and the 1/B_i share "
            "(unbiased); authors: weight every slot d * S / C with C = m / P and no 1/B_i share, "
            "as the authors' code does (biased; docs/algorithms.md section 9).",
            authors="authors",
        ),
    },
    doc="Uniform processor sampling, then a uniform model among the client's held tasks.",
)
class RandomAllocator(Allocator):
    """Uniform random sampling (docs/algorithms.md section 7, "random").

    Each eligible processor is active with q_b = min(1, m / P_eligible) and trains a uniform
    choice among its client's held tasks S_i: p_{s|b} = q_b / |S_i| for held s, 0 otherwise.

    Options:
        draw: "independent" (default; :func:`draw`) or "fixed" (exactly round(m) processors
            without replacement; raises ValueError for a fractional m).
        probability: "true" (default) or "authors": every slot reports p = C / S with
            C = min(1, m / P) over all P processors (the authors' code uses the configured
            active rate, equal up to the floor in m = floor(C P)) and share 1, so its
            coefficient is d_{i,s} S / C. Biased unless every client has one processor and
            holds all S tasks (docs/algorithms.md section 9). ``Assignment.probabilities``
            keeps the true matrix.
    """

    def allocate(self, state: RoundState, rng: np.random.Generator) -> Assignment:
        q, note = uniform_processor_rates(state)
        cond = held_uniform(state)
        probs = q[:, None] * cond
        authors = self.opt("probability") == "authors"
        if self.opt("draw") == "fixed":
            slot_p = probs
            a = fixed_assignment(state, q > 0, cond, probs, slot_p, rng, note)
        else:
            a = draw(probs, state.population, rng, note=note)
        if authors:
            pop = state.population
            c = min(1.0, float(state.budget) / max(pop.num_processors, 1))
            authors_p = c / max(pop.num_tasks, 1)
            extra = "probability=authors: slot probabilities are C/S (biased; matrix is true)"
            a = Assignment(
                processor=a.processor,
                client=a.client,
                task=a.task,
                probability=np.full(a.num_slots, authors_p),
                share=np.ones(a.num_slots),
                probabilities=a.probabilities,
                note="; ".join(x for x in (a.note, extra) if x),
            )
        return a


# --------------------------------------------------------------------------------------------
# round_robin
# --------------------------------------------------------------------------------------------


def round_robin_schedule(population: Population, round: int) -> np.ndarray:
    """(P,) int: the model each processor trains in round ``round`` under round-robin.

    Client i's start k = (floor(i S / N) + round) mod S, moved on cyclically to its first held
    model >= k; its j-th processor takes the j-th held model from there, cyclically
    (docs/algorithms.md section 7). Processors of clients holding no task get -1.
    """
    pop = population
    n, s_count = pop.num_clients, pop.num_tasks
    out = np.full(pop.num_processors, -1, np.int64)
    if n == 0 or s_count == 0:
        return out
    holds = pop.holds
    size = holds.sum(axis=1)                                   # |S_i|
    # held models of each client in ascending order first (stable sort of "not held")
    held_sorted = np.argsort(~holds, axis=1, kind="stable")
    k = (np.arange(n, dtype=np.int64) * s_count // n + int(round)) % s_count
    below = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(holds, axis=1)], axis=1)
    start = below[np.arange(n), k]                             # held models < k = first >= k
    client = pop.processor_client
    ok = size[client] > 0
    b = np.flatnonzero(ok)
    i = client[b]
    j = b - pop.first_processor[i]                             # processor index within client
    out[b] = held_sorted[i, (start[i] + j) % size[i]]
    return out


def _round_robin_frequency(population: Population) -> np.ndarray:
    """(P, S) float: fraction of rounds (over one period of S rounds) processor b trains s."""
    s_count = population.num_tasks
    freq = np.zeros((population.num_processors, s_count))
    rows = np.arange(population.num_processors)
    for t in range(s_count):
        sched = round_robin_schedule(population, t)
        ok = sched >= 0
        freq[rows[ok], sched[ok]] += 1.0
    return freq / max(s_count, 1)


@register(
    "sampler",
    "round_robin",
    options={"draw": DRAW_OPTION},
    doc="Round-robin model rotation; processors sampled uniformly like random.",
)
class RoundRobinAllocator(Allocator):
    """Round-robin model assignment (docs/algorithms.md section 7, "round_robin").

    Models follow :func:`round_robin_schedule`; processors are sampled like ``random``.
    ``Assignment.probabilities`` holds q_b at each processor's current model (it sums to
    min(m, P_eligible)). The slot probability used for aggregation is the long-run frequency
    q_b phi_{b,s}, phi_{b,s} the fraction of an S-round period in which b is scheduled on s, so
    unbiased aggregation is unbiased only on average over a period, not round by round.
    """

    def __init__(self, options: dict | None, population: Population, seed: int = 0) -> None:
        super().__init__(options, population, seed)
        self._freq_pop: Population | None = None
        self._freq = np.zeros((0, 0))

    def _frequency(self, population: Population) -> np.ndarray:
        if self._freq_pop is not population:
            self._freq = _round_robin_frequency(population)
            self._freq_pop = population
        return self._freq

    def allocate(self, state: RoundState, rng: np.random.Generator) -> Assignment:
        pop = state.population
        q, note = uniform_processor_rates(state)
        sched = round_robin_schedule(pop, state.round)
        cond = np.zeros((pop.num_processors, pop.num_tasks))
        ok = sched >= 0
        cond[np.flatnonzero(ok), sched[ok]] = 1.0
        cond *= state.eligible[pop.processor_client]  # a model that is not active idles it
        probs = q[:, None] * cond
        slot_p = q[:, None] * self._frequency(pop)
        if self.opt("draw") == "fixed":
            return fixed_assignment(state, q > 0, cond, probs, slot_p, rng, note)
        a = draw(probs, pop, rng, note=note)
        return Assignment(
            processor=a.processor,
            client=a.client,
            task=a.task,
            probability=slot_p[a.processor, a.task],
            share=a.share,
            probabilities=a.probabilities,
            note=a.note,
        )


# --------------------------------------------------------------------------------------------
# full
# --------------------------------------------------------------------------------------------


@register("sampler", "full", options={}, doc="Full participation: every eligible pair trains.")
class FullAllocator(Allocator):
    """Full participation (docs/algorithms.md section 7, "full"): the upper-bound baseline.

    One client-level slot (processor = -1, p = 1, share = 1) per eligible (i, s) pair; the
    budget is ignored. ``Assignment.probabilities`` is the (N, S) eligibility matrix (client
    rows, not processor rows).
    """

    def allocate(self, state: RoundState, rng: np.random.Generator) -> Assignment:
        elig = state.eligible
        i, s = np.nonzero(elig)
        order = np.lexsort((i, s))
        i, s = i[order], s[order]
        k = i.size
        return Assignment(
            processor=np.full(k, -1),
            client=i,
            task=s,
            probability=np.ones(k),
            share=np.ones(k),
            probabilities=elig.astype(np.float64),
        )


# --------------------------------------------------------------------------------------------
# fedfair (FedFairMMFL, alpha-fair)
# --------------------------------------------------------------------------------------------

LOSS_FLOOR = 1e-8
LOSS_CEIL = 1e8


def _sanitize_losses(losses: np.ndarray) -> np.ndarray:
    """Map losses into [LOSS_FLOOR, LOSS_CEIL]; NaN and +inf count as the ceiling (diverged)."""
    f = np.asarray(losses, dtype=np.float64)
    f = np.nan_to_num(f, nan=LOSS_CEIL, posinf=LOSS_CEIL, neginf=LOSS_FLOOR)
    return np.clip(f, LOSS_FLOOR, LOSS_CEIL)


def fedfair_distribution(
    losses: np.ndarray, alpha: float, weights: np.ndarray | None = None
) -> np.ndarray:
    """The alpha-fair model distribution of FedFairMMFL (docs/algorithms.md section 7).

    pi_s = w_s f_s^(alpha - 1) / sum_s' w_s' f_s'^(alpha - 1), computed in log space (no
    overflow for large alpha). Losses are clipped to [1e-8, 1e8], NaN / +inf count as 1e8 (a
    diverged model is the worst); models with w_s = 0 get 0.

    Args:
        losses: (S,) float, current loss f_s of each model.
        alpha: fairness exponent, >= 0.
        weights: (S,) float >= 0 (default all ones); at least one must be positive.

    Returns:
        (S,) float probabilities summing to 1.

    Raises:
        ValueError: weights of another shape, negative, non-finite or all zero; alpha negative
            or non-finite.
    """
    f = _sanitize_losses(losses)
    w = np.ones_like(f) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != f.shape:
        raise ValueError(f"weights shape {w.shape} != losses shape {f.shape}")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if f.size == 0:
        return f.copy()
    if (w < 0).any() or not np.isfinite(w).all() or not (w > 0).any():
        raise ValueError("weights must be finite, >= 0, and not all zero")
    with np.errstate(divide="ignore", invalid="ignore"):
        # (alpha - 1) (log f - max log f) is <= 0 for alpha >= 1 (>= 0 below 1) and finite for
        # any finite alpha, so a huge alpha cannot overflow into inf - inf.
        logf = np.log(f)
        shift = logf.max() if alpha >= 1 else logf.min()
        expo = (float(alpha) - 1.0) * (logf - shift)
        logit = np.where(w > 0, np.log(np.where(w > 0, w, 1.0)) + expo, -np.inf)
    logit = logit - logit.max()
    e = np.exp(logit)
    return e / e.sum()


#: Options of the alpha-fair model shares (shared by ``fedfair`` and ``fairvr``).
FAIR_OPTIONS = {
    "alpha": Option(float, 3.0, ">= 0", "alpha-fairness exponent (1 = uniform; large = "
                    "always the worst model)."),
    "loss_proxy": Option(str, "loss", "one of loss|error",
                         "loss: the models' current test loss; error: 100 * (1 - accuracy) "
                         "as in the authors' code.", authors="error"),
    "weights": Option(str, "uniform", "one of uniform|data",
                      "uniform: w_s = 1; data: w_s = model s's share of all samples."),
    "refresh": Option(str, "evaluation", "one of evaluation|round",
                      "evaluation: f_s from the latest evaluation (stale by up to eval_every - 1 "
                      "rounds); round: the runner evaluates the global models before every "
                      "allocation whose previous round was not evaluated (as the authors' code, "
                      "which evaluates every round).", authors="round"),
}


@register(
    "sampler",
    "fedfair",
    options={**FAIR_OPTIONS, "draw": DRAW_OPTION},
    doc="FedFairMMFL: uniform client sampling, alpha-fair model choice, averaging aggregation.",
)
class FairAllocator(Allocator):
    """FedFairMMFL alpha-fair allocation (docs/algorithms.md section 7, "fedfair").

    Processors are sampled like ``random``; a sampled processor of client i trains held model s
    with probability pi_{s|i} (:func:`fedfair_distribution` over S_i), so
    p_{s|b} = q_b pi_{s|i(b)}. Before any loss is known (``task_losses`` / ``task_accuracies``
    None) all f_s are equal. Default aggregator: "average".
    """

    default_aggregator = "average"

    def __init__(self, options: dict | None, population: Population, seed: int = 0) -> None:
        super().__init__(options, population, seed)
        self.needs_fresh_task_losses = self.opt("refresh") == "round"

    def _losses(self, state: RoundState) -> np.ndarray:
        s_count = state.population.num_tasks
        if self.opt("loss_proxy") == "error":
            if state.task_accuracies is None:
                return np.ones(s_count)
            acc = np.asarray(state.task_accuracies, np.float64)
            return 100.0 * (1.0 - acc)
        if state.task_losses is None:
            return np.ones(s_count)
        return np.asarray(state.task_losses, np.float64)

    def _weights(self, population: Population) -> np.ndarray:
        if self.opt("weights") == "data":
            tot = population.n_samples.sum(axis=0).astype(np.float64)
            return tot / tot.sum() if tot.sum() > 0 else np.ones(population.num_tasks)
        return np.ones(population.num_tasks)

    def client_distribution(self, state: RoundState) -> np.ndarray:
        """(N, S) float: pi_{s|i}, the model distribution of client i's sampled processors.

        Zero for tasks client i does not hold; rows of clients holding nothing are zero.
        """
        pop = state.population
        f = self._losses(state)
        w = self._weights(pop)
        # weights of held tasks only; a held task has positive total samples, so w > 0 there.
        out = np.zeros((pop.num_clients, pop.num_tasks))
        alpha = float(self.opt("alpha"))
        eligible = state.eligible
        # clients with the same eligible set share one distribution: one call per distinct set
        # (at most 2^S of them) instead of one per client
        patterns, which = row_patterns(eligible)
        for r, held in enumerate(patterns):
            if held.any():
                rows = np.flatnonzero(which == r)
                out[np.ix_(rows, np.flatnonzero(held))] = fedfair_distribution(
                    f[held], alpha, w[held])[None, :]
        return out

    def allocate(self, state: RoundState, rng: np.random.Generator) -> Assignment:
        pop = state.population
        q, note = uniform_processor_rates(state)
        cond = self.client_distribution(state)[pop.processor_client]
        probs = q[:, None] * cond
        if self.opt("draw") == "fixed":
            return fixed_assignment(state, q > 0, cond, probs, probs, rng, note)
        return draw(probs, pop, rng, note=note)


