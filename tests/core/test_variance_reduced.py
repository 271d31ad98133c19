"""Variance-reduced samplers and stale-update aggregators (docs/algorithms.md sections 4-7).

Monte Carlo: for every unbiased sampler x aggregator pair, the mean over >= 20,000 draws of the
server step sum_k c_k G_k + sum_j e_j h_j is within 4 standard errors (per coordinate) of the
full-participation step over the available clients, sum_i d_{i,s} G_{i,s}.
"""

from __future__ import annotations

import numpy as np
import pytest

from testkit import assert_mean_within
from mmfl.core.aggregation import UnbiasedAggregator
from mmfl.core.drawing import draw
from mmfl.core.probabilities import optimal_probabilities
from mmfl.core.stale_aggregators import (FedStaleAggregator, FedVARPAggregator, MIFAAggregator,
                             StaleVRAggregator, StaleVREAggregator, stale_plan)
from mmfl.core.variance_reduced import (FairVRAllocator, GVRAllocator, LVRAllocator,
                                        StaleVRAllocator, StaleVREAllocator, processor_scores)
from mmfl.registry import get
from mmfl.types import Population, RoundState, Signals

N_SAMPLES = np.array([[30, 10, 0], [60, 0, 5], [10, 90, 0], [0, 20, 40], [25, 25, 25]])
CAPACITY = np.array([1, 2, 1, 2, 1])
POP = Population(N_SAMPLES, CAPACITY, ("a", "b", "c"))
AVAILABLE = np.array([True, True, True, False, True])
DIM = 2
_rng = np.random.default_rng(7)
G = _rng.normal(size=(5, 3, DIM)) + 1.0      # fresh updates G[i, s] (eta = 1)
H = G + 0.3 * _rng.normal(size=(5, 3, DIM))  # stored stale updates h[i, s]
H[2, 1] = 0.0                                 # one pair without a stored update


def signals(**extra) -> Signals:
    held = POP.holds
    nan = np.where(held, 0.0, np.nan)
    return Signals(
        local_loss=np.where(held, 1.0 + np.arange(15).reshape(5, 3) % 4, np.nan),
        update_norm=np.linalg.norm(G, axis=2) + nan,
        stale_dot=np.einsum("isk,isk->is", G, H) + nan,
        stale_norm_sq=np.where(held, np.einsum("isk,isk->is", H, H), 0.0),
        **extra,
    )


def full_step(beta: np.ndarray | None = None) -> np.ndarray:
    """sum over available i of d G, plus d beta h for offline clients with a stored h (their
    stale term stays in the update: section 6 sums it over all clients)."""
    d = POP.data_weight * AVAILABLE[:, None]
    step = np.einsum("is,isk->sk", d, G)
    if beta is not None:
        off = POP.data_weight * (~AVAILABLE)[:, None] * beta * (signals().stale_norm_sq > 0)
        step += np.einsum("is,isk->sk", off, H)
    return step


def estimates(allocator, aggregator, reps=20_000, seed=0, round_=3, budget=2.5):
    """(reps, S, DIM) server steps, and the beta used. The sampler computes its probability
    matrix once (it is deterministic given the state); the draws of section 1 are repeated."""
    rng = np.random.default_rng(seed)
    state = RoundState(round_, POP, budget, AVAILABLE, task_losses=np.array([0.5, 1.0, 2.0]),
                       task_accuracies=np.array([0.8, 0.6, 0.4]), signals=signals())
    beta = aggregator.beta(state)
    if beta is not None:
        state = RoundState(round_, POP, budget, AVAILABLE, task_losses=state.task_losses,
                           task_accuracies=state.task_accuracies, signals=signals(beta=beta))
    out = np.zeros((reps, 3, DIM))
    first = allocator.allocate(state, rng)
    for r in range(reps):
        a = first if r == 0 else draw(first.probabilities, POP, rng)
        plan = aggregator.plan(a, state)
        np.add.at(out[r], plan.task, plan.coefficient[:, None] * G[plan.client, plan.task])
        np.add.at(out[r], plan.stale_task, plan.stale_coefficient[:, None] * H[plan.stale_client, plan.stale_task])
    return out, beta


def assert_unbiased(est, beta=None):
    assert_mean_within(est, full_step(beta))


def stalevre_aggregator():
    agg = StaleVREAggregator({"b0": 1.0}, POP)
    agg.last[POP.holds] = 1          # every pair last active in round 1
    agg.rate[POP.holds] = 0.2        # decays to 0.6 by round 3
    return agg


