"""Optimal variance-reduced samplers (docs/algorithms.md sections 4, 5 and 7) and the stale baselines.

Each sampler turns per-(client, task) measurements into processor scores
U_{s,b} = d_{i,s} score_{i,s} / B_i (:func:`processor_scores`) and samples with section 4's
optimum (``fairvr``: per-model budgets, section 4.5). The signal each needs is declared in
``requires`` and gathered by the runner before allocation (docs/algorithms.md section 5):

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

import dataclasses

import numpy as np

from mmfl.core.allocators import (FAIR_OPTIONS, Allocator, FairAllocator, FullAllocator,
                                  RandomAllocator, fedfair_distribution)
from mmfl.core.drawing import DRAW_OPTION, draw
from mmfl.core.per_model import optimal_probabilities_per_model_info
from mmfl.core.probabilities import optimal_probabilities_info
from mmfl.core.stale_aggregators import B0, BETA, IDLE_MODEL, SCHEDULE
from mmfl.registry import Option, register
from mmfl.rng import LVR_FRESHNESS, stream
from mmfl.types import Assignment, RoundState, Signal


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
        return draw(p, state.population, rng, note=info.note)


def residual_norm(g2: np.ndarray, dot: np.ndarray, h2: np.ndarray,
                  beta: np.ndarray) -> np.ndarray:
    """||G - beta h|| from ||G||^2, <G, h>, ||h||^2 and beta (same-shape arrays; rounding below
    zero clipped): the StaleVR / StaleVRE score of section 5."""
    return np.sqrt(np.maximum(0.0, g2 - 2 * beta * dot + beta**2 * h2))


def _require(value: np.ndarray | None, what: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"this sampler needs signals.{what}; run it through the runner")
    return value


GVR_OPTIONS = {
    "d_index": Option(str, "paper", "one of paper|authors",
                      "paper: slot k of client i is weighted d_{i,s}; authors: the authors' "
                      "aggregation index bug, d_{c_k,s} with c_k the client of the k-th active "
                      "slot of ANY model (slots in processor order), biased when S > 1",
                      authors="authors"),
}


@register("sampler", "gvr", options=GVR_OPTIONS,
          doc="MMFL-GVR: optimal sampling by update norms (full computation).")
class GVRAllocator(OptimalAllocator):
    """MMFL-GVR (the ICDCS poster's method): every eligible pair trains, reports ||G|| / eta_s,
    and the active ones are sampled optimally; unbiased aggregation.

    ``d_index = "authors"`` reproduces the authors' GVR aggregation: per model s they walk the
    model's active slots in processor order and weight the k-th with d_{c_k, s}, where c_k is the
    client of the k-th active slot over all models (the list they pass is the round's whole
    active list, not the model's). Expressed here as the slot's ``share`` times
    d_{c_k,s} / d_{i,s}, so the unbiased aggregator applies d_{c_k,s} / (B_i p); a c_k that does
    not hold s contributes 0.
    """

    requires = frozenset({Signal.UPDATES})

    def client_scores(self, state):
        return _require(state.signals.update_norm, "update_norm")

    def allocate(self, state, rng):
        a = super().allocate(state, rng)
        if self.opt("d_index") != "authors" or a.num_slots == 0:
            return a
        return dataclasses.replace(a, share=authors_index_share(a, state.population.data_weight))


def authors_index_share(a: Assignment, d: np.ndarray) -> np.ndarray:
    """(K,) shares of the authors' GVR index bug (see :class:`GVRAllocator`): slot j, the k-th
    slot of its model in processor order, gets share_j * d[c_k, s_j] / d[i_j, s_j] with c_k the
    client of the k-th slot overall in processor order."""
    order = np.argsort(a.processor, kind="stable")
    overall = a.client[order]                       # c_0, c_1, ... in processor order
    share = np.array(a.share, dtype=np.float64)
    for s in np.unique(a.task).tolist():
        mine = order[a.task[order] == s]            # model s's slots in processor order
        wrong = overall[:len(mine)]
        right = d[a.client[mine], s]
        share[mine] = share[mine] * np.divide(d[wrong, s], right, out=np.zeros(len(mine)),
                                              where=right > 0)
    return share


LVR_OPTIONS = {
    "freshness": Option(float, 1.0, "(0..1]",
                        "probability r that a pair's local loss is re-measured in a round "
                        "(otherwise its last value is reused)"),
    "loss_weighting": Option(str, "paper", "one of paper|authors",
                             "paper: U = d * loss / B; authors: the authors' code divides the "
                             "loss by n_{i,s}, cancelling d (U = loss / (B * sum_j n_j))",
                             authors="authors"),
}


class _LossScores:
    """Mixin: the last known local loss of every pair, refreshed with probability
    ``freshness`` (section 5, LVR). Scoring is pure: :meth:`losses` merges the round's
    measurements into a copy; :meth:`observe`, which the runner calls after the round, keeps
    them (the sampler's checkpointed state)."""

    requires = frozenset({Signal.LOCAL_LOSS})
    observes = True

    def _init_cache(self) -> None:
        self.loss = np.full(self.population.n_samples.shape, np.nan)

    def probe_pairs(self, state: RoundState) -> np.ndarray:
        """(N, S) bool: the pairs whose loss is measured this round: all eligible pairs with
        ``freshness`` = 1, else each with probability r (and every pair never measured). The
        one random draw of a sampler outside ``allocate``'s generator, from the stream
        (seed, LVR_FRESHNESS, round): the probe set is chosen before allocation, when that
        generator does not exist yet."""
        r = float(self.opt("freshness"))
        unknown = np.isnan(self.loss)
        if r >= 1.0:
            return state.eligible
        fresh = stream(self.seed, LVR_FRESHNESS, state.round).random(self.loss.shape) < r
        return state.eligible & (fresh | unknown)

    def _known(self, state: RoundState) -> np.ndarray:
        """(N, S) the last known loss of every pair: this round's measurements
        (``signals.local_loss``, NaN where not probed) over the stored ones (NaN: never)."""
        new = _require(state.signals.local_loss, "local_loss")
        return np.where(np.isnan(new), self.loss, new)

    def losses(self, state: RoundState) -> np.ndarray:
        """(N, S) scores from the last known losses (:meth:`_known`), divided by n_{i,s} with
        ``loss_weighting = "authors"``; changes no state."""
        loss = np.nan_to_num(self._known(state), nan=0.0)
        if self.opt("loss_weighting") == "authors":
            n = self.population.n_samples
            loss = np.divide(loss, n, out=np.zeros_like(loss), where=n > 0)
        return loss

    def observe(self, clients: np.ndarray, tasks: np.ndarray, state: RoundState) -> None:
        """Keep the round's measured losses as the pairs' last known ones (after the round)."""
        if state.signals.local_loss is not None:
            self.loss = self._known(state)

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


@register("sampler", "stalevr", options={"idle_model": IDLE_MODEL},
          doc="MMFL-StaleVR: optimal sampling by ||G - beta h|| (full computation).")
class StaleVRAllocator(OptimalAllocator):
    """MMFL-StaleVR: score = ||G - beta h|| / eta_s with the optimal beta = <G,h>/||h||^2, from
    the full computation; aggregated with the stale rule of section 6."""

    requires = frozenset({Signal.UPDATES, Signal.STALE})
    default_aggregator = "stalevr"

    def client_scores(self, state):
        sig = state.signals
        g2 = np.square(_require(sig.update_norm, "update_norm"))
        beta = _require(sig.beta, "beta")
        dot = np.nan_to_num(_require(sig.stale_dot, "stale_dot"))
        h2 = np.nan_to_num(_require(sig.stale_norm_sq, "stale_norm_sq"))
        return residual_norm(g2, dot, h2, beta)


STALEVRE_OPTIONS = {
    "b0": B0,
    "schedule": SCHEDULE,
    "idle_model": IDLE_MODEL,
    "init": Option(str, "full", "one of full|random|computation",
                   "round 0: full: every pair trains once (fills every h); computation: every "
                   "pair trains once for its score ||G|| / eta and the round is sampled "
                   "optimally (the authors' main2.py); random: the authors' random round, then "
                   "one full computation before round 1 gives the first scores (main.py)",
                   authors="computation"),
    "score": Option(str, "stored", "one of stored|probe|last",
                    "stored: (1 - betahat) ||h|| / eta from the store; probe: each round a random "
                    "probe set of m processors trains first and a pair scores ||G~ - betahat h|| "
                    "/ eta from its latest probe update G~ (the authors' main2.py, about 2m "
                    "trainings per round); last: ||G - betahat h|| / eta from the pair's last "
                    "aggregation (main.py)", authors="probe"),
    "budget": Option(str, "fixed", "one of fixed|walk",
                     "fixed: budget m every round; walk: round t+1 uses round t's number of "
                     "active slots as its budget (main.py's approximation path)"),
}


@register("sampler", "stalevre", options=STALEVRE_OPTIONS,
          doc="MMFL-StaleVRE: optimal sampling from stored updates only (no extra client cost).")
class StaleVREAllocator(OptimalAllocator):
    """MMFL-StaleVRE: optimal sampling from stored updates, aggregated with StaleVRE's decaying
    betahat (docs/algorithms.md sections 5 and 6.2).

    Options ``score`` (stored | probe | last), ``init`` (round 0: full | computation | random)
    and ``budget`` (fixed | walk) are described in docs/algorithms.md section 5 and the help
    texts of STALEVRE_OPTIONS; ``variant = "authors"`` selects ``main2.py``'s choices
    (section 9). Under "stored" and "last", a pair without a score (no h under "stored", none
    computed yet under "last", e.g. a client that joined later) gets its task's largest score
    so that it is explored. Under "probe", a pair never probed nor aggregated scores 0 and is
    never sampled.
    """

    default_aggregator = "stalevre"

    def __init__(self, options, population, seed=0):
        super().__init__(options, population, seed)
        self._score = np.full(population.n_samples.shape, np.nan)
        self._last_slots = -1
        self.observes = self.observes_update_norm = self.opt("score") == "last"
        self.requires = frozenset({Signal.STALE, Signal.PROBE} if self.opt("score") == "probe"
                                  else {Signal.STALE})

    def requires_at(self, round):
        need = set(self.requires)
        if round == 0:
            need.discard(Signal.PROBE)
            if self.opt("init") == "computation":
                need.add(Signal.UPDATES)
        if round == 1 and self.opt("init") == "random":
            need.add(Signal.UPDATES)
        return frozenset(need)

    def probe_set(self, state: RoundState, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(clients (U,), tasks (U,)) of the round's random probe set (``score = "probe"``):
        exactly m processors, each with a uniform held model (pairs drawn twice merged)."""
        return self._authors_random(state, rng).pairs()

    def _authors_random(self, state: RoundState, rng: np.random.Generator) -> Assignment:
        """The authors' random draw: exactly m processors, a uniform held model each, weights
        d S / C (:class:`RandomAllocator` with ``draw = "fixed"``, ``probability = "authors"``)."""
        opts = {"draw": "fixed", "probability": "authors"}
        return RandomAllocator(opts, self.population, self.seed).allocate(state, rng)

    def allocate(self, state, rng):
        if state.round == 0 and self.opt("init") != "computation":
            if self.opt("init") == "random":
                a = self._authors_random(state, rng)
            else:
                a = FullAllocator(self.options, self.population, self.seed).allocate(state, rng)
        else:
            if self.opt("budget") == "walk" and self._last_slots >= 0:
                state = dataclasses.replace(state, budget=float(self._last_slots))
            a = super().allocate(state, rng)
        self._last_slots = a.num_slots
        return a

    def client_scores(self, state):
        sig = state.signals
        if state.round == 0 and self.opt("init") == "computation":
            return np.nan_to_num(_require(sig.update_norm, "update_norm"), nan=0.0)
        if self.opt("score") == "probe":
            g2 = np.nan_to_num(_require(sig.probe_norm_sq, "probe_norm_sq"))
            dot = np.nan_to_num(_require(sig.probe_dot, "probe_dot"))
            h2 = np.nan_to_num(_require(sig.stale_norm_sq, "stale_norm_sq"))
            beta = np.nan_to_num(_require(sig.beta, "beta"))
            return residual_norm(g2, dot, h2, beta)
        if self.opt("score") == "last":
            if sig.update_norm is not None:  # a full computation (init = "random", round 1)
                self._score = np.where(np.isnan(sig.update_norm), self._score, sig.update_norm)
            score = np.nan_to_num(self._score, nan=0.0)
            unseen = state.eligible & np.isnan(self._score)
        else:
            h = np.sqrt(np.nan_to_num(_require(sig.stale_norm_sq, "stale_norm_sq")))
            beta = _require(sig.beta, "beta")
            score = np.abs(1.0 - beta) * h
            unseen = state.eligible & (h == 0)
        top = np.where(state.eligible, score, 0.0).max(axis=0)
        return np.where(unseen, top[None, :], score)

    def observe(self, clients, tasks, state):
        if self.opt("score") != "last" or len(clients) == 0:
            return
        sig = state.signals
        g2 = np.square(_require(sig.update_norm, "update_norm")[clients, tasks])
        h2 = np.nan_to_num(_require(sig.stale_norm_sq, "stale_norm_sq")[clients, tasks])
        dot = np.nan_to_num(_require(sig.stale_dot, "stale_dot")[clients, tasks])
        beta = np.nan_to_num(_require(sig.beta, "beta")[clients, tasks])
        self._score[clients, tasks] = residual_norm(g2, dot, h2, beta)

    def state_dict(self):
        return {"score": self._score.copy(), "last_slots": np.array([self._last_slots])}

    def load_state_dict(self, state):
        if "score" in state:  # checkpoints written before these options have no state
            self._score = np.array(state["score"], dtype=np.float64)
            self._last_slots = int(np.asarray(state["last_slots"]).reshape(-1)[0])


@register("sampler", "fairvr", options={**LVR_OPTIONS, **FAIR_OPTIONS},
          doc="MMFL-FairVR: alpha-fair per-model budgets, optimal LVR sampling within them.")
class FairVRAllocator(_LossScores, Allocator):
    """MMFL-FairVR (docs/algorithms.md section 7): m_s = m pi_s with pi the alpha-fair shares of
    FedFairMMFL (from the models' current losses), then section 4's per-model-budget optimum
    over LVR scores; unbiased aggregation."""


    def __init__(self, options, population, seed=0):
        super().__init__(options, population, seed)
        self._init_cache()
        self._fair = FairAllocator(options, population, seed)
        self.needs_fresh_task_losses = self._fair.needs_fresh_task_losses

    def budgets(self, state: RoundState) -> np.ndarray:
        """(S,) m_s = m * pi_s."""
        f = self._fair._losses(state)
        pi = fedfair_distribution(f, float(self.opt("alpha")),
                                  self._fair._weights(state.population))
        return float(state.budget) * pi

    def allocate(self, state, rng):
        u, elig = processor_scores(state, self.losses(state))
        p, info = optimal_probabilities_per_model_info(u, self.budgets(state), eligible=elig)
        return draw(p, state.population, rng, note=info.note)


# -- stale baselines: random sampling + a stale aggregator --------------------------------------

def _baseline(name: str, aggregator: str, doc: str, options: dict | None = None):
    cls = type(f"{name.title()}Allocator", (RandomAllocator,),
               {"default_aggregator": aggregator, "__doc__": doc})
    return register("sampler", name, options={"draw": DRAW_OPTION, **(options or {})}, doc=doc)(cls)


_baseline("fedvarp", "fedvarp", "FedVARP: uniform sampling, stale-update aggregation with beta = 1.",
          {"idle_model": IDLE_MODEL})
_baseline("mifa", "mifa", "MIFA: uniform sampling, average of every client's latest update.")
_baseline("fedstale", "fedstale", "FedStale: uniform sampling, stale aggregation with fixed beta.",
          {"beta": BETA, "idle_model": IDLE_MODEL})
