"""A run's paid recruitment: clients' private training costs and the per-round auction that
decides which drawn clients train (docs/algorithms.md section 3.4, docs/incentives.md).

mmfl's own mechanism (:mod:`mmfl.core.incentives`), NOT the auction of arXiv:2404.13841 v2,
whose text was not reachable.

Config (every default in :mod:`mmfl.experiment.config`):

- ``[clients] costs``: c_{i,s}, each pair's private cost of training once: a number for every
  pair, or ``[lo, hi]`` drawn uniformly per pair once per run from the stream
  ``(seed, "costs")``; default 0 (free clients: no auction, the run is exactly the run without
  incentives).
- ``[clients] payment_budget``: B, what the server may pay per round (> 0 when costs are set).
- ``[clients] recruitment_aware``: the recruited slots report the probability p k*/n
  (:func:`mmfl.core.preferences.effective_assignment` with w = k*/n for every pair), so the
  1/p-weighted aggregate does not shrink by the recruited fraction.

Every round, after the sampler's draw (and the declines of ``clients.preferences``), each
drawn client bids the cost of the models it was drawn for; the auction recruits the k* cheapest
(ties by a random priority from the stream ``(seed, "auction", t)``) and pays each its critical
value. A client not recruited loses all its slots before training, like a decline: they are
counted in rounds.csv's ``declined`` and in summary.json ``incentives.unrecruited_slots``.
Every bid is one scalar upload (rounds.csv ``scalar_uploads``).
"""

from __future__ import annotations

import numpy as np

from mmfl.core.incentives import auction, draw_costs
from mmfl.core.preferences import effective_assignment
from mmfl.experiment.config import ExperimentConfig
from mmfl.rng import AUCTION, COSTS, stream
from mmfl.types import Assignment, Population

__all__ = ["Incentives"]


class Incentives:
    """The run's costs c_{i,s}, its payment budget B and the totals of its auctions.

    Args:
        costs: (N, S) c_{i,s}, or None: no incentives (every method is the identity, draws
            nothing).
        budget: B per round.
        seed: the run's root seed (the auction's tie-break stream derives from it).
        aware: ``clients.recruitment_aware``: recruited slots report p k*/n.
    """

    def __init__(self, costs: np.ndarray | None, budget: float, seed: int,
                 aware: bool = False):
        self.costs = costs
        self.budget = float(budget)
        self.aware = bool(aware)
        self.seed = int(seed)
        self.rounds = self.bidders = self.recruited = self.unrecruited_slots = 0
        self.last_bidders = 0  # bids of the latest round (scalar uploads, rounds.csv)
        self.paid = self.winners_cost = 0.0

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, population: Population) -> "Incentives":
        """The incentives ``cfg`` gives ``population``; no incentives when ``clients.costs``
        is 0."""
        c = cfg.clients
        if c.costs == 0:
            return cls(None, 0.0, cfg.seed)
        shape = (population.num_clients, population.num_tasks)
        return cls(draw_costs(c.costs, shape, stream(cfg.seed, COSTS)), c.payment_budget,
                   cfg.seed, c.recruitment_aware)

    def recruit(self, t: int, asked: Assignment, population: Population
                ) -> tuple[Assignment, int]:
        """Round t's assignment without the clients the auction did not recruit (with
        ``aware``, the kept slots' probabilities times k*/n), and the lost slots' count.

        Client i's bid is b_i = sum_{s in T_i} c_{i,s} over the models T_i of its drawn pairs
        (one bidder per client, bidders in client order); priorities for ties come from the
        stream ``(seed, "auction", t)`` (one permutation of the bidders)."""
        if self.costs is None:
            return asked, 0
        clients, tasks = asked.pairs()
        bidders = np.unique(clients)
        bids = np.zeros(self.costs.shape[0])
        np.add.at(bids, clients, self.costs[clients, tasks])
        priority = stream(self.seed, AUCTION, t).permutation(bidders.size)
        won, pay = auction(bids[bidders], self.budget, priority)
        self.rounds += 1
        self.last_bidders = int(bidders.size)
        self.bidders += self.last_bidders
        self.recruited += int(won.sum())
        self.paid += float(pay.sum())
        self.winners_cost += float(bids[bidders][won].sum())
        lost = np.isin(clients, bidders[~won])
        if not lost.any():
            return asked, 0
        slots = int(np.isin(asked.client, bidders[~won]).sum())
        self.unrecruited_slots += slots
        kept = asked.without_pairs(clients[lost], tasks[lost],
                                   note=f"{slots} slot(s) not recruited (auction)")
        if self.aware and won.any():
            rate = np.full(self.costs.shape, won.sum() / bidders.size)
            kept = effective_assignment(kept, rate, population)
        return kept, slots

    def summary(self) -> dict[str, float | int]:
        """summary.json's ``incentives``: the budget B, and over the rounds this process ran
        (a resumed run counts from its resume): auctions held, bidders (drawn clients),
        recruited clients, unrecruited slots, total payments and the recruited clients' total
        cost (payments minus it is the clients' surplus)."""
        return {"payment_budget": self.budget, "rounds": self.rounds, "bidders": self.bidders,
                "recruited": self.recruited, "unrecruited_slots": self.unrecruited_slots,
                "paid": round(self.paid, 6), "recruited_cost": round(self.winners_cost, 6)}
