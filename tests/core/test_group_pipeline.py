"""``group_pipeline``: group-based sampling as the VTC 2025 authors' code builds it
(mmfl.core.group, docs/group_sampling.md).

Covers: options and their errors; the three groupings (hand-worked, deterministic for a seed);
the pipeline buffer and its loss^alpha draw (hand-worked and Monte Carlo); the draw inside a
group; Monte Carlo unbiasedness of the default aggregator for the served groups' update (uniform
and optimal, global and group weights) and the documented bias of ``probability = "authors"``;
repeated rounds and checkpoints.
"""

from __future__ import annotations

import numpy as np
import pytest

from testkit import assert_frequency_within, assert_mean_within
from mmfl.core.aggregation import UnbiasedAggregator
from mmfl.core.group import (GroupPipelineAllocator, class_block_groups, pipeline_step,
                             random_groups)
from mmfl.errors import ConfigError
from mmfl.registry import get, resolve_options
from mmfl.types import Population, RoundState, Signal, Signals

# Monte Carlo population: N = 8, S = 3, mixed capacities (P = 13), one client without task 2.
N_MC = np.array([[30, 10, 0], [60, 40, 5], [10, 90, 20], [5, 20, 40], [25, 25, 25],
                 [5, 40, 10], [70, 3, 30], [50, 5, 5]])
CAP_MC = np.array([1, 2, 1, 2, 1, 3, 1, 2])
POP = Population(N_MC, CAP_MC, ("a", "b", "c"))
DIM = 2
G_FAKE = np.random.default_rng(11).normal(size=(8, 3, DIM)) + 1.0
# class sets of the last task (K = 10): majority block 0-4 -> group 0, 5-9 -> group 1
HELD = np.zeros((8, 10), bool)
for i, cls in enumerate([(0, 1, 7), (5, 6, 2), (0, 8, 9), (1, 2, 3), (4, 5, 9), (6, 7, 8),
                         (0, 3, 5), (2, 9, 4)]):
    HELD[i, list(cls)] = True
LABEL_GROUPS = [0, 1, 1, 0, 1, 1, 0, 0]


def make(options=None, pop=POP, seed=0, held=True) -> GroupPipelineAllocator:
    entry = get("sampler", "group_pipeline")
    a = entry.obj(resolve_options("sampler", dict(options or {}), entry.options), pop, seed)
    if held and a.needs_held_classes:
        a.set_held_classes([np.zeros((pop.num_clients, 10), bool)] * (pop.num_tasks - 1)
                           + [HELD])
    return a


def state(t, pop=POP, budget=4.0, available=None, loss=None, task_losses=None, dist=None):
    avail = np.ones(pop.num_clients, bool) if available is None else np.asarray(available, bool)
    return RoundState(t, pop, budget, avail, task_losses=task_losses,
                      signals=Signals(local_loss=loss, update_distance=dist))


def local_losses(seed=3):
    r = np.random.default_rng(seed).uniform(0.5, 3.0, size=N_MC.shape)
    return np.where(POP.holds, r, np.nan)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def test_registered_defaults_requires_and_errors():
    entry = get("sampler", "group_pipeline")
    assert resolve_options("sampler", {}, entry.options) == {
        "groups": 2, "grouping": "label", "label_task": -1, "within": "uniform",
        "alpha": 3.0, "weight": "global", "probability": "true", "iterations": 20}
    # the authors' variant changes the aggregation probability only
    assert resolve_options("sampler", {}, entry.options, "authors")["probability"] == "authors"
    a = make()
    assert a.requires == frozenset() and a.needs_held_classes and a.label_task == 2
    assert make({"within": "optimal"}).requires == frozenset({Signal.LOCAL_LOSS})
    g = make({"grouping": "gradient"})
    assert g.requires == frozenset({Signal.UPDATE_DISTANCE}) and not g.needs_held_classes
    with pytest.raises(ConfigError, match="sampler.groups"):
        make({"groups": 4})
    with pytest.raises(ConfigError, match="sampler.label_task"):
        make({"label_task": 3})
    with pytest.raises(ValueError, match="class sets"):
        make(held=False).allocate(state(0), np.random.default_rng(0))


