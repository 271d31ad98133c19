"""The authors' estimator choices (``variant = "authors"``), each against the paper's version.

random's d S / C weights (Monte-Carlo: E[coefficient] = B_i d (S / |S_i|)), GVR's aggregation
index bug (a hand-worked example), StaleVRE's round 0, scores and budget walk, and the
variant switch that selects them (docs/reproduction.md).
"""

import numpy as np
import pytest

from testkit import assert_mean_within
from mmfl import registry
from mmfl.core.aggregation import unbiased_plan
from mmfl.core.allocators import RandomAllocator
from mmfl.core.variance_reduced import (GVRAllocator, StaleVREAllocator, authors_index_share)
from mmfl.types import Assignment, Population, RoundState, Signals

# 4 clients, 3 tasks, B = (1, 2, 1, 3); clients hold 3, 2, 1 and 3 tasks
N_SAMPLES = np.array([[30, 10, 20], [60, 0, 5], [0, 90, 0], [10, 20, 40]])
CAPACITY = np.array([1, 2, 1, 3])
POP = Population(N_SAMPLES, CAPACITY, ("a", "b", "c"))


def test_random_authors_coefficient_expectation_is_B_d_S_over_held():
    """E[coefficient_{i,s}] = B_i d_{i,s} (S / |S_i|) (m / P) / C = B_i d_{i,s} S / |S_i|."""
    m = 3.0
    alloc = RandomAllocator({"draw": "fixed", "probability": "authors"}, POP, 0)
    rng = np.random.default_rng(5)
    reps = 40_000
    coef = np.zeros((reps, *N_SAMPLES.shape))
    state = RoundState(0, POP, m, np.ones(4, bool))
    for r in range(reps):
        a = alloc.allocate(state, rng)
        assert (a.share == 1).all()  # no 1/B_i share, as in the authors' main.py
        plan = unbiased_plan(a, POP)
        coef[r, plan.client, plan.task] = plan.coefficient
    held = POP.holds.sum(axis=1)
    expect = CAPACITY[:, None] * POP.data_weight * (POP.num_tasks / held)[:, None]
    assert_mean_within(coef, expect)
    mean = coef.mean(axis=0)
    # ... which is not the unbiased d: biased towards multi-processor clients
    assert mean[3, 2] > 2 * POP.data_weight[3, 2]


def test_random_authors_slot_weight():
    a = RandomAllocator({"draw": "fixed", "probability": "authors"}, POP, 0).allocate(
        RoundState(0, POP, 3.0, np.ones(4, bool)), np.random.default_rng(0))
    plan = unbiased_plan(a, POP)
    c = 3.0 / POP.num_processors
    # coefficient per slot d S / C (a pair drawn by two processors counts twice)
    per_slot = POP.data_weight[a.client, a.task] * POP.num_tasks / c
    total = np.zeros(N_SAMPLES.shape)
    np.add.at(total, (a.client, a.task), per_slot)
    np.testing.assert_allclose(plan.coefficient, total[plan.client, plan.task])
    assert a.num_slots == 3  # exactly m processors


def test_gvr_index_bug_hand_worked():
    # slots in processor order: (client 0, task 0), (1, 2), (3, 0), (3, 1), (3, 2)
    a = Assignment(processor=np.array([0, 2, 4, 5, 6]), client=np.array([0, 1, 3, 3, 3]),
                   task=np.array([0, 2, 0, 1, 2]), probability=np.full(5, 0.5),
                   share=1.0 / CAPACITY[[0, 1, 3, 3, 3]], probabilities=np.zeros((7, 3)))
    share = authors_index_share(a, POP.data_weight)
    d = POP.data_weight
    # overall client list c = (0, 1, 3, 3, 3). task 0's slots (client 0, client 3) use c_0 = 0
    # and c_1 = 1; task 1's slot (client 3) uses c_0 = 0; task 2's (client 1, client 3) use
    # c_0 = 0 and c_1 = 1
    want = np.array([d[0, 0] / d[0, 0], d[0, 2] / d[1, 2], d[1, 0] / d[3, 0], d[0, 1] / d[3, 1],
                     d[1, 2] / d[3, 2]]) * a.share
    np.testing.assert_allclose(share, want)
    # the aggregated weight is then d[c_k] share / (B_i p): (3, 0) gets d[1, 0] / (3 * 0.5)
    plan = unbiased_plan(Assignment(a.processor, a.client, a.task, a.probability, share,
                                    a.probabilities), POP)
    k = np.flatnonzero((plan.client == 3) & (plan.task == 0))[0]
    assert plan.coefficient[k] == pytest.approx(0.6 / 1.5)
    # a c_k that does not hold the model contributes 0: slots (2, 1), (3, 0) -> c = (2, 3),
    # task 0's slot uses d[2, 0] = 0
    b = Assignment(processor=np.array([3, 4]), client=np.array([2, 3]), task=np.array([1, 0]),
                   probability=np.full(2, 0.5), share=np.array([1.0, 1 / 3]),
                   probabilities=np.zeros((7, 3)))
    np.testing.assert_allclose(authors_index_share(b, d), [1.0, 0.0])


