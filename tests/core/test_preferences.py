"""Clients' task preferences (docs/algorithms.md section 3.3): the willingness draw, refusals as
ineligible pairs (every sampler, hypothesis), declines, and Monte-Carlo checks that the
preference-aware aggregate is unbiased over the willing clients while the unaware one carries
the hand-computed bias -sum_i (1 - w_{i,s}) d_{i,s} G_{i,s}."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testkit import assert_frequency_within, assert_mean_within
from mmfl import registry
from mmfl.core.aggregation import unbiased_plan
from mmfl.core.allocators import FullAllocator, RandomAllocator
from mmfl.core.preferences import (decline, draw_willingness, effective_assignment,
                                   restrict_population, willingness_bias)
from mmfl.types import Assignment, Population, RoundState, Signals

# -- the willingness draw -------------------------------------------------------------------


def test_draw_willingness_frequencies_and_determinism():
    levels = ((0.0, 0.1), (0.5, 0.2), (1.0, 0.7))
    w = draw_willingness(levels, (400, 50), np.random.default_rng(1))
    counts = [(w == v).sum() for v, _ in levels]
    assert sum(counts) == w.size  # only the listed values
    assert_frequency_within(counts, w.size, [p for _, p in levels])
    again = draw_willingness(levels, (400, 50), np.random.default_rng(1))
    np.testing.assert_array_equal(w, again)


def test_draw_willingness_single_level_and_rounding():
    assert (draw_willingness(((0.3, 1.0),), (5, 2), np.random.default_rng(0)) == 0.3).all()
    # probabilities summing to 1 - 1e-9 leave no gap at the top of the CDF
    w = draw_willingness(((0.0, 0.5), (1.0, 0.5 - 1e-9)), (1000, 3), np.random.default_rng(2))
    assert set(np.unique(w)) <= {0.0, 1.0}


# -- refusals: the restricted population ----------------------------------------------------


def test_restrict_population_renormalises_d_over_the_willing():
    """Hand-worked: task 0 held by clients 0, 1, 2 with n = 30, 60, 10; client 1 refuses it.
    d' = (30, 0, 10) / 40 = (0.75, 0, 0.25); task 1 unchanged (nobody refuses it)."""
    pop = Population(np.array([[30, 10], [60, 0], [10, 90]]), np.array([1, 2, 1]), ("a", "b"))
    w = np.array([[1.0, 0.5], [0.0, 1.0], [0.2, 1.0]])
    r = restrict_population(pop, w)
    np.testing.assert_allclose(r.data_weight[:, 0], [0.75, 0.0, 0.25])
    np.testing.assert_allclose(r.data_weight[:, 1], [0.1, 0.0, 0.9])
    assert not r.holds[1, 0] and r.holds[0, 0] and r.holds[2, 0]
    np.testing.assert_array_equal(r.capacity, pop.capacity)
    assert restrict_population(pop, np.ones((3, 2))) is pop  # nothing refused: unchanged


def _held_classes(pop, rng):
    """Per task an (N, 4) class matrix consistent with the holdings (group samplers)."""
    out = []
    for s in range(pop.num_tasks):
        h = rng.random((pop.num_clients, 4)) < 0.5
        h[:, 0] |= True
        out.append(h & pop.holds[:, s][:, None])
    return out


def _signals(n, s, rng):
    return Signals(local_loss=rng.random((n, s)) + 0.1, update_norm=rng.random((n, s)) + 0.1,
                   stale_dot=rng.random((n, s)), stale_norm_sq=rng.random((n, s)) + 0.1,
                   beta=rng.random((n, s)), probe_norm_sq=rng.random((n, s)) + 0.1,
                   probe_dot=rng.random((n, s)), update_distance=rng.random((n, n)))


