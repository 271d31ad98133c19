"""Group-based sampler, the VTC 2025 prototype (docs/algorithms.md section 7, mmfl.core.group).

Covers: deterministic grouping that covers every client, the rotation worked example, probability
matrix properties, late clients and joining models, Monte Carlo unbiasedness of the default
aggregator for the serving groups' data-weighted update, ``within = "optimal"``, checkpoints.
"""

from __future__ import annotations

import numpy as np
import pytest

from testkit import assert_mean_within
from mmfl.core.aggregation import UnbiasedAggregator
from mmfl.core.drawing import draw
from mmfl.core.group import GroupAllocator, kmeans, label_groups, task_groups
from mmfl.registry import get, resolve_options
from mmfl.types import Population, RoundState, Signals

# Worked example: N = 6, S = 2, one processor each.
N6 = np.array([[10, 0], [0, 5], [3, 3], [8, 1], [0, 9], [4, 4]])
POP6 = Population(N6, np.ones(6, np.int64), ("a", "b"))

# Monte Carlo population: mixed capacities, one offline client, 3 tasks.
N_MC = np.array([[30, 10, 0], [60, 0, 5], [10, 90, 0], [0, 20, 40], [25, 25, 25],
                 [5, 40, 10], [0, 0, 30], [50, 5, 5]])
CAP_MC = np.array([1, 2, 1, 2, 1, 3, 1, 2])
POP_MC = Population(N_MC, CAP_MC, ("a", "b", "c"))
AVAIL_MC = np.array([True, True, True, False, True, True, True, True])
DIM = 2
G_FAKE = np.random.default_rng(11).normal(size=(8, 3, DIM)) + 1.0


def make(options=None, pop=POP_MC, seed=0) -> GroupAllocator:
    entry = get("sampler", "group")
    opts = resolve_options("sampler", dict(options or {}), entry.options)
    return entry.obj(opts, pop, seed)


def losses(pop: Population, seed: int = 3) -> np.ndarray:
    r = np.random.default_rng(seed).uniform(0.5, 3.0, size=pop.n_samples.shape)
    return np.where(pop.holds, r, np.nan)


def state(t, pop=POP_MC, budget=3.0, available=None, active=None, loss=None, task_losses=None):
    avail = np.ones(pop.num_clients, bool) if available is None else np.asarray(available, bool)
    return RoundState(t, pop, budget, avail, task_losses=task_losses,
                      signals=Signals(local_loss=loss), task_active=active)


def schedulable(alloc: GroupAllocator, st: RoundState) -> np.ndarray:
    """(P,) bool: processors whose client is grouped, available, holds its group's model, and
    that model is active - recomputed here from the public pieces."""
    models = alloc.group_models(st)
    pop = st.population
    ok = np.zeros(pop.num_clients, bool)
    for i in range(pop.num_clients):
        g = alloc.groups[i]
        if g < 0 or not st.available[i]:
            continue
        s = models[g]
        ok[i] = s >= 0 and pop.holds[i, s] and (st.task_active is None or st.task_active[s])
    return ok[pop.processor_client]


# --------------------------------------------------------------------------------------------
# Registry and options
# --------------------------------------------------------------------------------------------


def test_registered_with_defaults_and_requires():
    entry = get("sampler", "group")
    opts = resolve_options("sampler", {}, entry.options)
    assert opts == {"groups": 0, "grouping": "label", "profile": "data_weight",
                    "within": "uniform", "alpha": 3.0, "iterations": 20}
    a = make()
    assert a.num_groups == 3 and a.requires == frozenset()
    assert make({"within": "optimal"}).requires == frozenset({"local_loss"})
    assert make({"grouping": "similarity"}).requires == frozenset({"local_loss"})
    assert type(a).requires == frozenset()  # instance attribute, class untouched
    with pytest.raises(ValueError):
        GroupAllocator({"within": "bogus"}, POP_MC)


# --------------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------------