# --------------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------------


def test_class_block_groups_hand_worked():
    assert class_block_groups(HELD, 2).tolist() == LABEL_GROUPS
    # ties go to the last tied block; no classes at all: the last group
    held = np.zeros((3, 10), bool)
    held[0, [1, 6]] = True                                 # one class in each half: tie
    held[1, [0, 1, 2, 3, 4, 5]] = True                     # 5 low against 1 high
    assert class_block_groups(held, 2).tolist() == [1, 0, 1]
    # G = 3 blocks of K = 10: classes 0-3, 4-6, 7-9
    held3 = np.zeros((2, 10), bool)
    held3[0, [4, 5, 9]] = True
    held3[1, [0, 7, 8]] = True
    assert class_block_groups(held3, 3).tolist() == [1, 2]


def test_random_groups_balanced_and_seeded():
    g = random_groups(11, 3, np.random.default_rng(5))
    assert sorted(np.bincount(g).tolist()) == [3, 4, 4]
    assert g.tolist() == random_groups(11, 3, np.random.default_rng(5)).tolist()


def _two_cluster_distances():
    x = np.array([0.0, 0.1, 0.2, 5.0, 5.2, 0.05, 5.1, 4.9])  # clients 0,1,2,5 near 0
    return np.abs(x[:, None] - x[None, :])


@pytest.mark.parametrize("grouping", ["label", "random", "gradient"])
def test_grouping_deterministic_for_a_seed(grouping):
    dist = _two_cluster_distances()
    runs = []
    for _ in range(2):
        a = make({"grouping": grouping}, seed=7)
        a.allocate(state(0, dist=dist), np.random.default_rng(0))
        runs.append(a.groups.tolist())
    assert runs[0] == runs[1] and set(runs[0]) == {0, 1}
    if grouping == "label":
        assert runs[0] == LABEL_GROUPS
    if grouping == "gradient":  # k-means on the rows of D finds the two clusters
        g = np.array(runs[0])
        assert len(set(g[[0, 1, 2, 5]])) == 1 and len(set(g[[3, 4, 6, 7]])) == 1
    if grouping == "random":
        other = [make({"grouping": "random"}, seed=s).form_groups(state(0)).tolist()
                 for s in range(8, 14)]
        assert any(o != runs[0] for o in other)


def test_gradient_grouping_asks_for_distances_until_grouped():
    a = make({"grouping": "gradient", "within": "optimal"})
    assert a.requires_at(0) == {Signal.UPDATE_DISTANCE, Signal.LOCAL_LOSS}
    assert a.probe_pairs(state(0)).tolist() == state(0).eligible.tolist()  # before grouping
    with pytest.raises(ValueError, match="update_distance"):
        a.allocate(state(0, loss=local_losses()), np.random.default_rng(0))
    a.allocate(state(0, loss=local_losses(), dist=_two_cluster_distances()),
               np.random.default_rng(0))
    assert a.requires_at(1) == {Signal.LOCAL_LOSS}


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def test_pipeline_hand_worked_with_dominant_losses():
    """S = 3, G = 2, f = (1, 3, 2), alpha = 60: every draw takes the candidate of largest loss
    (the other has probability (2/3)^60 < 1e-10).
    round 0: (0, 1); kept (0), candidates {1, 2}: 1 enters -> (1, 0);
    kept (1), candidates {0, 2}: 2 -> (2, 1); kept (2), candidates {0, 1}: 1 -> (1, 2); ..."""
    a = make({"alpha": 60.0})
    f = np.array([1.0, 3.0, 2.0])
    seen = []
    for t in range(5):
        a.allocate(state(t, task_losses=f), np.random.default_rng(t))
        seen.append(a.buffer_for(t).tolist())
    assert seen == [[0, 1], [1, 0], [2, 1], [1, 2], [2, 1]]


