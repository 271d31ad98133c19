"""Paying clients to train: a budget-feasible truthful reverse auction (docs/algorithms.md
section 3.4, docs/incentives.md).

NOT the paper's mechanism. The journal version of FedFairMMFL (arXiv:2404.13841 v2, "Fair
Concurrent Training of Multiple Models in Federated Learning") proposes auctions that pay
clients to train tasks; its text (bids, allocation, payments) was not reachable, and the
authors' public code has no auction. What follows is mmfl's own choice of the simplest standard
mechanism that fits the setting: a uniform-threshold budget-feasible procurement auction with
critical-value (Myerson) payments, one bidder per client.

Setting. Client i has a private cost c_{i,s} >= 0 for training model s once. In round t the
sampler draws its assignment; a drawn client i must train the bundle T_i of models it was drawn
for (known to the server), so it is a single-minded seller with one private number, its bundle
cost b_i = sum_{s in T_i} c_{i,s} (its bid). The server has a payment budget B per round and
values every recruited client equally. With n bidders, bids sorted by (bid, priority)
ascending, b_(1) <= ... <= b_(n) (the priority, a random permutation independent of the bids,
only breaks ties),

    k* = max { k in 1..n : b_(k) <= B / k }     (0 when no k qualifies)

and the k* first bidders win (are recruited). A winner i is paid its critical value, the
supremum of the bids with which it would still win, the others' bids fixed: with
d_1 <= ... <= d_{n-1} the others' bids, d_0 = 0 and d_n = +inf,

    theta_i = max_{k in 1..n, d_{k-1} <= B/k}  min(B / k, d_k).

Losers are paid nothing. Properties (checked by brute force in tests/core/test_incentives.py):

* monotone allocation (a winner lowering its bid still wins) and critical payments: truthful,
  reporting b_i = the true cost is a dominant strategy (Myerson's lemma);
* individually rational: a truthful winner has b_i <= theta_i;
* budget feasible: theta_i <= B / k* for every winner (for k < k* the k-th cheapest other is
  itself a winner with d_k <= B / k*; for k >= k*, B / k <= B / k*), so
  sum_i theta_i <= k* (B / k*) = B.

Pure numpy; nothing mutates its inputs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["auction", "critical_value", "draw_costs", "utility"]


def draw_costs(costs: float | tuple[float, float], shape: tuple[int, int],
               rng: np.random.Generator | None) -> np.ndarray:
    """c_{i,s}: every pair's private training cost.

    Args:
        costs: one cost c >= 0 for every pair, or (lo, hi) with 0 <= lo <= hi: c_{i,s} drawn
            uniformly from [lo, hi) independently per pair.
        shape: (N, S).
        rng: the generator; consumed by exactly N * S uniform draws for a range, unused for a
            number.

    Returns:
        (N, S) float costs.
    """
    if isinstance(costs, tuple):
        lo, hi = costs
        return lo + (hi - lo) * rng.random(shape)
    return np.full(shape, float(costs))


def _order(bids: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """(n,) indices sorting by bid ascending, ties by priority ascending."""
    return np.lexsort((priority, bids))


def auction(bids: np.ndarray, budget: float, priority: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """The uniform-threshold budget-feasible reverse auction (module docstring).

    Args:
        bids: (n,) float >= 0, b_i.
        budget: B >= 0, the payment budget.
        priority: (n,) distinct numbers breaking ties of equal bids (lower first), independent
            of the bids; default the index order.

    Returns:
        ((n,) bool winners, (n,) float payments theta_i, 0 for losers).
    """
    b = np.asarray(bids, np.float64)
    n = b.size
    pr = np.arange(n) if priority is None else np.asarray(priority)
    won = np.zeros(n, bool)
    pay = np.zeros(n)
    if n == 0:
        return won, pay
    order = _order(b, pr)
    k = np.arange(1, n + 1)
    ok = np.nonzero(b[order] <= budget / k)[0]
    kstar = int(ok[-1]) + 1 if ok.size else 0
    won[order[:kstar]] = True
    for i in order[:kstar]:
        pay[i] = critical_value(np.delete(b, i), budget)
    return won, pay


def critical_value(others: np.ndarray, budget: float) -> float:
    """theta = max_{k in 1..n, d_{k-1} <= B/k} min(B/k, d_k): the supremum of the bids with
    which a bidder wins against the others' bids d (n - 1 of them; d_0 = 0, d_n = +inf).

    Args:
        others: (n - 1,) the other bidders' bids.
        budget: B.

    Returns:
        theta (0 when no bid wins, e.g. B = 0).
    """
    d = np.sort(np.asarray(others, np.float64))
    n = d.size + 1
    k = np.arange(1, n + 1)
    below = np.concatenate(([0.0], d))            # d_{k-1}, k = 1..n
    above = np.concatenate((d, [np.inf]))         # d_k
    cap = budget / k
    feasible = below <= cap
    if not feasible.any():
        return 0.0
    return float(np.max(np.minimum(cap, above)[feasible]))


def utility(true_cost: float, bid: float, others: np.ndarray, budget: float,
            index: int = 0, priority: np.ndarray | None = None) -> float:
    """A bidder's utility theta - c when it wins with ``bid``, 0 when it loses.

    Args:
        true_cost: its cost c.
        bid: what it reports.
        others: (n - 1,) the other bids.
        budget: B.
        index: its position among the n bidders (others fill the rest in order).
        priority: (n,) tie-breaking priorities of the n bidders.

    Returns:
        float utility.
    """
    bids = np.insert(np.asarray(others, np.float64), index, bid)
    won, pay = auction(bids, budget, priority)
    return float(pay[index] - true_cost) if won[index] else 0.0
