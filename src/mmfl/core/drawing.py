"""Drawing rules (docs/algorithms.md section 1): how a (P, S) matrix of inclusion probabilities
p_{s|b} becomes the round's processor slots, and the processor-level building blocks every
allocator shares.

* :func:`draw` - the independent rule: each processor b is idle with probability
  1 - sum_s p_{s|b}, else trains model s with probability p_{s|b}.
* :func:`draw_fixed` - exactly k eligible processors without replacement, then a model per
  processor from a conditional (P, S) distribution (the authors' code); the same marginals.
* :data:`DRAW_OPTION` - the ``draw`` option (independent | fixed) of the samplers that sample
  processors uniformly.
* :func:`eligible_processors`, :func:`uniform_processor_rates`, :func:`held_uniform` - which
  processors may train, at which uniform rate, and the uniform model choice among held tasks.

Pure numpy; every random number comes from the generator passed in.
"""

from __future__ import annotations

import numpy as np

from mmfl.registry import Option
from mmfl.types import Assignment, Population, RoundState

__all__ = ["DRAW_OPTION", "TOL", "any_rows", "draw", "draw_fixed", "eligible_processors",
           "fixed_assignment", "held_uniform", "one_processor_each", "processor_slots",
           "row_patterns", "row_totals", "uniform_processor_rates"]

#: tolerance of the probability checks
TOL = 1e-9


def row_totals(p: np.ndarray) -> np.ndarray:
    """(P,) row sums of a (P, S) matrix added left to right (the last column of
    ``np.cumsum(p, axis=1)``, bit for bit), without a (P, S) temporary."""
    if p.shape[1] == 0:
        return np.zeros(p.shape[0])
    total = p[:, 0].copy()
    for s in range(1, p.shape[1]):
        total += p[:, s]
    return total


def any_rows(mask: np.ndarray) -> np.ndarray:
    """(N,) ``mask.any(axis=1)`` for an (N, S) bool mask, one column at a time (a reduction
    over a short last axis is an order of magnitude slower in numpy at large N)."""
    if mask.shape[1] == 0:
        return np.zeros(mask.shape[0], bool)
    out = mask[:, 0].copy()
    for s in range(1, mask.shape[1]):
        out |= mask[:, s]
    return out


def _check_matrix(probabilities: np.ndarray, population: Population) -> tuple[np.ndarray, np.ndarray]:
    """The validated (P, S) matrix (a private copy, clipped to [0, 1]) and its (P,) row totals.

    Two reductions and one copy: NaN fails both the min and the max test, +-inf one of them.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    shape = (population.num_processors, population.num_tasks)
    if p.shape != shape:
        raise ValueError(f"probabilities must have shape (P, S) = {shape}, got {p.shape}")
    if p.size:
        lo, hi = p.min(), p.max()
        if not (lo >= -TOL and hi <= 1 + TOL):
            raise ValueError("probabilities must be finite and lie in [0, 1]")
        p = np.clip(p, 0.0, 1.0) if (lo < 0 or hi > 1) else p.copy()
    else:
        p = p.copy()
    total = row_totals(p)
    if total.size and total.max() > 1 + TOL:
        raise ValueError("each processor's probabilities must sum to at most 1")
    return p, total


def draw(
    probabilities: np.ndarray,
    population: Population,
    rng: np.random.Generator,
    *,
    note: str = "",
) -> Assignment:
    """Draw an assignment with the independent rule of docs/algorithms.md section 1.

    Processor b is idle with probability ``1 - sum_s p[b, s]``, else trains s with probability
    ``p[b, s]``: one uniform number per processor, in processor order, so the same generator
    state gives the same draw. Entries with ``p = 0`` are never drawn.

    Args:
        probabilities: (P, S) matrix p_{s|b}, entries in [0, 1], row sums <= 1.
        population: the federation (gives i(b) and B_i).
        rng: the generator; consumed by exactly P uniform draws.
        note: copied into ``Assignment.note``.

    Returns:
        An :class:`Assignment` with one slot per active processor: ``probability = p[b, s]``,
        ``share = 1 / B_{i(b)}``, ``probabilities`` the input matrix (copied).

    Cost: O(P S) for the checks and row totals, O(K S) for the model choice of the K active
    processors (the cumulative sums are formed only for them).
    """
    p, total = _check_matrix(probabilities, population)
    u = rng.random(p.shape[0])
    b = np.flatnonzero(u < total)  # empty when S = 0 (total is 0)
    if b.size:
        cs = np.cumsum(p[b], axis=1)
        s = np.argmax(u[b, None] < cs, axis=1)
    else:
        s = np.zeros(0, np.int64)
    return processor_slots(population, b, s, p[b, s], p, note)


def processor_slots(population: Population, processor: np.ndarray, task: np.ndarray,
                    probability: np.ndarray, probabilities: np.ndarray, note: str) -> Assignment:
    """An Assignment of processor slots (b, s) with share 1/B_{i(b)} (docs/algorithms.md section 3)."""
    client = population.processor_client[processor]
    return Assignment(processor=processor, client=client, task=task, probability=probability,
                      share=1.0 / population.capacity[client], probabilities=probabilities,
                      note=note)


def draw_fixed(
    count: int,
    eligible: np.ndarray,
    conditional: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose exactly ``count`` eligible processors uniformly without replacement, then a model.

    A chosen processor b trains s with probability ``conditional[b, s]`` (rows of eligible
    processors sum to 1), so (b, s) has the marginal ``min(1, count / P_eligible) *
    conditional[b, s]``, as with :func:`draw`; the draws are dependent.

    Args:
        count: k >= 0, capped at P_eligible.
        eligible: (P,) bool.
        conditional: (P, S) float, the model distribution of each processor given it is chosen.
        rng: the generator.

    Returns:
        (processor (K,), task (K,)) int arrays, processors ascending.
    """
    idx = np.flatnonzero(np.asarray(eligible, bool))
    k = min(int(count), idx.size)
    chosen = np.sort(rng.choice(idx, size=k, replace=False)) if k else np.zeros(0, np.int64)
    cond = np.asarray(conditional, np.float64)
    if k == 0:
        return chosen.astype(np.int64), np.zeros(0, np.int64)
    cs = np.cumsum(cond[chosen], axis=1)
    u = rng.random(k) * cs[:, -1]
    task = np.minimum(np.argmax(u[:, None] < cs, axis=1), cond.shape[1] - 1)
    return chosen.astype(np.int64), task.astype(np.int64)