def test_pipeline_step_rotates_when_groups_equal_models_and_idles_without_candidate():
    rng = np.random.default_rng(0)
    assert pipeline_step(np.array([0, 1, 2]), np.ones(3), 3.0, rng).tolist() == [2, 0, 1]
    # model 2 inactive, G = S = 3: no candidate -> -1 enters (the group idles)
    out = pipeline_step(np.array([0, 1, 2]), np.ones(3), 3.0, rng,
                        active=np.array([True, True, False]))
    assert out.tolist() == [-1, 0, 1]


def test_pipeline_draw_is_loss_to_the_alpha():
    """buffer (0, 1), f = (1, 2, 3), alpha = 3: model 0 stays, 1 and 2 compete with
    2^3 : 3^3 = 8 : 27, so P(2 enters) = 27 / 35 (and the uniform alpha = 0 gives 1/2)."""
    reps = 20_000
    for alpha, p2 in ((3.0, 27 / 35), (0.0, 0.5)):
        rng = np.random.default_rng(1)
        first = [pipeline_step(np.array([0, 1]), np.array([1.0, 2.0, 3.0]), alpha, rng)
                 for _ in range(reps)]
        new = np.array([b[0] for b in first])
        assert set(new.tolist()) == {1, 2} and all(b[1] == 0 for b in first)
        assert_frequency_within([(new == 2).sum()], reps, [p2])


def test_repeated_round_and_checkpoint_replay_the_same_buffer():
    a = make()
    f = np.array([2.0, 1.0, 3.0])
    for t in range(3):
        a.allocate(state(t, task_losses=f), np.random.default_rng(t))
    buf2 = a.buffer_for(2).tolist()
    a.allocate(state(2, task_losses=f), np.random.default_rng(9))  # the round again
    assert a.buffer_for(2).tolist() == buf2 and a.next_round == 3
    b = make(seed=0)
    b.load_state_dict(a.state_dict())
    for t in range(3, 6):
        x = a.allocate(state(t, task_losses=f), np.random.default_rng(t))
        y = b.allocate(state(t, task_losses=f), np.random.default_rng(t))
        assert x.client.tolist() == y.client.tolist() and x.task.tolist() == y.task.tolist()
    assert a.buffer.tolist() == b.buffer.tolist()


# --------------------------------------------------------------------------------------------
# The draw inside a group
# --------------------------------------------------------------------------------------------


def test_uniform_draw_takes_floor_m_over_g_per_group():
    """m = 5, G = 2: k = 2 per group. Round 0 serves (0, 1): group 0 = clients (0, 3, 6, 7)
    with processors 1 + 2 + 1 + 2 = 6 holding model 0; group 1 = clients (1, 2, 4, 5),
    holding model 1, 2 + 1 + 1 + 3 = 7 processors."""
    a = make()
    asg = a.allocate(state(0, budget=5.0), np.random.default_rng(4))
    g = np.array(LABEL_GROUPS)
    assert np.bincount(g[asg.client], minlength=2).tolist() == [2, 2]
    assert all(asg.task[g[asg.client] == 0] == 0) and all(asg.task[g[asg.client] == 1] == 1)
    assert len(set(asg.processor.tolist())) == 4
    p0, p1 = asg.probability[g[asg.client] == 0], asg.probability[g[asg.client] == 1]
    assert np.allclose(p0, 2 / 6) and np.allclose(p1, 2 / 7)
    assert asg.probabilities.sum() == pytest.approx(4.0)
    assert "expected slots 4 < m=5" in asg.note
    # the authors' aggregation probability: C = m / P = 5 / 13 on every slot
    au = make({"probability": "authors"}).allocate(state(0, budget=5.0),
                                                  np.random.default_rng(4))
    assert np.allclose(au.probability, 5 / 13) and au.client.tolist() == asg.client.tolist()


def test_group_weight_scales_the_share_by_the_groups_data():
    a = make({"weight": "group"})
    asg = a.allocate(state(0), np.random.default_rng(4))
    g = np.array(LABEL_GROUPS)
    for k in range(asg.num_slots):
        i, s = asg.client[k], asg.task[k]
        scale = N_MC[:, s].sum() / N_MC[g == g[i], s].sum()
        assert asg.share[k] == pytest.approx(scale / CAP_MC[i])


