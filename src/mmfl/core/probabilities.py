"""Optimal variance-reduced sampling probabilities (docs/algorithms.md section 4).

Given scores ``U[b, s] = U_{s,b} >= 0`` (P, S) (section 5), choose ``p[b, s] = p_{s|b}``
minimising V(p) = sum_{s,b} U_{s,b}^2 / p_{s|b} under section 1's constraints and either one
total budget (:func:`optimal_probabilities`, the closed form of docs/algorithms.md section 4.2)
or one budget per model (:func:`mmfl.core.per_model.optimal_probabilities_per_model`,
docs/algorithms.md section 4.5).

Public functions:

* :func:`optimal_probabilities` - the contract ``optimal_probabilities(scores, budget)`` of
  DESIGN.md: the (P, S) matrix of section 4.
* :func:`optimal_probabilities_info` - the same plus a :class:`ClosedFormInfo` record.
* :func:`uniform_probabilities` - the no-information fallback (uniform over eligible pairs).
* :func:`sampling_variance` - V(p), for diagnostics and tests.
* :func:`check_scores` - validation shared with :mod:`mmfl.core.per_model`.

Everything is pure numpy, vectorised over processors, and never mutates its inputs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ClosedFormInfo",
    "check_scores",
    "optimal_probabilities",
    "optimal_probabilities_info",
    "sampling_variance",
    "uniform_probabilities",
    "water_fill",
]


@dataclass(frozen=True)
class ClosedFormInfo:
    """What :func:`optimal_probabilities_info` found.

    Attributes:
        expected: sum of p (the expected number of slots).
        budget: m.
        positive: K, processors with positive score mass M_b.
        capped: processors with q_b = 1.
        water_level: lambda in score units (nan when every processor is capped, inf without
            positive scores).
        fallback: "uniform" (all scores zero) or "".
        note: text for the round's record ("" when sum p = m).
    """

    expected: float = 0.0
    budget: float = 0.0
    positive: int = 0
    capped: int = 0
    water_level: float = math.inf
    fallback: str = ""
    note: str = ""

# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def check_scores(scores: np.ndarray, eligible: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Validated (U, eligible): U a fresh float64 (P, S) copy, zero where not eligible."""
    u = np.array(scores, dtype=np.float64, copy=True)
    if u.ndim != 2:
        raise ValueError(f"scores must be a 2-D (P, S) array, got shape {u.shape}")
    # (u >= 0) is False for NaN, so one pass rejects negatives and NaN.
    if u.size and not (u >= 0).all():
        if np.isnan(u).any():
            raise ValueError("scores must not contain NaN")
        raise ValueError(f"scores must be >= 0, got minimum {float(np.nanmin(u))!r}")
    if u.size and not np.isfinite(u).all():
        raise ValueError("scores must be finite (got +inf)")
    if eligible is None:
        elig = np.ones(u.shape, dtype=bool)
    else:
        elig = np.asarray(eligible, dtype=bool)
        if elig.shape != u.shape:
            raise ValueError(f"eligible must have the scores' shape {u.shape}, got {elig.shape}")
        u[~elig] = 0.0
    return u, elig


def _check_budget(budget: float, name: str = "budget") -> float:
    try:
        m = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number >= 0, got {budget!r}") from None
    if math.isnan(m) or math.isinf(m) or m < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {budget!r}")
    return m


# --------------------------------------------------------------------------------------------
# Diagnostics and the uniform fallback
# --------------------------------------------------------------------------------------------


