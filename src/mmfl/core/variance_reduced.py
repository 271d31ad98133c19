"""Optimal variance-reduced samplers (ALGORITHMS.md sections 4, 5 and 7) and the stale baselines.

Every sampler here turns per-(client, task) measurements into scores

    U_{s,b} = d_{i,s} * score_{i,s} / B_i      for each processor b of client i (0 if ineligible)

and samples with the closed-form optimum of section 4 (:func:`optimal_probabilities_info`), or,
for ``fairvr``, with per-model budgets. The measurement ("signal") each needs is declared in
``requires`` and gathered by the runner before allocation:

| sampler    | score_{i,s}                                   | signal                    | aggregator |
|------------|-----------------------------------------------|---------------------------|------------|
| gvr        | ||G_{i,s}|| / eta_s                           | full computation          | unbiased   |
| lvr        | f_{i,s}(w_s^t) (refreshed w.p. ``freshness``) | local-loss probes         | unbiased   |
| stalevr    | ||G - beta h|| / eta_s, beta optimal          | full computation + store  | stalevr    |
| stalevre   | (1 - betahat) ||h|| / eta_s (stored only)     | store                     | stalevre   |
| fairvr     | as lvr, per-model budgets m_s = m pi_s        | local-loss probes         | unbiased   |

``fedvarp``, ``mifa`` and ``fedstale`` sample like ``random`` and aggregate with their stale rule.
"""

from __future__ import annotations

import numpy as np

from mmfl.core.allocators import (FAIR_OPTIONS, Allocator, FairAllocator, FullAllocator,
                                  RandomAllocator, draw, fedfair_distribution, _DRAW_OPT)
from mmfl.core.probabilities import (optimal_probabilities_info,
                                     optimal_probabilities_per_model_info)
from mmfl.core.stale import B0, BETA
from mmfl.registry import Option, register
from mmfl.rng import stream
from mmfl.types import Assignment, RoundState


def processor_scores(state: RoundState, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U (P, S), eligible (P, S)): U_{s,b} = d_{i,s} score_{i,s} / B_i on eligible pairs.

    ``score`` is (N, S); NaN or negative entries count as 0.
    """
    pop = state.population
    elig = state.eligible
    raw = np.where(elig, np.maximum(np.nan_to_num(score, nan=0.0, posinf=0.0), 0.0), 0.0)
    u_client = pop.data_weight * raw / pop.capacity[:, None]
    return u_client[pop.processor_client], elig[pop.processor_client]


class OptimalAllocator(Allocator):
    """Base: section 4's optimum over the scores of :meth:`client_scores`, drawn by section 1."""

    def client_scores(self, state: RoundState) -> np.ndarray:
        """(N, S) score_{i,s} >= 0 before the d_{i,s} / B_i factor."""
        raise NotImplementedError

    def allocate(self, state: RoundState, rng: np.random.Generator) -> Assignment:
        u, elig = processor_scores(state, self.client_scores(state))
        p, info = optimal_probabilities_info(u, state.budget, eligible=elig)
        return draw(p, state.population, rng, note=info["note"])


def _require(value: np.ndarray | None, what: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"this sampler needs signals.{what}; run it through the runner")
    return value


@register("sampler", "gvr", doc="MMFL-GVR: optimal sampling by update norms (full computation).")
class GVRAllocator(OptimalAllocator):
    """MMFL-GVR (the ICDCS poster's method): every eligible pair trains, reports ||G|| / eta_s,
    and the active ones are sampled optimally; unbiased aggregation."""

    requires = frozenset({"updates"})

    def client_scores(self, state):
        return _require(state.signals.update_norm, "update_norm")


LVR_OPTIONS = {
    "freshness": Option(float, 1.0, "(0..1]",
                        "probability r that a pair's local loss is re-measured in a round "
                        "(otherwise its last value is reused)"),
    "loss_weighting": Option(str, "paper", "one of paper|authors",
                             "paper: U = d * loss / B; authors: the authors' code divides the "
                             "loss by n_{i,s}, cancelling d (U = loss / (B * sum_j n_j))"),
}


class _LossScores:
    """Mixin: cached local losses, refreshed with probability ``freshness`` (section 5, LVR)."""

    requires = frozenset({"local_loss"})

    def _init_cache(self) -> None:
        self.loss = np.full(self.population.n_samples.shape, np.nan)

    def probe_pairs(self, state: RoundState) -> np.ndarray:
        r = float(self.options.get("freshness", 1.0))
        unknown = np.isnan(self.loss)
        if r >= 1.0:
            return state.eligible
        fresh = stream(self.seed, "lvr-freshness", state.round).random(self.loss.shape) < r
        return state.eligible & (fresh | unknown)

    def losses(self, state: RoundState) -> np.ndarray:
        new = _require(state.signals.local_loss, "local_loss")
        self.loss = np.where(np.isnan(new), self.loss, new)
        loss = np.nan_to_num(self.loss, nan=0.0)
        if self.options.get("loss_weighting", "paper") == "authors":
            n = self.population.n_samples
            loss = np.divide(loss, n, out=np.zeros_like(loss), where=n > 0)
        return loss

    def state_dict(self):
        return {"loss": self.loss.copy()}

    def load_state_dict(self, state):
        self.loss = np.array(state["loss"], dtype=np.float64)


