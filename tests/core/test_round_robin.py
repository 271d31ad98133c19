"""Round-robin model rotation (docs/algorithms.md section 7)."""

import numpy as np

from mmfl.core.allocators import RoundRobinAllocator, round_robin_schedule
from mmfl.types import Population, RoundState


def test_worked_example_n4_s2():
    # starts floor(i*S/N) = 0, 0, 1, 1; then advance by one per round (mod 2)
    pop = Population(np.ones((4, 2), int), np.ones(4, int), ("a", "b"))
    got = [round_robin_schedule(pop, t).tolist() for t in range(3)]
    assert got == [[0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]]


def test_single_held_task_always_trained():
    n = np.array([[1, 1], [0, 5], [1, 1], [3, 0]])
    pop = Population(n, np.ones(4, int), ("a", "b"))
    for t in range(6):
        sched = round_robin_schedule(pop, t)
        assert sched[1] == 1 and sched[3] == 0


def test_skips_to_next_held_and_processors_take_distinct_models():
    # S = 4, N = 2; client 0 holds {1, 3} with 3 processors (wraps), client 1 holds all with 2.
    n = np.array([[0, 1, 0, 1], [1, 1, 1, 1]])
    pop = Population(n, np.array([3, 2]), tuple("abcd"))
    # client 0 start 0 -> next held 1; processors: 1, 3, 1 (wrap)
    # client 1 start floor(1*4/2) = 2; processors: 2, 3
    assert round_robin_schedule(pop, 0).tolist() == [1, 3, 1, 2, 3]
    # round 3: client 0 index 3 -> 3, 1, 3 ; client 1 index (2+3)%4 = 1 -> 1, 2
    assert round_robin_schedule(pop, 3).tolist() == [3, 1, 3, 1, 2]


def test_allocate_follows_schedule_and_probabilities():
    n = np.array([[0, 1, 0, 1], [1, 1, 1, 1], [2, 0, 0, 0]])
    pop = Population(n, np.array([3, 2, 1]), tuple("abcd"))
    alloc = RoundRobinAllocator({}, pop, 0)
    avail = np.array([True, True, False])
    rng = np.random.default_rng(0)
    for t in range(8):
        state = RoundState(t, pop, 2.0, avail)
        a = alloc.allocate(state, rng)
        sched = round_robin_schedule(pop, t)
        np.testing.assert_array_equal(a.task, sched[a.processor])
        assert (a.client != 2).all()
        q = 2.0 / 5
        expect = np.zeros((6, 4))
        expect[np.arange(5), sched[:5]] = q
        np.testing.assert_allclose(a.probabilities, expect)
        # long-run frequency: client 0 (holds 1, 3 evenly spaced) -> 1/2; client 1 -> 1/4
        freq = np.where(a.client == 0, 0.5, 0.25)
        np.testing.assert_allclose(a.probability, q * freq)


def test_round_robin_fixed_draw_exact_count():
    pop = Population(np.ones((5, 3), int), np.array([1, 2, 1, 1, 3]), ("a", "b", "c"))
    alloc = RoundRobinAllocator({"draw": "fixed"}, pop, 0)
    rng = np.random.default_rng(1)
    for t in range(20):
        a = alloc.allocate(RoundState(t, pop, 4.0, np.ones(5, bool)), rng)
        assert a.num_slots == 4
        np.testing.assert_array_equal(a.task, round_robin_schedule(pop, t)[a.processor])