def test_gvr_index_bug_only_with_authors_option():
    norm = np.where(POP.holds, 1.0 + np.arange(12).reshape(4, 3), np.nan)
    state = RoundState(0, POP, 3.0, np.ones(4, bool), signals=Signals(update_norm=norm))
    paper = GVRAllocator({}, POP, 0).allocate(state, np.random.default_rng(3))
    np.testing.assert_allclose(paper.share, 1.0 / CAPACITY[paper.client])
    authors = GVRAllocator({"d_index": "authors"}, POP, 0).allocate(state, np.random.default_rng(3))
    np.testing.assert_array_equal(authors.client, paper.client)  # same draw
    np.testing.assert_allclose(authors.share, authors_index_share(paper, POP.data_weight))


def _stalevre(**opts):
    return StaleVREAllocator({"b0": 1.0, **opts}, POP, 0)


def test_stalevre_random_init_is_the_authors_random_round():
    alloc = _stalevre(init="random")
    a = alloc.allocate(RoundState(0, POP, 3.0, np.ones(4, bool)), np.random.default_rng(1))
    assert a.num_slots == 3 and (a.share == 1).all()
    np.testing.assert_allclose(a.probability, (3.0 / POP.num_processors) / POP.num_tasks)
    assert "updates" in alloc.requires_at(1)  # one full computation before round 1 ...
    assert "updates" not in alloc.requires_at(0) and "updates" not in alloc.requires_at(2)
    assert _stalevre().requires_at(1) == frozenset({"stale"})  # ... only with init = authors


def test_stalevre_last_scores_and_budget_walk():
    alloc = _stalevre(init="random", score="last", budget="walk")
    assert alloc.observes
    norm = np.where(POP.holds, [[1.0, 2, 3], [4, 0, 5], [0, 6, 0], [7, 8, 9]], np.nan)
    beta = np.ones(N_SAMPLES.shape)
    zeros = np.zeros(N_SAMPLES.shape)
    rng = np.random.default_rng(2)
    a0 = alloc.allocate(RoundState(0, POP, 3.0, np.ones(4, bool)), rng)
    # round 1: scores = the full computation's norms
    sig = Signals(update_norm=norm, stale_norm_sq=zeros, stale_dot=zeros, beta=beta)
    s1 = RoundState(1, POP, 3.0, np.ones(4, bool), signals=sig)
    np.testing.assert_allclose(alloc.client_scores(s1), np.nan_to_num(norm))
    a1 = alloc.allocate(s1, rng)
    # observe: the server's ||G - beta h|| / eta of the aggregated pairs replaces their score
    g = np.full(N_SAMPLES.shape, 2.0)
    h2 = np.full(N_SAMPLES.shape, 4.0)      # ||h||^2
    dot = np.full(N_SAMPLES.shape, 3.0)     # <G, h>
    b = np.full(N_SAMPLES.shape, 0.5)
    alloc.observe(np.array([0, 3]), np.array([1, 2]),
                  RoundState(1, POP, 3.0, np.ones(4, bool),
                             signals=Signals(update_norm=g, stale_norm_sq=h2, stale_dot=dot,
                                             beta=b)))
    want = np.sqrt(4.0 - 2 * 0.5 * 3.0 + 0.25 * 4.0)  # ||G||^2 - 2 b <G,h> + b^2 ||h||^2
    s2 = RoundState(2, POP, 3.0, np.ones(4, bool),
                    signals=Signals(stale_norm_sq=zeros, beta=beta))
    sc = alloc.client_scores(s2)
    assert sc[0, 1] == pytest.approx(want) and sc[3, 2] == pytest.approx(want)
    assert sc[1, 0] == 4.0  # untouched pairs keep their last score
    # budget walk: round 2 is sampled with budget = round 1's number of slots
    captured = {}
    orig = StaleVREAllocator.__mro__[1].allocate

    def spy(self, state, rng):
        captured["budget"] = state.budget
        return orig(self, state, rng)

    StaleVREAllocator.__mro__[1].allocate = spy
    try:
        alloc.allocate(s2, rng)
    finally:
        StaleVREAllocator.__mro__[1].allocate = orig
    assert a0.num_slots == 3
    assert captured["budget"] == a1.num_slots
    # checkpointed state round-trips
    other = _stalevre(init="random", score="last", budget="walk")
    other.load_state_dict(alloc.state_dict())
    np.testing.assert_array_equal(other._score, alloc._score)
    assert other._last_slots == alloc._last_slots