@pytest.mark.parametrize("sampler, aggregator", [
    (GVRAllocator({}, POP, 0), UnbiasedAggregator({}, POP)),
    (LVRAllocator({}, POP, 0), UnbiasedAggregator({}, POP)),
    (LVRAllocator({"loss_weighting": "authors"}, POP, 0), UnbiasedAggregator({}, POP)),
    (FairVRAllocator({"alpha": 3.0}, POP, 0), UnbiasedAggregator({}, POP)),
    (StaleVRAllocator({}, POP, 0), StaleVRAggregator({}, POP)),
    (StaleVREAllocator({}, POP, 0), stalevre_aggregator()),
    (get("sampler", "fedvarp").obj({}, POP, 0), FedVARPAggregator({}, POP)),
    (get("sampler", "fedstale").obj({}, POP, 0), FedStaleAggregator({"beta": 0.0}, POP)),
    (get("sampler", "fedstale").obj({}, POP, 0), FedStaleAggregator({"beta": 0.5}, POP)),
    (get("sampler", "fedstale").obj({}, POP, 0), FedStaleAggregator({"beta": 1.0}, POP)),
    (GVRAllocator({}, POP, 0), FedStaleAggregator({"beta": 0.7}, POP)),
], ids=["gvr", "lvr", "lvr-authors", "fairvr", "stalevr", "stalevre", "fedvarp",
        "fedstale0", "fedstale.5", "fedstale1", "gvr+fedstale.7"])
def test_unbiased_sampler_aggregator_pairs(sampler, aggregator):
    est, beta = estimates(sampler, aggregator, seed=len(type(aggregator).__name__))
    assert_unbiased(est, beta)


def test_mifa_is_the_average_of_latest_updates():
    state = RoundState(3, POP, 2.5, AVAILABLE, signals=signals())
    alloc = get("sampler", "mifa").obj({}, POP, 0)
    agg = MIFAAggregator({}, POP)
    a = alloc.allocate(state, np.random.default_rng(1))
    plan = agg.plan(a, state)
    step = np.zeros((3, DIM))
    np.add.at(step, plan.task, plan.coefficient[:, None] * G[plan.client, plan.task])
    np.add.at(step, plan.stale_task, plan.stale_coefficient[:, None] * H[plan.stale_client, plan.stale_task])
    latest = H.copy()
    latest[plan.client, plan.task] = G[plan.client, plan.task]
    stored = state.signals.stale_norm_sq > 0
    stored[plan.client, plan.task] = True
    expect = np.einsum("is,isk->sk", POP.data_weight * stored, latest)
    np.testing.assert_allclose(step, expect, rtol=1e-12)


def test_gvr_probabilities_are_the_closed_form_of_the_worked_example():
    """docs/algorithms.md section 4's example: B = (1, 2, 1), norms [[2, 1], [1, 0], [4, 2]], m = 2."""
    pop = Population(np.array([[30, 10], [60, 0], [10, 90]]), np.array([1, 2, 1]), ("x", "y"))
    norms = np.array([[2.0, 1.0], [1.0, 0.0], [4.0, 2.0]])
    state = RoundState(0, pop, 2.0, np.ones(3, bool), signals=Signals(update_norm=norms))
    u, _ = processor_scores(state, norms)
    np.testing.assert_allclose(u, [[0.6, 0.1], [0.3, 0], [0.3, 0], [0.4, 1.8]])
    a = GVRAllocator({}, pop, 0).allocate(state, np.random.default_rng(0))
    np.testing.assert_allclose(a.probabilities, [[6 / 13, 1 / 13], [3 / 13, 0], [3 / 13, 0],
                                                 [2 / 11, 9 / 11]], atol=1e-12)


def test_stalevr_scores_use_the_residual_after_projection():
    state = RoundState(3, POP, 2.5, AVAILABLE, signals=signals())
    beta = StaleVRAggregator({}, POP).beta(state)
    hn = np.einsum("isk,isk->is", H, H)
    expect_beta = np.where(hn > 0, np.einsum("isk,isk->is", G, H) / np.where(hn > 0, hn, 1), 0)
    np.testing.assert_allclose(beta[POP.holds], expect_beta[POP.holds])
    state = RoundState(3, POP, 2.5, AVAILABLE, signals=signals(beta=beta))
    score = StaleVRAllocator({}, POP, 0).client_scores(state)
    resid = np.linalg.norm(G - beta[..., None] * H, axis=2)
    np.testing.assert_allclose(score[POP.holds], resid[POP.holds], atol=1e-9)


