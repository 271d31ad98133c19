"""Fairness statistics, convergence speed and cost accounting (docs/algorithms.md sections 5.1
and 7).

Pure numpy; inputs are never mutated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mmfl.types import Assignment

__all__ = [
    "RoundCost",
    "clients_per_task",
    "fairness_stats",
    "round_cost",
    "rounds_to_target",
]


def fairness_stats(accuracies: np.ndarray) -> dict[str, float]:
    """Fairness statistics across models (docs/algorithms.md section 7, "Fairness metrics").

    Args:
        accuracies: (S,) float, one accuracy per model (S >= 1).

    Returns:
        dict of floats: ``mean``, ``min``, ``max``, ``max_min`` (max - min) and ``variance``
        (population variance, ddof = 0).
    """
    a = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError("fairness_stats needs at least one accuracy")
    return {
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
        "max_min": float(a.max() - a.min()),
        "variance": float(a.var(ddof=0)),
    }


def rounds_to_target(acc_history: np.ndarray, rounds: np.ndarray, target: float) -> np.ndarray:
    """First round at which each model's accuracy reaches ``target`` (docs/algorithms.md section 7).

    Args:
        acc_history: (R, S) float, accuracy of model s at the r-th evaluation (NaN = missing).
        rounds: (R,) round numbers of the evaluations (any order; scanned in ascending order).
        target: accuracy threshold; reached when accuracy >= target.

    Returns:
        (S,) float: the round number of the first evaluation with accuracy >= target, or NaN if
        the model never reaches it (NaN rather than -1, so means/plots skip it naturally).
    """
    acc = np.asarray(acc_history, dtype=np.float64)
    r = np.asarray(rounds, dtype=np.float64).reshape(-1)
    if acc.ndim != 2 or acc.shape[0] != r.size:
        raise ValueError(
            f"acc_history must be (R, S) with R = len(rounds); got {acc.shape}, {r.size}"
        )
    order = np.argsort(r, kind="stable")
    acc, r = acc[order], r[order]
    with np.errstate(invalid="ignore"):
        hit = acc >= target  # NaN compares False
    first = np.argmax(hit, axis=0)
    reached = hit.any(axis=0)
    out = np.full(acc.shape[1], np.nan)
    out[reached] = r[first[reached]]
    return out


def clients_per_task(assignment: Assignment, num_tasks: int) -> np.ndarray:
    """(S,) int: unique clients assigned to each model this round (docs/algorithms.md section 7)."""
    _, task = assignment.pairs()
    return np.bincount(task, minlength=num_tasks)


@dataclass(frozen=True)
class RoundCost:
    """Client-side cost of a round (docs/algorithms.md section 5.1).

    Attributes:
        local_trainings: local training runs (one per unique active (client, task) pair).
        forward_passes: (client, task) loss evaluations used for sampling (e.g. LVR probes).
        scalar_uploads: scalars sent to the server for sampling (scores, losses).
        model_uploads: model updates uploaded.
        declined: slots whose client declined the model (``clients.preferences``, soft
            preferences): drawn, never trained, so budget wasted (docs/algorithms.md 3.3).
    """

    local_trainings: int = 0
    forward_passes: int = 0
    scalar_uploads: int = 0
    model_uploads: int = 0
    declined: int = 0

    def __add__(self, other: "RoundCost") -> "RoundCost":
        if not isinstance(other, RoundCost):
            return NotImplemented
        return RoundCost(
            self.local_trainings + other.local_trainings,
            self.forward_passes + other.forward_passes,
            self.scalar_uploads + other.scalar_uploads,
            self.model_uploads + other.model_uploads,
            self.declined + other.declined,
        )

    def as_dict(self) -> dict[str, int]:
        """The counts by field name."""
        return {k: int(v) for k, v in asdict(self).items()}


def round_cost(assignment: Assignment, *, full_computation: int = 0, probes: int = 0,
               probe_trainings: int = 0) -> RoundCost:
    """Client-side cost of a round (docs/algorithms.md section 5.1).

        local_trainings = (full_computation or U) + probe_trainings
        forward_passes  = probes
        scalar_uploads  = probes + full_computation
        model_uploads   = U + probe_trainings

    Args:
        assignment: the round's slots; U = its unique (client, task) pairs (merged slots train
            and upload once).
        full_computation: pairs that trained before sampling to report an update norm (GVR,
            StaleVR: every eligible pair); 0 when only the active pairs train.
        probes: pairs that evaluated the global model's local loss for sampling (LVR).
        probe_trainings: pairs of StaleVRE's ``score = "probe"`` set that trained and uploaded
            before sampling.

    Returns:
        The :class:`RoundCost` (SCAFFOLD's second upload per pair is not counted here).
    """
    u = int(assignment.pairs()[0].size)
    return RoundCost(local_trainings=(full_computation or u) + probe_trainings,
                     forward_passes=probes, scalar_uploads=probes + full_computation,
                     model_uploads=u + probe_trainings)