def test_task_groups_and_label_groups():
    assert task_groups(0, 2, 5).tolist() == [0, 2, 4]
    assert task_groups(1, 2, 5).tolist() == [1, 3]
    assert [task_groups(s, 3, 2).tolist() for s in range(3)] == [[0], [1], [0]]
    prof = np.array([[1, 0], [0.2, 0.8], [0.9, 0.1], [0.6, 0.4], [0, 0]])
    # majority tasks 0, 1, 0, 0, 0 (empty row -> 0); G = 4: task 0 owns (0, 2), task 1 (1, 3)
    assert label_groups(prof, 4).tolist() == [0, 1, 2, 0, 2]


@pytest.mark.parametrize("grouping", ["label", "similarity"])
@pytest.mark.parametrize("groups", [0, 2, 4])
def test_groups_deterministic_and_cover_every_client(grouping, groups):
    out = []
    for _ in range(2):
        a = make({"grouping": grouping, "groups": groups}, seed=5)
        a.allocate(state(0, loss=losses(POP_MC)), np.random.default_rng(0))
        out.append(a.groups.copy())
    np.testing.assert_array_equal(out[0], out[1])
    g = out[0]
    k = groups or 3
    assert g.shape == (8,) and (g >= 0).all() and (g < k).all()
    if grouping == "similarity":
        assert np.bincount(g, minlength=k).min() >= 1  # N >= G: no empty group


def test_label_grouping_worked_example():
    a = make(pop=POP6)
    a.allocate(state(0, POP6), np.random.default_rng(0))
    # d = n / (25, 22): majority tasks 0, 1, 1, 0, 1, 1
    assert a.groups.tolist() == [0, 1, 1, 0, 1, 1]
    b = make({"profile": "samples"}, pop=POP6)
    b.allocate(state(0, POP6), np.random.default_rng(0))
    assert b.groups.tolist() == [0, 1, 0, 0, 1, 0]  # raw counts: ties (3, 3), (4, 4) -> task 0


def test_similarity_uses_losses_and_seed():
    loss = losses(POP_MC)
    a = make({"grouping": "similarity"}, seed=1)
    a.allocate(state(0, loss=loss), np.random.default_rng(0))
    assert a.loss_features
    b = make({"grouping": "similarity"}, seed=1)
    b.allocate(state(0), np.random.default_rng(0))  # no losses: profile fallback
    assert not b.loss_features and (b.groups >= 0).all()


def test_kmeans_no_empty_cluster_with_duplicates():
    x = np.array([[0.0, 1.0]] * 6 + [[1.0, 0.0]])
    labels, centres = kmeans(x, 3, np.random.default_rng(0), 10)
    assert np.bincount(labels, minlength=3).min() >= 1
    assert np.isfinite(centres).all()
    labels, centres = kmeans(x[:2], 3, np.random.default_rng(0))
    assert labels.tolist() == [0, 1] and np.isinf(centres[2]).all()


# --------------------------------------------------------------------------------------------
# Rotation
# --------------------------------------------------------------------------------------------


def test_rotation_worked_example():
    """N = 6, S = 2, G = 2, m = 3, B_i = 1; groups {0, 3} (task 0) and {1, 2, 4, 5} (task 1).

    Round 0: group 0 -> model 0 (clients 0, 3), group 1 -> model 1 (clients 1, 2, 4, 5): E = 6
    schedulable processors, q = 3/6. Round 1: group 0 -> model 1 (only client 3 holds it), group
    1 -> model 0 (clients 2, 5): E = 3, q = 1. Round 2 repeats round 0.
    """
    a = make({"groups": 2}, pop=POP6)
    half = np.zeros((6, 2))
    half[[0, 3], 0] = 0.5
    half[[1, 2, 4, 5], 1] = 0.5
    one = np.zeros((6, 2))
    one[3, 1] = one[2, 0] = one[5, 0] = 1.0
    for t, models, p in [(0, [0, 1], half), (1, [1, 0], one), (2, [0, 1], half)]:
        st = state(t, POP6)
        assert a.group_models(st).tolist() == models
        asg = a.allocate(st, np.random.default_rng(t))
        np.testing.assert_allclose(asg.probabilities, p)
        assert f"groups->models {models[0]},{models[1]}" in asg.note
    assert a.schedule(state(1, POP6)).tolist() == [-1, -1, 0, 1, -1, 0]


