"""Monte-Carlo unbiasedness of sampler x aggregator pairs (docs/algorithms.md sections 3 and 7).

Fake updates G_{i,s} (small fixed vectors per pair) stand in for local training; the estimate of
round r for task s is sum_k coefficient_k G_{client_k, s}. Its mean over >= 20,000 draws must be
within 4 standard errors (per coordinate) of sum over AVAILABLE clients of d_{i,s} G_{i,s}.
"""

import numpy as np
import pytest

from testkit import assert_mean_within
from mmfl.core.aggregation import UnbiasedAggregator, apply_plan, unbiased_plan
from mmfl.core.allocators import FullAllocator, RandomAllocator, RoundRobinAllocator
from mmfl.types import Population, RoundState

# 4 clients, 3 tasks, mixed processors B = (1, 2, 1, 2); partial holdings; client 3 offline.
N_SAMPLES = np.array([[30, 10, 0], [60, 0, 5], [10, 90, 0], [0, 20, 40]])
CAPACITY = np.array([1, 2, 1, 2])
POP = Population(N_SAMPLES, CAPACITY, ("a", "b", "c"))
AVAILABLE = np.array([True, True, True, False])
DIM = 2
G = np.random.default_rng(2024).normal(size=(4, 3, DIM)) + 1.0  # G[i, s]


def estimates(allocator, budget, reps, seed=0, rounds=None):
    """(reps, S, DIM) estimates sum_k coef_k G[client_k, s]."""
    rng = np.random.default_rng(seed)
    agg = UnbiasedAggregator({}, POP)
    out = np.zeros((reps, POP.num_tasks, DIM))
    for r in range(reps):
        t = 0 if rounds is None else r % rounds
        state = RoundState(t, POP, budget, AVAILABLE)
        plan = agg.plan(allocator.allocate(state, rng), state)
        np.add.at(out[r], plan.task, plan.coefficient[:, None] * G[plan.client, plan.task])
    return out


def full_update(available=AVAILABLE):
    d = POP.data_weight * available[:, None]
    return np.einsum("is,isk->sk", d, G)


@pytest.mark.parametrize("budget", [2.0, 2.5, 1.0])
def test_random_independent_unbiased(budget):
    alloc = RandomAllocator({"draw": "independent", "probability": "true"}, POP, 0)
    est = estimates(alloc, budget, 20_000, seed=int(budget * 10))
    target = full_update()
    assert_mean_within(est, target)
    # the offline client's data is really excluded: the all-client update differs
    assert not np.allclose(target, full_update(np.ones(4, bool)))


def test_random_fixed_unbiased():
    alloc = RandomAllocator({"draw": "fixed", "probability": "true"}, POP, 0)
    est = estimates(alloc, 2.0, 20_000, seed=3)
    assert_mean_within(est, full_update())


def test_random_fixed_draws_exactly_m_processors():
    alloc = RandomAllocator({"draw": "fixed"}, POP, 0)
    rng = np.random.default_rng(0)
    state = RoundState(0, POP, 3.0, AVAILABLE)
    for _ in range(200):
        a = alloc.allocate(state, rng)
        assert a.num_slots == 3 and len(set(a.processor.tolist())) == 3
        assert AVAILABLE[a.client].all()


def test_random_fixed_rejects_fractional_budget():
    alloc = RandomAllocator({"draw": "fixed"}, POP, 0)
    with pytest.raises(ValueError, match="integer"):
        alloc.allocate(RoundState(0, POP, 2.5, AVAILABLE), np.random.default_rng(0))


def test_full_exact():
    alloc = FullAllocator({}, POP, 0)
    est = estimates(alloc, 1.0, 3)
    for e in est:
        np.testing.assert_allclose(e, full_update(), rtol=1e-12, atol=1e-12)
    a = alloc.allocate(RoundState(0, POP, 1.0, AVAILABLE), np.random.default_rng(0))
    plan = unbiased_plan(a, POP)
    np.testing.assert_allclose(plan.coefficient, POP.data_weight[plan.client, plan.task])
    assert (a.processor == -1).all() and (a.probability == 1).all() and (a.share == 1).all()