@register("sampler", "lvr", options=LVR_OPTIONS,
          doc="MMFL-LVR: optimal sampling by the global models' local losses.")
class LVRAllocator(_LossScores, OptimalAllocator):
    """MMFL-LVR: score = f_{i,s}(w_s^t), one forward pass per probed pair; unbiased."""

    def __init__(self, options, population, seed=0):
        super().__init__(options, population, seed)
        self._init_cache()

    def client_scores(self, state):
        return self.losses(state)


@register("sampler", "stalevr", doc="MMFL-StaleVR: optimal sampling by ||G - beta h|| (full computation).")
class StaleVRAllocator(OptimalAllocator):
    """MMFL-StaleVR: score = ||G - beta h|| / eta_s with the optimal beta = <G,h>/||h||^2, from
    the full computation; aggregated with the stale rule of section 6."""

    requires = frozenset({"updates", "stale"})
    default_aggregator = "stalevr"

    def client_scores(self, state):
        sig = state.signals
        g2 = np.square(_require(sig.update_norm, "update_norm"))
        beta = _require(sig.beta, "beta")
        dot = np.nan_to_num(_require(sig.stale_dot, "stale_dot"))
        h2 = np.nan_to_num(_require(sig.stale_norm_sq, "stale_norm_sq"))
        return np.sqrt(np.maximum(0.0, g2 - 2 * beta * dot + beta**2 * h2))


@register("sampler", "stalevre", options={"b0": B0},
          doc="MMFL-StaleVRE: optimal sampling from stored updates only (no extra client cost).")
class StaleVREAllocator(OptimalAllocator):
    """MMFL-StaleVRE: score = (1 - betahat) ||h|| / eta_s, estimating ||G - betahat h|| with the
    stored update h standing in for G; no client computes anything beyond the active pairs.

    Round 0 is full participation (every client trains every model once, so that every pair has
    an h). A pair that has never been active since (a client that joined later) has no h: it gets
    its task's largest score so that it is explored.
    """

    requires = frozenset({"stale"})
    default_aggregator = "stalevre"

    def allocate(self, state, rng):
        if state.round == 0:
            return FullAllocator(self.options, self.population, self.seed).allocate(state, rng)
        return super().allocate(state, rng)

    def client_scores(self, state):
        sig = state.signals
        h = np.sqrt(np.nan_to_num(_require(sig.stale_norm_sq, "stale_norm_sq")))
        beta = _require(sig.beta, "beta")
        score = np.abs(1.0 - beta) * h
        unseen = state.eligible & (h == 0)
        top = np.where(state.eligible, score, 0.0).max(axis=0)
        return np.where(unseen, top[None, :], score)


@register("sampler", "fairvr", options={**LVR_OPTIONS, **FAIR_OPTIONS},
          doc="MMFL-FairVR: alpha-fair per-model budgets, optimal LVR sampling within them.")
class FairVRAllocator(_LossScores, Allocator):
    """MMFL-FairVR (ALGORITHMS.md section 7): m_s = m pi_s with pi the alpha-fair shares of
    FedFairMMFL (from the models' current losses), then section 4's per-model-budget optimum
    over LVR scores; unbiased aggregation."""

    needs_task_losses = True

    def __init__(self, options, population, seed=0):
        super().__init__(options, population, seed)
        self._init_cache()
        self._fair = FairAllocator(options, population, seed)

    def budgets(self, state: RoundState) -> np.ndarray:
        """(S,) m_s = m * pi_s."""
        f = self._fair._losses(state)
        pi = fedfair_distribution(f, float(self.options.get("alpha", 3.0)),
                                  self._fair._weights(state.population))
        return float(state.budget) * pi

    def allocate(self, state, rng):
        u, elig = processor_scores(state, self.losses(state))
        p, info = optimal_probabilities_per_model_info(u, self.budgets(state), eligible=elig)
        return draw(p, state.population, rng, note=info.get("note", ""))


# -- stale baselines: random sampling + a stale aggregator --------------------------------------

def _baseline(name: str, aggregator: str, doc: str, options: dict | None = None):
    cls = type(f"{name.title()}Allocator", (RandomAllocator,),
               {"default_aggregator": aggregator, "__doc__": doc})
    return register("sampler", name, options={"draw": _DRAW_OPT, **(options or {})}, doc=doc)(cls)


_baseline("fedvarp", "fedvarp", "FedVARP: uniform sampling, stale-update aggregation with beta = 1.")
_baseline("mifa", "mifa", "MIFA: uniform sampling, average of every client's latest update.")
_baseline("fedstale", "fedstale", "FedStale: uniform sampling, stale aggregation with fixed beta.",
          {"beta": BETA})
