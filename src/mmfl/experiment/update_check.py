"""The server's check of every update it receives, in every engine (docs/algorithms.md
section 3.1).

An update G_{i,s} that holds NaN or inf is *rejected*: it stays out of the aggregation and
out of every signal (norms, stale dot products, probe sets, stored h), and the round records
it like a missing pair, naming the model and the client. With ``[server] max_update_norm``
(an absolute L2 bound) or ``max_norm_ratio`` (a multiple of the median norm of the model's
updates in the same round, used when the model has at least :data:`MIN_FOR_MEDIAN` of them),
an update over the bound is rejected too, or with ``norm_action = "clip"`` scaled down to
the bound. The pair still counts as trained and uploaded (rounds.csv); only its influence on
the global model is removed.

Why here: an engine (local or a Flower node) is the producer of updates, the server is the
one place every update passes through before it moves a global model, and a single bad
update (a diverging client, a rogue node, a bit flip) would otherwise poison the model of
every client.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from mmfl.errors import NumericalError
from mmfl.experiment.config import UpdateCheckConfig

__all__ = ["MIN_FOR_MEDIAN", "Rejections", "UpdateCheck", "check_losses", "check_models"]

log = logging.getLogger(__name__)

#: a model needs this many updates in a round for ``max_norm_ratio`` to apply
MIN_FOR_MEDIAN = 3
#: pairs named one by one in a round's note; more are counted
NAMED = 3
NON_FINITE = "non-finite"


@dataclass(frozen=True)
class Rejections:
    """What the check did in one round: ``clients``, ``tasks`` (R,) of the rejected pairs,
    ``reasons`` (R,) str, ``clipped`` (updates scaled down) and ``seen`` (S,) (updates
    checked per model)."""

    clients: np.ndarray
    tasks: np.ndarray
    reasons: tuple[str, ...]
    clipped: int
    seen: np.ndarray

    def diverged(self) -> list[int]:
        """Models all of whose updates in the round were non-finite, from at least two
        clients: their training itself diverged (e.g. a learning rate too large), not one
        faulty client."""
        out = []
        for s, seen in enumerate(self.seen):
            mine = self.tasks == s
            if (seen >= 2 and mine.sum() == seen and len(np.unique(self.clients[mine])) >= 2
                    and all(r == NON_FINITE for r, m in zip(self.reasons, mine) if m)):
                out.append(s)
        return out

    def notes(self, names) -> list[str]:
        """The round's notes for rounds.csv: the rejected pairs by model and client."""
        out = []
        if len(self.clients):
            shown = ", ".join(f"{names[s]} client {c} ({r})" for c, s, r in
                              zip(self.clients[:NAMED], self.tasks[:NAMED], self.reasons))
            more = len(self.clients) - NAMED
            out.append(f"{len(self.clients)} updates rejected: {shown}"
                       + (f" and {more} more" if more > 0 else ""))
        if self.clipped:
            out.append(f"{self.clipped} updates clipped to the norm limit")
        return out