def test_stalevre_paper_state_dict_from_old_checkpoint():
    alloc = _stalevre()
    alloc.load_state_dict({})  # checkpoints written before these options
    assert alloc._last_slots == -1


def test_variant_defaults_per_option():
    entry = registry.get("sampler", "stalevre")
    paper = registry.resolve_options("sampler", {}, entry.options)
    authors = registry.resolve_options("sampler", {}, entry.options, "authors")
    assert paper == {"b0": 0.9, "schedule": "paper", "idle_model": "stale", "init": "full",
                     "score": "stored", "budget": "fixed"}
    # main2.py's choices (their StaleVRE experiments); main.py's path is named options only
    assert authors == {**paper, "schedule": "authors", "idle_model": "skip",
                       "init": "computation", "score": "probe"}
    entry = registry.get("sampler", "random")
    given = registry.resolve_options("sampler", {"draw": "independent"}, entry.options, "authors")
    assert given == {"draw": "independent", "probability": "authors"}  # an explicit option wins
    for name, key, value in (("random", "probability", "authors"), ("random", "draw", "fixed"),
                             ("lvr", "loss_weighting", "authors"), ("gvr", "d_index", "authors"),
                             ("fairvr", "loss_weighting", "authors"),
                             ("fedfair", "loss_proxy", "error")):
        opts = registry.get("sampler", name).options
        assert registry.resolve_options("s", {}, opts, "authors")[key] == value
        assert registry.resolve_options("s", {}, opts)[key] != value


def test_stalevre_aggregator_b0_is_the_samplers():
    agg = registry.get("aggregator", "stalevre")
    assert registry.resolve_options("s", {}, agg.options, "authors")["b0"] == 0.9


@pytest.mark.parametrize("schedule, expect", [
    ("paper", [0.0, 0.7, 0.5, 0.3, 0.1]),     # b0 - r (t - L), r = 0.2, active in round L = 0
    ("authors", [0.0, 0.9, 0.7, 0.5, 0.3]),   # b0 - r (t - L - 1): the first decay a round later
])
def test_stalevre_schedule(schedule, expect):
    from mmfl.core.stale_aggregators import StaleVREAggregator

    pop = Population(np.array([[10]]), np.array([1]), ("a",))
    agg = StaleVREAggregator({"b0": 0.9, "schedule": schedule}, pop)
    agg.last[0, 0], agg.rate[0, 0] = 0, 0.2
    got = [float(agg.beta(RoundState(t, pop, 1.0, np.ones(1, bool)))[0, 0]) if t else 0.0
           for t in range(5)]
    np.testing.assert_allclose(got[1:], expect[1:])


def test_stalevre_probe_scores_hand_worked():
    alloc = _stalevre(init="computation", score="probe")
    assert alloc.requires == {"stale", "probe"}
    assert alloc.requires_at(0) == {"stale", "updates"}  # round 0: every pair trains once
    assert alloc.requires_at(1) == {"stale", "probe"}
    # round 0 is sampled optimally from the full computation's norms
    norm = np.where(POP.holds, [[1.0, 2, 3], [4, 0, 5], [0, 6, 0], [7, 8, 9]], np.nan)
    s0 = RoundState(0, POP, 3.0, np.ones(4, bool), signals=Signals(update_norm=norm))
    np.testing.assert_allclose(alloc.client_scores(s0), np.nan_to_num(norm))
    # later: ||G~ - beta h|| / eta from the probe and stale stores
    g2 = np.array([[4.0, 0, 0], [0, 0, 0], [0, 9, 0], [1, 0, 0]])    # ||G~||^2 (0: never probed)
    h2 = np.array([[4.0, 1, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]])    # ||h||^2
    dot = np.array([[3.0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]])   # <G~, h>
    beta = np.full((4, 3), 0.5)
    s1 = RoundState(1, POP, 3.0, np.ones(4, bool), signals=Signals(
        probe_norm_sq=g2, probe_dot=dot, stale_norm_sq=h2, beta=beta))
    sc = alloc.client_scores(s1)
    assert sc[0, 0] == pytest.approx(np.sqrt(4 - 2 * 0.5 * 3 + 0.25 * 4))
    assert sc[0, 1] == pytest.approx(0.5)        # never probed: beta ||h||
    assert sc[2, 1] == pytest.approx(3.0)        # probed, no h: ||G~||
    assert sc[3, 0] == pytest.approx(np.sqrt(1 - 1 + 0.25))
    assert sc[1, 0] == 0.0                       # neither: 0, never sampled (as main2.py)