def fixed_assignment(
    state: RoundState,
    eligible: np.ndarray,
    conditional: np.ndarray,
    probabilities: np.ndarray,
    slot_probability: np.ndarray,
    rng: np.random.Generator,
    note: str,
) -> Assignment:
    """Assignment from :func:`draw_fixed` with round(m) processors (requires integer-ish m)."""
    m = float(state.budget)
    if abs(m - round(m)) > 1e-9:
        raise ValueError(
            f"draw='fixed' needs an integer budget m (got {m}); use draw='independent'"
        )
    pop = state.population
    b, s = draw_fixed(int(round(m)), eligible, conditional, rng)
    return processor_slots(pop, b, s, slot_probability[b, s], probabilities, note)


def eligible_processors(state: RoundState) -> np.ndarray:
    """(P,) bool: processors whose client is available and holds data for at least one task."""
    client_ok = any_rows(state.eligible)
    if one_processor_each(state.population):
        return client_ok
    return client_ok[state.population.processor_client]


def uniform_processor_rates(state: RoundState) -> tuple[np.ndarray, str]:
    """Uniform processor sampling rates q_b = min(1, m / P_eligible) (docs/algorithms.md section 7).

    Args:
        state: the round (budget m, availability, population).

    Returns:
        (q (P,) float with 0 on ineligible processors, note). The note explains when fewer
        eligible processors than m exist (each is then used with q_b = 1 and sum_b q_b < m).
    """
    eligible = eligible_processors(state)
    n_el = int(eligible.sum())
    m = max(0.0, float(state.budget))
    q = np.zeros(state.population.num_processors)
    note = ""
    if n_el == 0:
        return q, ("no eligible processor this round" if m > 0 else "")
    rate = min(1.0, m / n_el)
    q[eligible] = rate
    if m > n_el + TOL:
        note = (
            f"only {n_el} eligible processors for budget m={m:g}: each used with q=1, "
            f"expected slots {n_el} < m"
        )
    return q, note


def held_uniform(state: RoundState) -> np.ndarray:
    """(P, S) float: uniform distribution over the eligible (held, active) tasks of each
    processor's client (zero rows for unavailable clients). Formed per client, then gathered to
    processors once."""
    pop = state.population
    held = state.eligible.astype(np.float64)
    cnt = row_totals(held)[:, None]
    per_client = np.divide(held, cnt, out=held, where=cnt > 0)
    return per_client if one_processor_each(pop) else per_client[pop.processor_client]


def row_patterns(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of an (N, S) bool mask, ascending, and each row's pattern: ((R, S)
    bool, (N,) int). Rows are packed into integers when S < 63 (one sort of N numbers)."""
    n, s_count = mask.shape
    if s_count >= 63:
        patterns, which = np.unique(mask, axis=0, return_inverse=True)
        return patterns, np.asarray(which).reshape(-1)
    code = np.zeros(n, np.int64)
    for s in range(s_count):
        code |= mask[:, s].astype(np.int64) << (s_count - 1 - s)
    codes, which = np.unique(code, return_inverse=True)
    patterns = (codes[:, None] >> np.arange(s_count - 1, -1, -1)[None, :]) & 1 == 1
    return patterns, np.asarray(which).reshape(-1)


def one_processor_each(pop: Population) -> bool:
    """True when P = N (processor b is client b), so per-client rows need no gather."""
    return pop.num_processors == pop.num_clients


#: the ``draw`` option of the samplers that sample processors uniformly
DRAW_OPTION = Option(
    str,
    "independent",
    "one of independent|fixed",
    "independent: each processor is active independently with probability q_b; fixed: exactly "
    "round(m) eligible processors without replacement, as the authors' code (needs an integer "
    "budget). Both give the same inclusion probabilities (docs/algorithms.md section 1).",
    authors="fixed",
)
