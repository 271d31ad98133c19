"""Fairness statistics, rounds-to-target and cost accounting."""

import numpy as np
import pytest

from mmfl.core.allocators import RandomAllocator
from mmfl.core.metrics import (
    RoundCost,
    clients_per_task,
    fairness_stats,
    round_cost,
    rounds_to_target,
)
from mmfl.types import Assignment, Population, RoundState


def test_fairness_stats_by_hand():
    st = fairness_stats(np.array([0.5, 0.7, 0.9]))
    assert st["mean"] == pytest.approx(0.7)
    assert st["min"] == pytest.approx(0.5) and st["max"] == pytest.approx(0.9)
    assert st["max_min"] == pytest.approx(0.4)
    assert st["variance"] == pytest.approx((0.04 + 0 + 0.04) / 3)  # ddof = 0
    assert all(type(v) is float for v in st.values())


def test_fairness_stats_single_model():
    st = fairness_stats(np.array([0.8]))
    assert st == {"mean": 0.8, "min": 0.8, "max": 0.8, "max_min": 0.0, "variance": 0.0}


def test_rounds_to_target():
    acc = np.array([[0.1, 0.5, 0.0], [0.6, 0.4, 0.2], [0.7, np.nan, 0.3], [0.5, 0.9, 0.4]])
    rounds = np.array([0, 5, 10, 15])
    out = rounds_to_target(acc, rounds, 0.5)
    np.testing.assert_array_equal(out[:2], [5.0, 0.0])
    assert np.isnan(out[2])
    # unsorted rounds are scanned in ascending order
    out2 = rounds_to_target(acc[::-1], rounds[::-1], 0.5)
    np.testing.assert_array_equal(out2[:2], [5.0, 0.0])


def test_round_cost_counts_unique_pairs():
    a = Assignment(processor=[0, 1, 2, 3], client=[0, 1, 1, 2], task=[0, 1, 1, 0],
                   probability=[0.5] * 4, share=[1, 0.5, 0.5, 1], probabilities=np.zeros((4, 2)))
    c = round_cost(a)
    assert c == RoundCost(local_trainings=3, forward_passes=0, scalar_uploads=0, model_uploads=3)
    tot = c + RoundCost(1, 2, 3, 4)
    assert tot.as_dict() == {"declined": 0, "local_trainings": 4, "forward_passes": 2,
                             "scalar_uploads": 3,
                             "model_uploads": 7}
    np.testing.assert_array_equal(clients_per_task(a, 3), [2, 1, 0])


def test_round_cost_of_sampler_matches_pairs():
    pop = Population(np.ones((5, 2), int), np.array([2, 2, 1, 1, 3]), ("a", "b"))
    a = RandomAllocator({}, pop, 0).allocate(RoundState(0, pop, 6.0, np.ones(5, bool)),
                                             np.random.default_rng(3))
    assert round_cost(a).model_uploads == len(set(zip(a.client.tolist(), a.task.tolist())))