def test_model_join_enters_front_and_leave():
    a = make({"groups": 3})
    act = np.array([True, True, False])
    for t in range(3):
        a.allocate(state(t, active=act), np.random.default_rng(t))
        assert 2 not in a.buffer.tolist()
    st = state(3)
    a.allocate(st, np.random.default_rng(3))
    # old buffer (0, 1), phase 0: group 0 served buffer[3 mod 2] = 1 -> new buffer (2, 1, 0)
    assert a.buffer.tolist() == [2, 1, 0]
    assert a.group_models(st).tolist() == [2, 1, 0]
    assert a.group_models(state(4)).tolist() == [1, 0, 2]
    # model 1 leaves at round 5: removed, group 0 keeps the entry it would serve
    st5 = state(5, active=np.array([True, False, True]))
    asg = a.allocate(st5, np.random.default_rng(5))
    assert a.buffer.tolist() == [0, 2]
    assert (asg.probabilities[:, 1] == 0).all()


def test_two_joining_models_alpha_fair_order():
    losses_ = np.array([1.0, 5.0, 0.1])  # model 1 is much worse than model 2
    orders = set()
    for seed in range(20):
        a = make({"alpha": 50.0}, seed=seed)
        a.allocate(state(0, active=np.array([True, False, False])), np.random.default_rng(0))
        a.allocate(state(1, task_losses=losses_), np.random.default_rng(1))
        orders.add(tuple(a.buffer[:2].tolist()))
    assert orders == {(1, 2)}  # large alpha: the worst newcomer first, always
    # alpha = 1: uniform order, both orders occur over seeds; same seed -> same order
    seen = set()
    for seed in range(20):
        runs = []
        for _ in range(2):
            a = make({"alpha": 1.0}, seed=seed)
            a.allocate(state(0, active=np.array([True, False, False])), np.random.default_rng(0))
            a.allocate(state(1, task_losses=losses_), np.random.default_rng(1))
            runs.append(tuple(a.buffer.tolist()))
        assert runs[0] == runs[1]
        seen.add(runs[0][:2])
    assert seen == {(1, 2), (2, 1)}


# --------------------------------------------------------------------------------------------
# Probability matrix properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("within", ["uniform", "optimal"])
@pytest.mark.parametrize("grouping", ["label", "similarity"])
def test_probability_properties(within, grouping):
    for seed in range(6):
        r = np.random.default_rng(seed)
        n_cl, s_count = int(r.integers(4, 15)), int(r.integers(1, 5))
        n = r.integers(0, 50, size=(n_cl, s_count)) * (r.random((n_cl, s_count)) < 0.7)
        pop = Population(n, r.integers(1, 4, size=n_cl), tuple("abcd"[:s_count]))
        a = make({"within": within, "grouping": grouping, "groups": int(r.integers(0, 5))},
                 pop=pop, seed=seed)
        for t in range(4):
            avail = r.random(n_cl) < 0.8
            act = r.random(s_count) < 0.8
            m = float(r.uniform(0, pop.num_processors + 2))
            st = state(t, pop, m, avail, act, loss=losses(pop, seed + t))
            before = st.signals.local_loss.copy()
            asg = a.allocate(st, np.random.default_rng(t))
            p = asg.probabilities
            assert p.shape == (pop.num_processors, s_count)
            assert (p >= 0).all() and (p <= 1 + 1e-12).all()
            assert (p.sum(axis=1) <= 1 + 1e-12).all()
            assert (p[~avail[pop.processor_client]] == 0).all()    # unavailable clients
            assert (p[:, ~act] == 0).all()                         # inactive models
            assert (p[~pop.holds[pop.processor_client]] == 0).all()
            assert ((p > 0).sum(axis=1) <= 1).all()  # one model per processor per round
            e = int(schedulable(a, st).sum())
            if within == "uniform":
                assert p.sum() == pytest.approx(min(m, e))
            else:
                assert p.sum() <= min(m, e) + 1e-9
            np.testing.assert_array_equal(st.signals.local_loss, before, strict=True)