def test_optimal_probes_served_pairs_and_follows_the_closed_form():
    """Group 0 serves model 0 (clients 0, 3, 6, 7, P_g = 6), budget k = 2: the optimum of
    docs/algorithms.md section 4 on U_b = d_{i,0} f_{i,0} / B_i."""
    from mmfl.core.probabilities import optimal_probabilities

    a = make({"within": "optimal"})
    probe = a.probe_pairs(state(0))
    g = np.array(LABEL_GROUPS)
    assert probe.sum() == 8 and all(probe[i, g[i]] for i in range(8))
    loss = local_losses()
    asg = a.allocate(state(0, loss=loss), np.random.default_rng(0))
    members = np.flatnonzero(g == 0)
    b = np.flatnonzero(np.isin(POP.processor_client, members))
    c = POP.processor_client[b]
    u = POP.data_weight[c, 0] * loss[c, 0] / CAP_MC[c]
    assert np.allclose(asg.probabilities[b, 0], optimal_probabilities(u[:, None], 2.0)[:, 0])
    assert asg.probabilities[:, 2].sum() == 0 and asg.probabilities[b, 1:].sum() == 0


# --------------------------------------------------------------------------------------------
# Monte Carlo: what the default aggregator estimates
# --------------------------------------------------------------------------------------------


def _served_target(a: GroupPipelineAllocator, st: RoundState, per_group_share=False):
    """(S, DIM): sum over the schedulable clients i of a served group g (model s) of
    d_{i,s} G_{i,s}; with ``per_group_share`` divided by g's share of model s's data."""
    sched = a.schedule(st)
    target = np.zeros((3, DIM))
    for i in np.flatnonzero(sched >= 0):
        s = sched[i]
        w = POP.data_weight[i, s]
        if per_group_share:
            w *= N_MC[:, s].sum() / N_MC[a.groups == a.groups[i], s].sum()
        target[s] += w * G_FAKE[i, s]
    return target


def _estimates(a, st, reps, seed=123):
    agg = UnbiasedAggregator({}, POP)
    rng = np.random.default_rng(seed)
    est = np.zeros((reps, 3, DIM))
    for r in range(reps):
        plan = agg.plan(a.allocate(st, rng), st)  # the same round again: same buffer
        np.add.at(est[r], plan.task, plan.coefficient[:, None] * G_FAKE[plan.client, plan.task])
    return est


@pytest.mark.parametrize("options", [{}, {"within": "optimal"}, {"weight": "group"},
                                     {"grouping": "random", "within": "optimal",
                                      "weight": "group"}])
def test_monte_carlo_unbiased_for_the_served_groups(options):
    a = make(options, seed=2)
    avail = np.array([True, True, True, False, True, True, True, True])
    loss = local_losses()
    a.allocate(state(0, budget=3.0, available=avail, loss=loss), np.random.default_rng(0))
    st = state(1, budget=3.0, available=avail, loss=loss, task_losses=np.array([1.0, 2, 3]))
    est = _estimates(a, st, 20_000)
    target = _served_target(a, st, per_group_share=options.get("weight") == "group")
    assert np.abs(target).sum() > 0
    assert_mean_within(est, target)


def test_authors_probability_is_biased_by_the_group_sizes():
    """probability = "authors": slots aggregate with C = m / P instead of k / P_g, so the mean
    is the served target times (k / P_g) / C per group - not the target when the groups'
    processor counts differ (here 6 and 7 of P = 13, k = 2, C = 4 / 13)."""
    a = make({"probability": "authors"})
    st = state(0)
    est = _estimates(a, st, 20_000)
    sched = a.schedule(st)
    biased, target = np.zeros((3, DIM)), np.zeros((3, DIM))
    p_g = {0: 6, 1: 7}
    for i in np.flatnonzero(sched >= 0):
        s = sched[i]
        term = POP.data_weight[i, s] * G_FAKE[i, s]
        target[s] += term
        biased[s] += term * (2 / p_g[a.groups[i]]) / (4 / 13)
    assert_mean_within(est, biased)
    se = est.std(axis=0, ddof=1) / np.sqrt(len(est))
    assert np.any(np.abs(est.mean(axis=0) - target) > 6 * se)