class UpdateCheck:
    """Checks the updates of a :class:`~mmfl.engines.base.TrainOutput` and collects the
    round's rejections (:meth:`take`)."""

    def __init__(self, cfg: UpdateCheckConfig, task_names):
        self.max_norm = cfg.max_update_norm
        self.ratio = cfg.max_norm_ratio
        self.clip = cfg.norm_action == "clip"
        self.names = list(task_names)
        self._clients: list[int] = []
        self._tasks: list[int] = []
        self._reasons: list[str] = []
        self._clipped = 0
        self._seen = np.zeros(len(self.names), np.int64)

    def __call__(self, out, t: int):
        """``out`` with its ``rejected`` (U,) mask set and, with clipping, over-limit updates
        scaled to the limit; ``out`` itself when every update passes unchanged."""
        self._seen += np.bincount(out.tasks, minlength=len(self.names))
        rejected = np.zeros(len(out.clients), dtype=bool)
        updates, clipped = dict(out.updates), False
        for s, G in out.updates.items():
            rows = np.flatnonzero(out.tasks == s)
            bad = _non_finite(G)
            for k in np.flatnonzero(bad):
                self._reject(rows[k], out, NON_FINITE, t)
            rejected[rows[bad]] = True
            if not (self.max_norm or self.ratio):
                continue
            norms = torch.linalg.vector_norm(G, dim=1, dtype=torch.float64).numpy()
            limit = self._limit(norms[~bad])
            over = ~bad & (norms > limit)
            if not over.any():
                continue
            if self.clip:
                scale = torch.from_numpy(np.where(over, limit / np.where(over, norms, 1.0), 1.0))
                updates[s] = G * scale.to(G.dtype)[:, None]
                self._clipped += int(over.sum())
                clipped = True
            else:
                for k in np.flatnonzero(over):
                    self._reject(rows[k], out, f"norm {norms[k]:.3g} > {limit:.3g}", t)
                rejected[rows[over]] = True
        if not rejected.any() and not clipped:
            return out
        return dataclasses.replace(out, updates=updates,
                                   rejected=rejected if rejected.any() else None)

    def _limit(self, finite_norms: np.ndarray) -> float:
        limit = self.max_norm or np.inf
        if self.ratio and len(finite_norms) >= MIN_FOR_MEDIAN:
            limit = min(limit, self.ratio * float(np.median(finite_norms)))
        return limit

    def _reject(self, row: int, out, reason: str, t: int) -> None:
        c, s = int(out.clients[row]), int(out.tasks[row])
        log.warning("round %d: update of %s client %d rejected (%s)", t + 1, self.names[s], c,
                    reason)
        self._clients.append(c)
        self._tasks.append(s)
        self._reasons.append(reason)

    def take(self) -> Rejections:
        """The rejections since the last call (one round's), and reset."""
        r = Rejections(np.array(self._clients, np.int64), np.array(self._tasks, np.int64),
                       tuple(self._reasons), self._clipped, self._seen)
        self._clients, self._tasks, self._reasons = [], [], []
        self._clipped = 0
        self._seen = np.zeros(len(self.names), np.int64)
        return r

    def take_round(self, round_: int) -> Rejections:
        """:meth:`take` for round ``round_ + 1``; stops the run (exit 1) when every update of a
        model was non-finite: its training diverged."""
        checked = self.take()
        diverged = checked.diverged()
        if diverged:
            name = self.names[diverged[0]]
            raise NumericalError(f"round {round_ + 1}: every update of {name} was non-finite "
                                 f"(tasks.lr of {name} too large?); the run stopped, results up "
                                 "to the last round are kept")
        return checked


def check_models(params, names, round_: int) -> None:
    """Stop the run (exit 1) when a global model holds NaN or inf after round ``round_ + 1``'s
    aggregation: every later round would build on it."""
    for w, name in zip(params, names):
        if not bool(torch.isfinite(w).all()):
            raise NumericalError(f"round {round_ + 1}: the global model of {name} is non-finite "
                                 "after aggregation (server.lr or the updates too large?); the "
                                 "run stopped, results up to the last round are kept")


def check_losses(loss: np.ndarray, names, round_: int) -> None:
    """Stop the run (exit 1) when an evaluation after round ``round_ + 1`` gives a non-finite
    test loss ((S,) ``loss``): the model's parameters are finite but so large that its outputs
    overflow, which no later round repairs."""
    for value, name in zip(np.asarray(loss, np.float64), names):
        if not np.isfinite(value):
            raise NumericalError(f"round {round_ + 1}: the global model of {name} gives a "
                                 "non-finite test loss (server.lr or the updates too large?); "
                                 "the run stopped, results up to the last round are kept")

def _non_finite(G: torch.Tensor) -> np.ndarray:
    """(U_s,) bool: rows of G holding NaN or inf. A row's sum is finite when the row is, up to
    overflow of the sum, which the exact check of the flagged rows sorts out."""
    flagged = torch.nonzero(~torch.isfinite(G.sum(dim=1))).flatten()
    bad = np.zeros(G.shape[0], dtype=bool)
    if len(flagged):
        exact = ~torch.isfinite(G[flagged]).all(dim=1)
        bad[flagged[exact].numpy()] = True
    return bad
