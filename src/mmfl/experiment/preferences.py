"""A run's client task preferences: the willingness matrix from the config, the refusals applied
to the federation, and the declines of each round (docs/algorithms.md section 3.3, docs/preferences.md).

Config (every default in :mod:`mmfl.experiment.config`):

- ``[clients] preferences``: w_{i,s} of every held pair: a number, or a table
  ``{"1.0" = 0.7, "0.5" = 0.2, "0" = 0.1}`` of value = probability drawn per pair from the
  stream ``(seed, "preferences")``; default 1 (everyone willing: the run is exactly the run
  without preferences).
- ``[clients] preference_file``: CSV ``client,task,willingness`` (task by name or 0-based
  index); its rows replace the drawn value of the pairs they list.
- ``[sampler] preference_aware``: report the effective inclusion probability p w of every slot
  (:func:`mmfl.core.preferences.effective_assignment`).

The runner uses :meth:`Preferences.restrict` once on the federation (refusals) and
:meth:`Preferences.decline` on every round's assignment (declines, from the stream
``(seed, "decline", t)``, so no other stream shifts).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mmfl.core.preferences import decline, draw_willingness, effective_assignment, \
    restrict_population
from mmfl.errors import DataError
from mmfl.experiment.config import ExperimentConfig
from mmfl.experiment.federation import Federation
from mmfl.experiment.profile import read_table
from mmfl.rng import DECLINE, PREFERENCES, stream
from mmfl.types import Assignment, Population

__all__ = ["PREFERENCE_COLUMNS", "Preferences", "load_preference_file", "willingness_of"]

#: the columns of ``clients.preference_file``
PREFERENCE_COLUMNS = ("client", "task", "willingness")


def load_preference_file(path: str | Path, population: Population) -> np.ndarray:
    """(N, S) float: the willingness the file lists, NaN for pairs it does not list.

    Raises DataError (one line naming the file, the row and ``clients.preference_file``) for a
    malformed row, a client or task out of range, a value outside [0, 1] or a pair listed twice.
    """
    p = Path(path)
    key = "clients.preference_file"
    rows = read_table(p, key, PREFERENCE_COLUMNS)
    names = {name: s for s, name in enumerate(population.task_names)}
    n, s_count = population.num_clients, population.num_tasks
    out = np.full((n, s_count), np.nan)
    for k, row in enumerate(rows, start=2):
        task = (row["task"] or "").strip()
        try:
            i, w = int(row["client"]), float(row["willingness"])
        except (TypeError, ValueError):
            raise DataError(f"{p}:{k}: {key}: malformed row (client={row['client']!r}, "
                            f"task={row['task']!r}, willingness={row['willingness']!r}); "
                            "expected an integer client, a task name or index and a number"
                            ) from None
        s = names[task] if task in names else int(task) if task.isdigit() else -1
        if not 0 <= i < n:
            raise DataError(f"{p}:{k}: {key}: client {i} outside 0..{n - 1}")
        if not 0 <= s < s_count:
            raise DataError(f"{p}:{k}: {key}: task {task!r} is neither a task name nor an "
                            f"index in 0..{s_count - 1}")
        if not (math.isfinite(w) and 0 <= w <= 1):
            raise DataError(f"{p}:{k}: {key}: willingness must lie in [0, 1], got {w!r}")
        if not np.isnan(out[i, s]):
            raise DataError(f"{p}:{k}: {key}: client {i}, task {task} listed twice")
        out[i, s] = w
    return out


def willingness_of(cfg: ExperimentConfig, population: Population) -> np.ndarray | None:
    """(N, S) w_{i,s} of the run (1 on pairs the client does not hold), or None when every
    held pair is willing (w = 1): then preferences change nothing."""
    c = cfg.clients
    shape = (population.num_clients, population.num_tasks)
    if isinstance(c.preferences, tuple):
        w = draw_willingness(c.preferences, shape, stream(cfg.seed, PREFERENCES))
    else:
        w = np.full(shape, float(c.preferences))
    if c.preference_file:
        listed = load_preference_file(c.preference_file, population)
        w = np.where(np.isnan(listed), w, listed)
    w = np.where(population.holds, w, 1.0)
    return None if (w == 1.0).all() else w


class Preferences:
    """The run's willingness matrix and what it does to the federation and to every round.

    Args:
        willingness: (N, S) w_{i,s} (1 where the client holds nothing), or None: no preferences
            (every method is then the identity and draws nothing).
        aware: ``sampler.preference_aware``: slots report p w (unbiased over the willing).
        seed: the run's root seed (the decline stream derives from it).
    """

    def __init__(self, willingness: np.ndarray | None, aware: bool, seed: int):
        self.willingness = willingness
        self.aware = bool(aware)
        self.seed = int(seed)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, population: Population) -> "Preferences":
        """The preferences ``cfg`` gives ``population`` (the federation before refusals)."""
        return cls(willingness_of(cfg, population), cfg.sampler.preference_aware, cfg.seed)

    def restrict(self, federation: Federation) -> Federation:
        """The federation whose population holds no data on refused pairs
        (:func:`mmfl.core.preferences.restrict_population`); unchanged without refusals."""
        if self.willingness is None:
            return federation
        pop = restrict_population(federation.population, self.willingness)
        if pop is federation.population:
            return federation
        return Federation(pop, federation.budget, federation.tasks)

    def decline(self, t: int, asked: Assignment, population: Population
                ) -> tuple[Assignment, int]:
        """Round t's assignment after the assigned pairs' declines, and the declined slots.

        With ``aware`` the slots first get their effective probabilities p w. Draws from the
        stream ``(seed, "decline", t)`` (nothing without preferences)."""
        if self.willingness is None:
            return asked, 0
        if self.aware:
            asked = effective_assignment(asked, self.willingness, population)
        kept, gone = decline(asked, self.willingness, stream(self.seed, DECLINE, t))
        return kept, int(gone.sum())

    def summary(self) -> dict[str, int | bool]:
        """summary.json's ``preferences``: held pairs refused (w = 0), held pairs with a soft
        preference (0 < w < 1; pairs not held have w = 1) and ``sampler.preference_aware``."""
        w = self.willingness
        if w is None:
            return {"refused_pairs": 0, "soft_pairs": 0, "aware": self.aware}
        return {"refused_pairs": int((w <= 0).sum()), "soft_pairs": int(((w > 0) & (w < 1)).sum()),
                "aware": self.aware}