@st.composite
def preference_rounds(draw):
    n = draw(st.integers(1, 10))
    s = draw(st.integers(2, 4))  # group_pipeline's default 2 groups need 2 tasks
    cap = np.array(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    sizes = np.array(draw(st.lists(st.integers(0, 300), min_size=n * s, max_size=n * s)))
    sizes = sizes.reshape(n, s)
    sizes[np.arange(n), np.arange(n) % s] += 1  # every client holds at least one task
    w = np.array(draw(st.lists(st.sampled_from([0.0, 0.0, 0.3, 0.7, 1.0]),
                               min_size=n * s, max_size=n * s))).reshape(n, s)
    avail = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    pop = Population(sizes, cap, tuple(f"t{k}" for k in range(s)))
    m = draw(st.floats(0.05, 1.0)) * pop.num_processors
    return pop, w, avail, m, draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("name", registry.names("sampler"))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=preference_rounds())
def test_refusals_are_never_assigned(name, case):
    """Every sampler, over random populations and preference matrices: no slot of a refused
    pair (w = 0) in any of three rounds, and the aware assignment's probabilities are p w."""
    pop, w, avail, m, seed = case
    restricted = restrict_population(pop, w)
    rng = np.random.default_rng(seed)
    alloc = registry.get("sampler", name).obj({}, restricted, 0)
    if alloc.needs_held_classes:
        alloc.set_held_classes(_held_classes(restricted, rng))
    refused = (w <= 0) & pop.holds
    for t in range(3):
        state = RoundState(t, restricted, m, avail, np.ones(pop.num_tasks),
                           np.full(pop.num_tasks, 0.5),
                           signals=_signals(pop.num_clients, pop.num_tasks, rng))
        a = alloc.allocate(state, rng)
        assert not refused[a.client, a.task].any(), (name, t)
        if a.num_slots:
            eff = effective_assignment(a, w, restricted)
            np.testing.assert_allclose(eff.probability, a.probability * w[a.client, a.task])
            assert eff.expected_slots <= a.probabilities.sum() + 1e-9


# -- declines -----------------------------------------------------------------------------------


def _assignment(client, task, prob, share=None, matrix_rows=3, tasks=2):
    k = len(client)
    return Assignment(np.arange(k), client, task, prob, np.ones(k) if share is None else share,
                      np.zeros((matrix_rows, tasks)))


def test_decline_frequencies_and_slots_of_a_pair_go_together():
    """Client 0 has two slots of task 0 (one pair), client 1 one slot of task 1. w = 0.25 and
    0.6: the pair (0, 0) declines with probability 0.75 and then both its slots go."""
    w = np.array([[0.25, 1.0], [1.0, 0.6]])
    a = _assignment([0, 0, 1], [0, 0, 1], [0.5, 0.5, 0.5])
    rng = np.random.default_rng(5)
    reps = 20_000
    counts = np.zeros(2)
    for _ in range(reps):
        kept, gone = decline(a, w, rng)
        assert gone[0] == gone[1]  # the pair's slots go together
        assert kept.num_slots == 3 - gone.sum()
        counts += [gone[0], gone[2]]
    assert_frequency_within(counts, reps, [0.75, 0.4])


def test_decline_willing_pairs_never_decline_and_note():
    w = np.array([[1.0, 1.0], [1.0, 0.0]])
    a = _assignment([0, 1], [1, 1], [0.5, 0.5])
    kept, gone = decline(a, w, np.random.default_rng(0))
    np.testing.assert_array_equal(gone, [False, True])
    assert kept.num_slots == 1 and kept.client.tolist() == [0]
    assert "1 slot(s) declined" in kept.note
    same, none = decline(_assignment([0], [0], [0.5]), w, np.random.default_rng(0))
    assert not none.any() and same.num_slots == 1


def test_effective_assignment_rejects_refused_slots():
    pop = Population(np.array([[1, 1], [1, 1], [1, 1]]), np.ones(3, int), ("a", "b"))
    a = _assignment([0], [1], [0.5])
    with pytest.raises(ValueError, match="refused"):
        effective_assignment(a, np.array([[1.0, 0.0], [1, 1], [1, 1]]), pop)


# -- Monte-Carlo: aware is unbiased, unaware carries the computed bias ----------------------

