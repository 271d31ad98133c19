"""Hypothesis property tests of every sampler over random populations (docs/algorithms.md s. 1, 7)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfl.core.aggregation import average_plan, unbiased_plan
from mmfl.core.allocators import (
    FairAllocator,
    FullAllocator,
    RandomAllocator,
    RoundRobinAllocator,
    round_robin_schedule,
)
from mmfl.types import Population, RoundState


@st.composite
def rounds(draw, integer_budget=False):
    n = draw(st.integers(1, 12))
    s = draw(st.integers(1, 4))
    cap = np.array(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    holds = np.array(draw(st.lists(st.lists(st.booleans(), min_size=s, max_size=s),
                                   min_size=n, max_size=n)), bool).reshape(n, s)
    first = np.array(draw(st.lists(st.integers(0, s - 1), min_size=n, max_size=n)))
    holds[np.arange(n), first] = True  # every client holds >= 1 task
    sizes = np.array(draw(st.lists(st.integers(1, 500), min_size=n * s, max_size=n * s)))
    pop = Population(holds * sizes.reshape(n, s), cap, tuple(f"t{k}" for k in range(s)))
    avail = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
    p = pop.num_processors
    if integer_budget:
        m = float(draw(st.integers(1, p)))
    else:
        m = draw(st.floats(0.0, 1.0, exclude_min=True)) * p
    losses = draw(st.one_of(
        st.none(),
        st.lists(st.one_of(st.floats(0, 100), st.just(np.inf), st.just(np.nan)),
                 min_size=s, max_size=s).map(np.array)))
    t = draw(st.integers(0, 20))
    return RoundState(t, pop, m, avail, task_losses=losses)


def _copy(state):
    return (state.population.n_samples.copy(), state.available.copy(),
            None if state.task_losses is None else state.task_losses.copy())


def check_common(state, a, processor_level=True):
    pop = state.population
    mat = a.probabilities
    assert np.isfinite(mat).all() and np.isfinite(a.probability).all()
    assert (mat >= 0).all() and (mat <= 1).all()
    elig = state.eligible
    if processor_level:
        assert mat.shape == (pop.num_processors, pop.num_tasks)
        assert (mat.sum(axis=1) <= 1 + 1e-12).all()
        assert (mat[~elig[pop.processor_client]] == 0).all()
        eligible_cap = int(pop.capacity[elig.any(axis=1)].sum())
        total = min(state.budget, eligible_cap)
        assert abs(mat.sum() - total) <= 1e-9 * max(1.0, total)
        assert abs(a.expected_slots - total) <= 1e-9 * max(1.0, total)
        if state.budget > eligible_cap + 1e-9:
            assert a.note
        # slots: one per processor, owned by an eligible client that holds the task
        assert len(np.unique(a.processor)) == a.num_slots
        np.testing.assert_array_equal(a.client, pop.processor_client[a.processor])
        np.testing.assert_allclose(a.share, 1.0 / pop.capacity[a.client])
        assert (mat[a.processor, a.task] > 0).all()
    assert elig[a.client, a.task].all()
    assert ((a.probability > 0) & (a.probability <= 1)).all()
    # both aggregators produce finite plans; average sums to 1 per task
    up = unbiased_plan(a, pop)
    assert np.isfinite(up.coefficient).all() and (up.coefficient > 0).all()
    av = average_plan(a, pop)
    for s in np.unique(av.task):
        assert abs(av.coefficient[av.task == s].sum() - 1) < 1e-9


SETTINGS = settings(max_examples=150, deadline=None)


@SETTINGS
@given(rounds(), st.integers(0, 2**32 - 1))
def test_random_properties(state, seed):
    before = _copy(state)
    a = RandomAllocator({}, state.population, 0).allocate(state, np.random.default_rng(seed))
    check_common(state, a)
    np.testing.assert_allclose(a.probability, a.probabilities[a.processor, a.task])
    assert all(np.array_equal(x, y) for x, y in zip(before[:2], _copy(state)[:2]))


@SETTINGS
@given(rounds(integer_budget=True), st.integers(0, 2**32 - 1))
def test_random_fixed_properties(state, seed):
    a = RandomAllocator({"draw": "fixed"}, state.population, 0).allocate(
        state, np.random.default_rng(seed))
    check_common(state, a)
    np.testing.assert_allclose(a.probability, a.probabilities[a.processor, a.task])
    eligible_cap = int(state.population.capacity[state.eligible.any(axis=1)].sum())
    assert a.num_slots == min(int(state.budget), eligible_cap)


@SETTINGS
@given(rounds(), st.integers(0, 2**32 - 1), st.floats(0, 20))
def test_fedfair_properties(state, seed, alpha):
    for opts in ({"alpha": alpha}, {"alpha": alpha, "weights": "data"}):
        a = FairAllocator(opts, state.population, 0).allocate(state, np.random.default_rng(seed))
        check_common(state, a)
        np.testing.assert_allclose(a.probability, a.probabilities[a.processor, a.task])


@SETTINGS
@given(rounds(), st.integers(0, 2**32 - 1))
def test_round_robin_properties(state, seed):
    pop = state.population
    a = RoundRobinAllocator({}, pop, 0).allocate(state, np.random.default_rng(seed))
    check_common(state, a)
    sched = round_robin_schedule(pop, state.round)
    np.testing.assert_array_equal(a.task, sched[a.processor])
    q = a.probabilities.sum(axis=1)
    # matrix: q_b at the scheduled model; slot probability: q_b * long-run frequency <= q_b
    np.testing.assert_allclose(a.probabilities[a.processor, a.task], q[a.processor])
    assert (a.probability <= q[a.processor] + 1e-12).all()
    # while B_i <= |S_i| a client's processors train distinct models
    for i in np.unique(a.client):
        if pop.capacity[i] <= pop.holds[i].sum():
            tasks = a.task[a.client == i]
            assert len(np.unique(tasks)) == tasks.size


@SETTINGS
@given(rounds(), st.integers(0, 2**32 - 1))
def test_full_properties(state, seed):
    pop = state.population
    a = FullAllocator({}, pop, 0).allocate(state, np.random.default_rng(seed))
    check_common(state, a, processor_level=False)
    np.testing.assert_array_equal(a.probabilities, state.eligible.astype(float))
    assert a.num_slots == int(state.eligible.sum())
    assert (a.processor == -1).all() and (a.probability == 1).all()
    plan = unbiased_plan(a, pop)
    np.testing.assert_allclose(plan.coefficient, pop.data_weight[plan.client, plan.task])