def test_stalevre_probe_set_is_the_authors_random_draw():
    alloc = _stalevre(init="computation", score="probe")
    clients, tasks = alloc.probe_set(RoundState(1, POP, 3.0, np.ones(4, bool)),
                                     np.random.default_rng(0))
    assert 1 <= len(clients) <= 3 and POP.holds[clients, tasks].all()


def _stale_state(pop):
    """A round in which every held pair has a stored update h."""
    sig = Signals(stale_norm_sq=np.where(pop.holds, 1.0, 0.0))
    return RoundState(3, pop, 2.0, np.ones(pop.num_clients, bool), signals=sig)


@pytest.mark.parametrize("idle, stale_tasks", [("stale", [0, 0, 0, 1, 1, 1, 2, 2, 2]),
                                               ("skip", [0, 0, 0])])
def test_idle_model_hand_worked(idle, stale_tasks):
    """FedVARP (beta = 1), one slot: client 0 trains model a. The paper's estimator still adds
    beta d h over every stored pair of models b and c (no slot); the authors' loop skips them."""
    from mmfl.core.stale_aggregators import FedVARPAggregator

    a = Assignment(processor=np.array([0]), client=np.array([0]), task=np.array([0]),
                   probability=np.array([0.5]), share=np.array([1.0]),
                   probabilities=np.full((7, 3), 0.1))
    plan = FedVARPAggregator({"idle_model": idle}, POP).plan(a, _stale_state(POP))
    d = POP.data_weight
    assert plan.coefficient.tolist() == [d[0, 0] / 0.5]
    assert plan.stale_task.tolist() == stale_tasks
    # model a: e = beta (d - c) over its stored pairs: client 0 (fresh, c = 2 d), 1 and 3
    e_a = plan.stale_coefficient[plan.stale_task == 0]
    np.testing.assert_allclose(e_a, [-d[0, 0], d[1, 0], d[3, 0]])  # the same under both
    assert plan.stale_client[plan.stale_task == 0].tolist() == [0, 1, 3]
    if idle == "stale":
        np.testing.assert_allclose(plan.stale_coefficient[plan.stale_task == 1], d[[0, 2, 3], 1])


@pytest.mark.parametrize("idle", ["stale", "skip"])
def test_idle_model_monte_carlo_bias(idle):
    """Scalar updates G, stored h, beta = 1, independent draws: the paper's estimator is
    unbiased for sum_i d G; skipping a slot-less model removes its stale sum, so
    E = sum_i d G - P(no slot) sum_i d h for that model (Monte-Carlo, 4 standard errors)."""
    from mmfl.core.stale_aggregators import FedVARPAggregator

    rng = np.random.default_rng(11)
    g = rng.normal(1.0, 1.0, N_SAMPLES.shape) * POP.holds
    h = rng.normal(2.0, 1.0, N_SAMPLES.shape) * POP.holds
    alloc = RandomAllocator({"draw": "independent"}, POP, 0)
    agg = FedVARPAggregator({"idle_model": idle}, POP)
    state = _stale_state(POP)
    reps = 20_000
    est = np.zeros((reps, POP.num_tasks))
    none = np.zeros(POP.num_tasks)
    for r in range(reps):
        a = alloc.allocate(state, rng)
        none += ~np.isin(np.arange(POP.num_tasks), a.task)
        plan = agg.plan(a, state)
        np.add.at(est[r], plan.task, plan.coefficient * g[plan.client, plan.task])
        np.add.at(est[r], plan.stale_task, plan.stale_coefficient * h[plan.stale_client,
                                                                       plan.stale_task])
    target = (POP.data_weight * g).sum(axis=0)
    if idle == "skip":
        p_none = none / reps  # P(model s has no slot), measured on the same draws
        target = target - p_none * (POP.data_weight * h).sum(axis=0)
        assert (p_none > 0.05).all()  # the bias is there to see
    assert_mean_within(est, target)