def test_uniform_total_is_min_budget_schedulable():
    a = make({"groups": 2}, pop=POP6)
    for m in (0.0, 1.0, 4.5, 6.0, 10.0):
        asg = a.allocate(state(0, POP6, m), np.random.default_rng(0))
        assert asg.probabilities.sum() == pytest.approx(min(m, 6))
        assert ("expected slots" in asg.note) == (m > 6)


# --------------------------------------------------------------------------------------------
# Late clients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grouping", ["label", "similarity"])
def test_late_client_zero_then_nearest_group(grouping):
    avail0 = AVAIL_MC.copy()
    avail0[[2, 6]] = False
    a = make({"grouping": grouping})
    asg = a.allocate(state(0, available=avail0, loss=losses(POP_MC)), np.random.default_rng(0))
    assert a.groups[3] == a.groups[2] == a.groups[6] == -1
    late = ~avail0[POP_MC.processor_client]
    assert (asg.probabilities[late] == 0).all()
    old = a.groups.copy()
    a.allocate(state(1, available=np.ones(8, bool), loss=losses(POP_MC, 9)),
               np.random.default_rng(1))
    assert (a.groups >= 0).all()
    known = old >= 0
    np.testing.assert_array_equal(a.groups[known], old[known])  # nobody regrouped
    if grouping == "label":
        # client 2 (majority task 1) and 6 (task 2) join their task's group
        assert a.groups[2] == 1 and a.groups[6] == 2
    else:
        x, _ = a.features(state(1, loss=losses(POP_MC, 9)))
        for i in (2, 3, 6):
            d = np.sum((a.centres - x[i]) ** 2, axis=1)
            assert a.groups[i] == int(np.argmin(d))


# --------------------------------------------------------------------------------------------
# Unbiasedness (Monte Carlo) for the serving groups' data-weighted update
# --------------------------------------------------------------------------------------------


def _group_target(a: GroupAllocator, st: RoundState) -> np.ndarray:
    """(S, DIM): sum over available clients i of the group serving s of d_{i,s} G_{i,s}."""
    models = a.group_models(st)
    target = np.zeros((3, DIM))
    d = POP_MC.data_weight
    for i in range(POP_MC.num_clients):
        if a.groups[i] < 0 or not st.available[i]:
            continue
        s = models[a.groups[i]]
        if s >= 0:
            target[s] += d[i, s] * G_FAKE[i, s]  # d = 0 when i holds no data for s
    return target


@pytest.mark.parametrize("options", [{}, {"within": "optimal"}, {"groups": 2},
                                     {"grouping": "similarity", "groups": 4}])
def test_monte_carlo_unbiased_for_group_update(options):
    reps = 20_000
    a = make(options, seed=2)
    agg = UnbiasedAggregator({}, POP_MC)
    loss = losses(POP_MC)
    a.allocate(state(0, budget=2.5, available=AVAIL_MC, loss=loss), np.random.default_rng(0))
    st = state(1, budget=2.5, available=AVAIL_MC, loss=loss)
    rng = np.random.default_rng(123)
    first = a.allocate(st, rng)
    p = first.probabilities
    assert 0 < p.sum() <= 2.5 + 1e-9
    est = np.zeros((reps, 3, DIM))
    for r in range(reps):
        asg = first if r == 0 else draw(p, POP_MC, rng)
        plan = agg.plan(asg, st)
        np.add.at(est[r], plan.task, plan.coefficient[:, None] * G_FAKE[plan.client, plan.task])
    target = _group_target(a, st)
    full = np.einsum("is,isk->sk", POP_MC.data_weight * AVAIL_MC[:, None], G_FAKE)
    assert not np.allclose(target, full)  # the group update differs from full participation
    assert_mean_within(est, target)