def sampling_variance(scores: np.ndarray, probabilities: np.ndarray) -> float:
    """V(p) = sum_{s,b} U_{s,b}^2 / p_{s|b} over entries with U > 0 (docs/algorithms.md section 4).

    Args:
        scores: (P, S) float >= 0, U.
        probabilities: (P, S) float, p.

    Returns:
        V(p) as a float; ``inf`` when some U > 0 has p = 0.
    """
    u = np.asarray(scores, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if u.shape != p.shape:
        raise ValueError(f"scores {u.shape} and probabilities {p.shape} must have one shape")
    pos = u > 0
    if (p[pos] <= 0).any():
        return math.inf
    return float(np.sum(u[pos] ** 2 / p[pos]))


def uniform_probabilities(eligible: np.ndarray, budget: float) -> np.ndarray:
    """Uniform sampling over eligible pairs: the no-information fallback of section 4.

    Every processor with at least one eligible model is active with probability
    q_b = min(1, m / P_elig) and, when active, trains one of its eligible models uniformly:
    p_{s|b} = q_b / |{s : eligible[b, s]}| on eligible pairs, 0 elsewhere.

    Args:
        eligible: (P, S) bool.
        budget: m >= 0.

    Returns:
        (P, S) float; it sums to min(m, P_elig).
    """
    elig = np.asarray(eligible, dtype=bool)
    if elig.ndim != 2:
        raise ValueError(f"eligible must be a 2-D (P, S) array, got shape {elig.shape}")
    m = _check_budget(budget)
    count = elig.sum(axis=1)
    n_el = int((count > 0).sum())
    p = np.zeros(elig.shape, dtype=np.float64)
    if n_el == 0 or m == 0:
        return p
    q = min(1.0, m / n_el)
    rate = np.divide(q, count, out=np.zeros(count.shape, np.float64), where=count > 0)
    p[elig] = np.broadcast_to(rate[:, None], elig.shape)[elig]
    return p


# --------------------------------------------------------------------------------------------
# One total budget: the closed form (sections 4.2 and 4.3)
# --------------------------------------------------------------------------------------------


def water_fill(mass: np.ndarray, m: float) -> tuple[np.ndarray, float, int]:
    """q_b = min(1, M_b / lambda) with sum_b q_b = min(m, #{M_b > 0}).

    The water-filling of docs/algorithms.md section 4.2, lambda found as in section 4.3.

    Args:
        mass: (P,) float >= 0, M_b = sum_s U_{s,b}.
        m: budget > 0.

    Returns:
        (q (P,), lambda, number of capped processors). ``lambda`` is ``nan`` when every
        positive-mass processor is capped (m >= #{M_b > 0}; any lambda <= min M_b would do) and
        ``inf`` when no processor has positive mass.

    Complexity: O(P log P) for the sort, O(m) for testing all candidate cap counts at once.
    """
    pos = mass > 0
    k = int(pos.sum())
    q = np.zeros(mass.shape, dtype=np.float64)
    if k == 0:
        return q, math.inf, 0
    if m >= k:
        q[pos] = 1.0
        return q, math.nan, k
    asc = np.sort(mass[pos])
    tail = np.cumsum(asc)  # tail[j] = sum of the j + 1 smallest masses
    c = np.arange(min(math.ceil(m), k))  # candidate numbers of capped processors, all < m
    idx = k - 1 - c
    ok = asc[idx] * (m - c) <= tail[idx]
    # ok[-1] holds exactly: m - c <= 1 and tail >= asc there.
    c0 = int(np.argmax(ok))
    inv_lam = (m - c0) / float(tail[k - 1 - c0])  # 1 / lambda (no overflow for tiny m)
    q = np.minimum(1.0, mass * inv_lam)
    lam = 1.0 / inv_lam if inv_lam > 0 else math.inf
    return q, lam, c0


def optimal_probabilities_info(
    scores: np.ndarray,
    budget: float,
    *,
    eligible: np.ndarray | None = None,
) -> tuple[np.ndarray, ClosedFormInfo]:
    """The optimal (P, S) sampling matrix of docs/algorithms.md section 4, with a record.

    Minimises V(p) under one total budget sum_{s,b} p_{s|b} = m. With M_b = sum_s U_{s,b}:

        q_b = min(1, M_b / lambda),  sum_b q_b = m;   p_{s|b} = q_b U_{s,b} / M_b (0 if M_b = 0).

    Derivation in docs/algorithms.md sections 4.1-4.3; edge cases (never NaN) in section 4.3:
    m = 0 gives zeros; m >= K = #{b : M_b > 0} gives q_b = 1 on those K processors, so
    sum p = K < m (noted in the record); all scores zero gives :func:`uniform_probabilities`.

    Args:
        scores: (P, S) float >= 0, U_{s,b} (rows processors b, columns models s). Not mutated.
        budget: m >= 0 (may be fractional).
        eligible: optional (P, S) bool; ineligible pairs get p = 0 (their scores are ignored).
            Default: every pair is eligible. Only used beyond masking by the all-zero fallback.

    Returns:
        (p, info): p (P, S) float in [0, 1] with row sums <= 1; info a :class:`ClosedFormInfo`.

    Raises:
        ValueError: scores not 2-D, negative, NaN or inf; budget negative, NaN or inf; eligible
            of the wrong shape.

    Complexity: O(P S + P log P) time, vectorised (no Python loop over processors). The worked
    example of docs/algorithms.md section 4.4 is a reference test.
    """
    u, elig = check_scores(scores, eligible)
    m = _check_budget(budget)
    num_p = u.shape[0]
    info = ClosedFormInfo(budget=m)
    p = np.zeros(u.shape, dtype=np.float64)
    if m == 0 or u.size == 0:
        if m > 0:
            info = dataclasses.replace(info, note=f"no processor or model: expected slots 0 < "
                                                  f"m={m:g}")
        return p, info
    scale = float(u.max())
    if scale == 0.0:
        p = uniform_probabilities(elig, m)
        n_el = int(elig.any(axis=1).sum())
        info = dataclasses.replace(
            info, expected=float(p.sum()), capped=n_el if m >= n_el else 0, fallback="uniform",
            note="all scores are zero: uniform over eligible pairs"
            + (f"; only {n_el} eligible processors, expected slots {n_el} < m={m:g}"
               if m > n_el else ""))
        return p, info
    u /= scale  # scale invariance: p does not change; avoids overflow of M_b
    mass = u.sum(axis=1)
    q, lam, capped = water_fill(mass, m)
    ratio = np.divide(q, mass, out=np.zeros(num_p), where=mass > 0)
    p = u
    p *= ratio[:, None]
    np.minimum(p, 1.0, out=p)
    k = int((mass > 0).sum())
    note = (f"only {k} processors have positive scores for budget m={m:g}: each used with "
            f"q=1, expected slots {k} < m") if m > k else ""
    return p, dataclasses.replace(info, expected=float(p.sum()), positive=k, capped=int(capped),
                                  water_level=lam * scale if np.isfinite(lam) else lam,
                                  note=note)


def optimal_probabilities(
    scores: np.ndarray,
    budget: float,
    *,
    eligible: np.ndarray | None = None,
) -> np.ndarray:
    """The optimal (P, S) matrix p_{s|b} of docs/algorithms.md section 4 (the DESIGN.md contract).

    The matrix of :func:`optimal_probabilities_info` without its record (see there for the
    closed form and edge cases).

    Args:
        scores: (P, S) float >= 0, U_{s,b}. Not mutated.
        budget: m >= 0, possibly fractional.
        eligible: optional (P, S) bool mask (default: all eligible).

    Returns:
        (P, S) float in [0, 1], row sums <= 1, total min(m, #{b : M_b > 0}).
    """
    return optimal_probabilities_info(scores, budget, eligible=eligible)[0]
