"""FedFairMMFL averaging aggregator (docs/algorithms.md section 7)."""

import numpy as np

from mmfl import registry
from mmfl.core.aggregation import AverageAggregator, average_plan
from mmfl.core.allocators import FairAllocator
from mmfl.types import Assignment, Population, RoundState

POP = Population(np.array([[30, 10, 0], [60, 0, 5], [10, 90, 0], [0, 20, 40]]),
                 np.array([1, 2, 1, 2]), ("a", "b", "c"))


def test_coefficients_sum_to_one_and_proportional_to_n():
    alloc = FairAllocator({}, POP, 0)
    agg = AverageAggregator({}, POP)
    rng = np.random.default_rng(0)
    seen = 0
    for t in range(300):
        state = RoundState(t, POP, 3.0, np.ones(4, bool), task_losses=np.array([1.0, 2.0, 3.0]))
        a = alloc.allocate(state, rng)
        plan = agg.plan(a, state)
        for s in np.unique(plan.task):
            sel = plan.task == s
            assert abs(plan.coefficient[sel].sum() - 1.0) < 1e-12
            n = POP.n_samples[plan.client[sel], s]
            np.testing.assert_allclose(plan.coefficient[sel], n / n.sum())
            seen += sel.sum() > 1
        assert set(np.unique(plan.task)) == set(np.unique(a.task))  # unassigned tasks untouched
    assert seen > 0  # some tasks had several clients


def test_duplicate_slots_count_once_and_hand_numbers():
    # client 1 has two processors both on task 0; client 0 on task 0 as well; client 3 on task 2
    a = Assignment(processor=[0, 1, 2, 5], client=[0, 1, 1, 3], task=[0, 0, 0, 2],
                   probability=[0.5] * 4, share=[1, 0.5, 0.5, 0.5], probabilities=np.zeros((6, 3)))
    plan = average_plan(a, POP)
    np.testing.assert_array_equal(plan.client, [0, 1, 3])
    np.testing.assert_array_equal(plan.task, [0, 0, 2])
    np.testing.assert_allclose(plan.coefficient, [30 / 90, 60 / 90, 1.0])


def test_registered():
    assert registry.get("aggregator", "average").obj is AverageAggregator
    assert registry.get("aggregator", "unbiased").options == {}