def test_rotation_period_sums_to_full_update():
    """Over L consecutive rounds each group serves each model once: the per-round expected
    updates (group targets) sum to the full-participation update (fixed G, all available)."""
    a = make({"groups": 3})
    total = np.zeros((3, DIM))
    allav = np.ones(8, bool)
    for t in range(3):
        st = state(t, available=allav)
        a.allocate(st, np.random.default_rng(t))
        total += _group_target(a, st)
    full = np.einsum("is,isk->sk", POP_MC.data_weight, G_FAKE)
    np.testing.assert_allclose(total, full)


# --------------------------------------------------------------------------------------------
# within = "optimal"
# --------------------------------------------------------------------------------------------


def test_optimal_within_runs_and_follows_scores():
    a = make({"within": "optimal", "groups": 2}, pop=POP6)
    loss = np.where(POP6.holds, 1.0, np.nan)
    loss[1, 1] = 4.0
    st = state(0, POP6, 2.0, loss=loss)
    asg = a.allocate(st, np.random.default_rng(0))
    p = asg.probabilities
    # group 1 serves model 1 with budget share 2 * 4/6; scores d * loss: 5*4, 3, 9, 4 (/22)
    u = np.array([20.0, 3.0, 9.0, 4.0])
    np.testing.assert_allclose(p[[1, 2, 4, 5], 1], np.minimum(1, u / u.sum() * 4 / 3))
    # group 0 serves model 0: d * loss = 10, 8 (/25), budget 2/3
    np.testing.assert_allclose(p[[0, 3], 0], np.array([10.0, 8.0]) / 18 * 2 / 3)
    assert p.sum() == pytest.approx(2.0)
    # probes: before grouping every eligible pair, afterwards only the scheduled ones
    probe = a.probe_pairs(state(1, POP6, 2.0))
    sched = a.schedule(state(1, POP6, 2.0))
    expect = np.zeros((6, 2), bool)
    expect[np.flatnonzero(sched >= 0), sched[sched >= 0]] = True
    np.testing.assert_array_equal(probe, expect)
    fresh = make({"within": "optimal"}, pop=POP6)
    np.testing.assert_array_equal(fresh.probe_pairs(st), st.eligible)
    assert not make({}, pop=POP6).probe_pairs(st).any()


def test_optimal_without_losses_raises_and_missing_losses_filled():
    a = make({"within": "optimal"})
    with pytest.raises(ValueError, match="local_loss"):
        a.allocate(state(0), np.random.default_rng(0))
    b = make({"within": "optimal"})
    loss = losses(POP_MC)
    loss[0, 0] = np.nan
    asg = b.allocate(state(0, loss=loss), np.random.default_rng(0))
    assert np.isfinite(asg.probabilities).all()


# --------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grouping", ["label", "similarity"])
def test_state_dict_round_trip(grouping):
    act = np.array([True, False, True])
    a = make({"grouping": grouping, "within": "optimal"}, seed=4)
    avail0 = AVAIL_MC.copy()
    avail0[6] = False
    for t in range(3):
        a.allocate(state(t, available=avail0 if t == 0 else AVAIL_MC, active=act,
                         loss=losses(POP_MC, t)), np.random.default_rng(t))
    sd = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    b = make({"grouping": grouping, "within": "optimal"}, seed=4)
    b.load_state_dict({k: v.copy() for k, v in sd.items()})
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    for t in range(3, 7):  # model 1 joins at round 4, client 3 comes online at round 5
        st = state(t, available=np.ones(8, bool) if t >= 5 else AVAIL_MC,
                   active=act if t < 4 else None, loss=losses(POP_MC, t))
        x = a.allocate(st, np.random.default_rng(t))
        y = b.allocate(st, np.random.default_rng(t))
        np.testing.assert_array_equal(x.probabilities, y.probabilities)
        np.testing.assert_array_equal(x.processor, y.processor)
        np.testing.assert_array_equal(x.task, y.task)
    sd["groups"][...] = 99  # state_dict returns copies
    assert not (a.groups == 99).any()