# 4 clients, 3 tasks, B = (1, 2, 1, 2), partial holdings; client 3 refuses task 2, the others
# have soft preferences.
N_SAMPLES = np.array([[30, 10, 0], [60, 0, 5], [10, 90, 0], [0, 20, 40]])
CAPACITY = np.array([1, 2, 1, 2])
W = np.array([[1.0, 0.5, 1.0], [0.4, 1.0, 0.8], [0.7, 0.3, 1.0], [1.0, 0.9, 0.0]])
POP = restrict_population(Population(N_SAMPLES, CAPACITY, ("a", "b", "c")), W)
DIM = 2
G = np.random.default_rng(2024).normal(size=(4, 3, DIM)) + 1.0


def _estimates(allocator, reps, seed):
    """(2, reps, S, DIM): sum_k coefficient_k G[client_k, task_k] after the declines, for the
    unaware (slot probability p) and the aware (p w) estimator of the same allocations (each
    with its own declines)."""
    rng = np.random.default_rng(seed)
    losses = np.random.default_rng(7).uniform(0.5, 2.0, size=(4, 3))  # LVR's scores
    state = RoundState(0, POP, 2.5, np.ones(4, bool), signals=Signals(local_loss=losses))
    out = np.zeros((2, reps, POP.num_tasks, DIM))
    for r in range(reps):
        a = allocator.allocate(state, rng)
        for k, x in enumerate((a, effective_assignment(a, W, POP))):
            plan = unbiased_plan(decline(x, W, rng)[0], POP)
            np.add.at(out[k, r], plan.task, plan.coefficient[:, None] * G[plan.client, plan.task])
    return out


def _full_update():
    """sum_i d'_{i,s} G_{i,s} over the willing holders (d' of the restricted population)."""
    return np.einsum("is,isk->sk", POP.data_weight, G)


@pytest.mark.parametrize("allocator", [RandomAllocator({}, POP, 0), FullAllocator({}, POP, 0),
                                       registry.get("sampler", "lvr").obj({}, POP, 0)],
                         ids=["random", "full", "lvr"])
def test_aware_is_unbiased_and_unaware_has_the_computed_bias(allocator):
    unaware, aware = _estimates(allocator, 20_000, seed=11)
    assert_mean_within(aware, _full_update())
    bias = willingness_bias(W, POP.data_weight, G)
    assert np.abs(bias).max() > 0.05  # a bias the test can see
    assert_mean_within(unaware, _full_update() + bias)
    # and the unbiased target is rejected for the unaware one: the check can see the bias
    se = unaware.std(axis=0, ddof=1) / np.sqrt(unaware.shape[0])
    assert (np.abs(unaware.mean(axis=0) - _full_update()) > 4 * se).any()


def test_hand_worked_bias():
    """One task, clients with d = (0.25, 0.75), w = (1, 0.5), scalar updates G = (4, 2).
    Full update 0.25 * 4 + 0.75 * 2 = 2.5; unaware expectation 0.25 * 4 + 0.5 * 0.75 * 2 =
    1.75, a bias of -(1 - 0.5) * 0.75 * 2 = -0.75."""
    bias = willingness_bias(np.array([[1.0], [0.5]]), np.array([[0.25], [0.75]]),
                            np.array([[[4.0]], [[2.0]]]))
    np.testing.assert_allclose(bias, [[-0.75]])
    pop = Population(np.array([[25], [75]]), np.ones(2, int), ("a",))
    w = np.array([[1.0], [0.5]])
    rng = np.random.default_rng(3)
    alloc = FullAllocator({}, pop, 0)
    state = RoundState(0, pop, 2.0, np.ones(2, bool))
    g = np.array([4.0, 2.0])
    unaware, aware = [], []
    for _ in range(20_000):
        a = alloc.allocate(state, rng)
        for est, x in ((unaware, a), (aware, effective_assignment(a, w, pop))):
            plan = unbiased_plan(decline(x, w, rng)[0], pop)
            est.append([float(plan.coefficient @ g[plan.client])])
    assert_mean_within(np.array(unaware), np.array([1.75]))
    assert_mean_within(np.array(aware), np.array([2.5]))
