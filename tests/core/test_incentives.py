"""mmfl.core.incentives: the budget-feasible reverse auction's properties, by brute force and
hypothesis (docs/algorithms.md section 3.4; mmfl's own mechanism, not the paper's)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfl.core.incentives import auction, critical_value, draw_costs, utility

GRID = np.round(np.arange(0.0, 6.01, 0.25), 2)  # deviations: every multiple of 0.25 in [0, 6]
COSTS = st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]), min_size=1,
                 max_size=5)


def test_hand_worked():
    """B = 6, bids (1, 2, 2.5, 4): b_(1) = 1 <= 6, b_(2) = 2 <= 3, b_(3) = 2.5 > 2, so k* = 2,
    winners 0 and 1. Bidder 0 (others 2, 2.5, 4): k = 1: min(6, 2) = 2; k = 2 (d_1 = 2 <= 3):
    min(3, 2.5) = 2.5; k = 3 (d_2 = 2.5 > 2) and k = 4 (d_3 = 4 > 1.5) infeasible: theta = 2.5.
    Bidder 1 (others 1, 2.5, 4): k = 1: 1; k = 2: min(3, 2.5) = 2.5: theta = 2.5. Total 5 <= 6."""
    won, pay = auction(np.array([1.0, 2.0, 2.5, 4.0]), 6.0)
    assert won.tolist() == [True, True, False, False]
    np.testing.assert_allclose(pay, [2.5, 2.5, 0.0, 0.0])


def test_edge_cases():
    assert auction(np.array([]), 5.0)[0].size == 0
    won, pay = auction(np.array([1.0, 1.0]), 0.0)  # no budget: nobody with a positive cost
    assert not won.any() and not pay.any()
    won, pay = auction(np.array([3.0]), 5.0)  # a lone bidder is paid the whole budget
    assert won.tolist() == [True] and pay.tolist() == [5.0]
    assert critical_value(np.array([]), 5.0) == 5.0


def test_ties_follow_priority():
    """Equal bids: the priority (a random permutation in a run) decides who wins."""
    won, _ = auction(np.array([2.0, 2.0, 2.0]), 4.0, priority=np.array([2, 0, 1]))
    assert won.tolist() == [False, True, True]


def _check_properties(costs: list[float], budget: float) -> None:
    c = np.array(costs)
    won, pay = auction(c, budget)
    assert pay.sum() <= budget + 1e-9                      # budget feasible
    assert (pay[won] >= c[won] - 1e-12).all()              # individually rational
    assert (pay[~won] == 0).all()
    for i in range(c.size):
        others = np.delete(c, i)
        truthful = utility(c[i], c[i], others, budget, index=i)
        assert truthful >= -1e-12
        for bid in GRID:                                   # no misreport pays more
            assert utility(c[i], bid, others, budget, index=i) <= truthful + 1e-9, (c, i, bid)


def test_brute_force_small_cases():
    """Every cost profile of 1 to 3 bidders from {0, 1, 2, 3} and budgets 0, 1, 2.5, 4, 7."""
    for n in (1, 2, 3):
        for costs in itertools.product([0.0, 1.0, 2.0, 3.0], repeat=n):
            for budget in (0.0, 1.0, 2.5, 4.0, 7.0):
                _check_properties(list(costs), budget)


@settings(max_examples=150, deadline=None)
@given(COSTS, st.sampled_from([0.0, 1.0, 3.0, 5.5, 10.0]))
def test_properties_hypothesis(costs, budget):
    _check_properties(costs, budget)


@settings(max_examples=150, deadline=None)
@given(COSTS, st.sampled_from([1.0, 3.0, 5.5, 10.0]), st.integers(0, 4))
def test_monotone_and_critical(costs, budget, j):
    """A winner lowering its bid still wins; a bid above theta loses, below it wins."""
    c = np.array(costs)
    i = j % c.size
    won, pay = auction(c, budget)
    theta = critical_value(np.delete(c, i), budget)
    if won[i]:
        assert auction(np.where(np.arange(c.size) == i, c[i] / 2, c), budget)[0][i]
        assert pay[i] == pytest.approx(theta)
    for bid in (theta - 0.01, theta + 0.01):
        if bid >= 0:
            b = c.copy()
            b[i] = bid
            assert auction(b, budget)[0][i] == (bid < theta)


def test_draw_costs():
    assert (draw_costs(2.0, (3, 2), None) == 2.0).all()
    c = draw_costs((1.0, 3.0), (400, 2), np.random.default_rng(0))
    assert c.shape == (400, 2) and c.min() >= 1.0 and c.max() < 3.0
    assert abs(c.mean() - 2.0) < 0.1


# -- Monte-Carlo: with equal costs and one model per client, recruitment_aware is unbiased ------

def test_recruitment_aware_unbiased_with_equal_costs():
    """5 clients with one processor each, 2 tasks, the random sampler (m = 3), every cost 1 and
    B = 2: the auction recruits a uniform min(n, 2) of the n drawn clients, so slots reporting
    p k*/n give an unbiased aggregate (20,000 draws, 4 standard errors) while plain p falls
    short of sum_i d_{i,s} G_{i,s}."""
    from testkit import assert_mean_within
    from mmfl.core.aggregation import unbiased_plan
    from mmfl.core.allocators import RandomAllocator
    from mmfl.experiment.incentives import Incentives
    from mmfl.types import Population, RoundState

    pop = Population(np.array([[30, 10], [60, 0], [10, 90], [20, 20], [5, 40]]),
                     np.ones(5, int), ("a", "b"))
    g = np.random.default_rng(5).normal(size=(5, 2, 2)) + 1.0
    full = np.einsum("is,isk->sk", pop.data_weight, g)
    alloc = RandomAllocator({}, pop, 0)
    state = RoundState(0, pop, 3.0, np.ones(5, bool))
    rng = np.random.default_rng(17)
    costs = np.ones((5, 2))
    reps = 20_000
    out = np.zeros((2, reps, 2, 2))
    both = (Incentives(costs, 2.0, 0), Incentives(costs, 2.0, 0, True))
    for r in range(reps):
        a = alloc.allocate(state, rng)
        for k, inc in enumerate(both):
            plan = unbiased_plan(inc.recruit(r, a, pop)[0], pop)
            np.add.at(out[k, r], plan.task, plan.coefficient[:, None] * g[plan.client, plan.task])
    assert_mean_within(out[1], full)
    se = out[0].std(axis=0, ddof=1) / np.sqrt(reps)
    assert (np.abs(out[0].mean(axis=0) - full) > 4 * se).any()