def test_authors_probability_is_biased_when_clients_hold_one_task():
    # 6 single-processor clients, each holding exactly one of 3 tasks; all online; m = 3.
    n = np.zeros((6, 3), int)
    n[np.arange(6), np.arange(6) % 3] = [10, 20, 30, 40, 50, 60]
    pop = Population(n, np.ones(6, int), ("a", "b", "c"))
    g = np.random.default_rng(1).normal(size=(6, 3)) + 2.0
    target = (pop.data_weight * g).sum(axis=0)
    res = {}
    for mode in ("true", "authors"):
        alloc = RandomAllocator({"probability": mode}, pop, 0)
        agg = UnbiasedAggregator({}, pop)
        rng = np.random.default_rng(11)
        est = np.zeros((20_000, 3))
        state = RoundState(0, pop, 3.0, np.ones(6, bool))
        for r in range(est.shape[0]):
            plan = agg.plan(alloc.allocate(state, rng), state)
            np.add.at(est[r], plan.task, plan.coefficient * g[plan.client, plan.task])
        res[mode] = est
    assert_mean_within(res["true"], target)
    mean = res["authors"].mean(axis=0)
    se = res["authors"].std(axis=0, ddof=1) / np.sqrt(20_000)
    assert np.all(np.abs(mean - target) > 20 * se)  # clearly biased ...
    np.testing.assert_allclose(mean, 3 * target, rtol=0.05)  # ... by the factor S = 3


def test_authors_probability_value():
    pop = Population(np.ones((4, 2), int), np.ones(4, int), ("a", "b"))
    a = RandomAllocator({"probability": "authors"}, pop, 0).allocate(
        RoundState(0, pop, 4.0, np.ones(4, bool)), np.random.default_rng(0))
    np.testing.assert_allclose(a.probability, 0.5)  # C = m/P = 1, C/S = 1/2 (= true here)
    assert "authors" in a.note


def test_round_robin_unbiased_over_a_period():
    # Client 0 holds tasks {0, 1} of 3 (unevenly spaced): its long-run frequencies are 2/3, 1/3.
    alloc = RoundRobinAllocator({}, POP, 0)
    est = estimates(alloc, 2.0, 30_000, seed=9, rounds=3)
    assert_mean_within(est, full_update())


def test_apply_plan_reference():
    a = FullAllocator({}, POP, 0).allocate(RoundState(0, POP, 1.0, AVAILABLE),
                                          np.random.default_rng(0))
    plan = unbiased_plan(a, POP)
    params = [np.zeros(DIM) for _ in range(3)]
    updates = {(i, s): G[i, s] for i in range(4) for s in range(3)}
    new = apply_plan(params, updates, plan)
    np.testing.assert_allclose(np.stack(new), -full_update())
    assert all((p == 0).all() for p in params)  # inputs untouched


def test_unbiased_plan_hand_numbers():
    # processors b1, b2 of client 1 both draw task 0 with p = 0.5: d=0.6, share 1/2 each
    # -> 0.6 * 0.5 / 0.5 * 2 = 1.2 ; client 2 (b3) task 0 with p = 0.25: 0.1 / 0.25 = 0.4.
    from mmfl.types import Assignment

    pop = Population(np.array([[30, 10], [60, 0], [10, 90]]), np.array([1, 2, 1]), ("a", "b"))
    a = Assignment(processor=[3, 1, 2], client=[2, 1, 1], task=[0, 0, 0],
                   probability=[0.25, 0.5, 0.5], share=[1, 0.5, 0.5],
                   probabilities=np.zeros((4, 2)))
    plan = unbiased_plan(a, pop)
    np.testing.assert_array_equal(plan.client, [1, 2])
    np.testing.assert_array_equal(plan.task, [0, 0])
    np.testing.assert_allclose(plan.coefficient, [1.2, 0.4])