def test_stalevre_decay_schedule_worked_example():
    """b0 = 1. A pair active in round 0 (first time: r = 0) keeps beta 1; active again in round 4
    with beta* = 0.2 gives r = (1 - 0.2) / 4 = 0.2, so beta = 0.8, 0.6, ..., 0 from round 5."""
    pop = Population(np.array([[10]]), np.array([1]), ("a",))
    agg = StaleVREAggregator({"b0": 1.0}, pop)
    one = np.array([0])
    st0 = RoundState(0, pop, 1.0, np.ones(1, bool),
                     signals=Signals(stale_norm_sq=np.zeros((1, 1)), stale_dot=np.zeros((1, 1))))
    agg.observe(one, one, st0)
    assert agg.rate[0, 0] == 0 and agg.last[0, 0] == 0
    for t in (1, 2, 3, 4):
        assert agg.beta(RoundState(t, pop, 1.0, np.ones(1, bool)))[0, 0] == pytest.approx(1.0)
    st4 = RoundState(4, pop, 1.0, np.ones(1, bool),
                     signals=Signals(stale_norm_sq=np.array([[4.0]]), stale_dot=np.array([[0.8]])))
    agg.observe(one, one, st4)
    assert agg.rate[0, 0] == pytest.approx(0.2)
    betas = [agg.beta(RoundState(t, pop, 1.0, np.ones(1, bool)))[0, 0] for t in range(5, 11)]
    np.testing.assert_allclose(betas, [0.8, 0.6, 0.4, 0.2, 0.0, 0.0], atol=1e-12)


def test_stalevre_round_zero_is_full_participation():
    state = RoundState(0, POP, 2.0, AVAILABLE, signals=signals())
    a = StaleVREAllocator({}, POP, 0).allocate(state, np.random.default_rng(0))
    assert a.num_slots == int(state.eligible.sum()) and np.all(a.probability == 1)


def test_lvr_freshness_reuses_cached_losses():
    alloc = LVRAllocator({"freshness": 0.3}, POP, 5)
    s0 = RoundState(0, POP, 2.0, AVAILABLE)
    assert np.array_equal(alloc.probe_pairs(s0), s0.eligible)  # nothing known: probe all
    measured = RoundState(0, POP, 2.0, AVAILABLE, signals=signals())
    alloc.losses(measured)  # scoring is pure: still nothing known
    assert np.array_equal(alloc.probe_pairs(RoundState(1, POP, 2.0, AVAILABLE)), s0.eligible)
    none = np.zeros(0, np.int64)
    alloc.observe(none, none, measured)  # the runner keeps the round's losses after it
    frac = np.mean([alloc.probe_pairs(RoundState(t, POP, 2.0, AVAILABLE))[s0.eligible].mean()
                    for t in range(1, 400)])
    assert abs(frac - 0.3) < 0.03
    partial = np.where(s0.eligible, np.nan, np.nan)
    partial[0, 0] = 9.0
    loss = alloc.losses(RoundState(1, POP, 2.0, AVAILABLE, signals=Signals(local_loss=partial)))
    assert loss[0, 0] == 9.0 and loss[0, 1] == signals().local_loss[0, 1]


def test_fairvr_budgets_follow_alpha_fair_shares():
    alloc = FairVRAllocator({"alpha": 3.0}, POP, 0)
    state = RoundState(2, POP, 3.0, AVAILABLE, task_losses=np.array([1.0, 1.0, 2.0]), signals=signals())
    m = alloc.budgets(state)
    np.testing.assert_allclose(m, 3.0 * np.array([1, 1, 4]) / 6)
    a = alloc.allocate(state, np.random.default_rng(0))
    assert np.all(a.probabilities.sum(axis=0) <= m + 1e-9)


def test_stale_plan_with_zero_beta_is_the_unbiased_plan():
    from mmfl.core.aggregation import unbiased_plan

    state = RoundState(3, POP, 2.5, AVAILABLE, signals=signals())
    a = GVRAllocator({}, POP, 0).allocate(state, np.random.default_rng(3))
    p = stale_plan(a, POP, np.zeros((5, 3)), np.ones((5, 3), bool))
    u = unbiased_plan(a, POP)
    assert p.stale_client.size == 0
    np.testing.assert_array_equal(p.coefficient, u.coefficient)


def test_optimal_sampling_beats_uniform_variance():
    """Sanity: with GVR scores the estimator's total variance is below uniform sampling's."""
    from mmfl.core.allocators import RandomAllocator

    v = {}
    for name, alloc in (("gvr", GVRAllocator({}, POP, 0)), ("random", RandomAllocator({}, POP, 0))):
        est, _ = estimates(alloc, UnbiasedAggregator({}, POP), reps=20_000, seed=11)
        v[name] = est.var(axis=0).sum()
    assert v["gvr"] < v["random"], v
    assert optimal_probabilities is not None
