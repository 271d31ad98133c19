"""mmfl.core.probabilities: the closed form of docs/algorithms.md section 4 (the per-model
budgets are in test_per_model.py).

Layers: the worked example of section 4 (exact numbers), edge cases and input validation,
hypothesis properties, and agreement with a general convex solver (cvxpy + Clarabel, on the
conic form t >= U^2 / p  <=>  ||(2U, p - t)|| <= p + t) within 1e-6 relative objective.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from solverkit import U_EX, check_matrix, instances, random_instance, reference_solution, rel

from mmfl.core.per_model import optimal_probabilities_per_model
from mmfl.core.probabilities import (
    optimal_probabilities,
    optimal_probabilities_info,
    sampling_variance,
    uniform_probabilities,
)


# --------------------------------------------------------------------------------------------
# worked example (section 4)
# --------------------------------------------------------------------------------------------


def test_worked_example_m1():
    p = optimal_probabilities(U_EX, 1)
    q = np.array([0.7, 0.3, 0.3, 2.2]) / 3.5
    np.testing.assert_allclose(p.sum(axis=1), q, atol=1e-12)
    np.testing.assert_allclose(q, [0.2, 0.0857, 0.0857, 0.6286], atol=1e-4)
    quoted = [[0.1714, 0.0286], [0.0857, 0], [0.0857, 0], [0.1143, 0.5143]]
    np.testing.assert_allclose(p, quoted, atol=1e-4)
    np.testing.assert_allclose(p, [[6 / 35, 1 / 35], [3 / 35, 0], [3 / 35, 0], [4 / 35, 18 / 35]],
                               atol=1e-12)


def test_worked_example_m2():
    p, info = optimal_probabilities_info(U_EX, 2)
    np.testing.assert_allclose(p.sum(axis=1), [7 / 13, 3 / 13, 3 / 13, 1], atol=1e-12)
    exact = [[6 / 13, 1 / 13], [3 / 13, 0], [3 / 13, 0], [2 / 11, 9 / 11]]
    np.testing.assert_allclose(p, exact, atol=1e-12)
    assert info.capped == 1 and info.note == ""
    assert info.water_level == pytest.approx(1.3)
    assert info.expected == pytest.approx(2.0, abs=1e-12)


def test_worked_example_m3_5():
    p, info = optimal_probabilities_info(U_EX, 3.5)
    exact = [[6 / 7, 1 / 7], [0.75, 0], [0.75, 0], [2 / 11, 9 / 11]]
    np.testing.assert_allclose(p, exact, atol=1e-12)
    assert info.capped == 2
    assert p.sum() == pytest.approx(3.5, abs=1e-12)


def test_worked_example_budget_above_processors():
    for m in (4, 5.5):
        p, info = optimal_probabilities_info(U_EX, m)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_allclose(p[0], [6 / 7, 1 / 7], atol=1e-12)
        assert info.capped == 4 and info.expected == pytest.approx(4.0)
    assert "expected slots 4 < m" in info.note


# --------------------------------------------------------------------------------------------
# edge cases and validation
# --------------------------------------------------------------------------------------------


def test_zero_budget_gives_zeros():
    assert not optimal_probabilities(U_EX, 0).any()
    assert not optimal_probabilities_per_model(U_EX, [0.0, 0.0]).any()


def test_all_zero_scores_fall_back_to_uniform_over_eligible():
    elig = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], bool)
    p, info = optimal_probabilities_info(np.zeros((4, 2)), 1.5, eligible=elig)
    q = 1.5 / 3
    np.testing.assert_allclose(p, [[q, 0], [q / 2, q / 2], [0, 0], [0, q]])
    assert info.fallback == "uniform" and not np.isnan(p).any()
    p, info = optimal_probabilities_info(np.zeros((4, 2)), 5, eligible=elig)
    assert p.sum() == pytest.approx(3.0) and "3 eligible processors" in info.note
    assert not optimal_probabilities(np.zeros((3, 2)), 1, eligible=np.zeros((3, 2), bool)).any()
    np.testing.assert_allclose(uniform_probabilities(elig, 1.5), optimal_probabilities(
        np.zeros((4, 2)), 1.5, eligible=elig))


def test_zero_mass_processors_get_zero():
    u = np.array([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 0.5]])
    p = optimal_probabilities(u, 1.2)
    assert not p[[0, 2]].any()
    assert p.sum() == pytest.approx(1.2)
    p, info = optimal_probabilities_info(u, 3)
    np.testing.assert_allclose(p.sum(axis=1), [0, 1, 0, 1])
    assert info.positive == 2 and "expected slots 2 < m" in info.note


def test_eligibility_masks_scores():
    elig = np.array([[True, False], [True, True], [False, True], [True, True]])
    p = optimal_probabilities(U_EX, 1.5, eligible=elig)
    np.testing.assert_allclose(p, optimal_probabilities(np.where(elig, U_EX, 0), 1.5))
    assert not p[~elig].any()
    q = optimal_probabilities_per_model(U_EX, [0.7, 0.6], eligible=elig)
    assert not q[~elig].any()


def test_inputs_not_mutated_and_read_only_inputs_work():
    u = U_EX.copy()
    u.setflags(write=False)
    m = np.array([0.5, 0.4])
    m.setflags(write=False)
    optimal_probabilities(u, 2.0)
    optimal_probabilities_per_model(u, m)
    np.testing.assert_array_equal(u, U_EX)
    np.testing.assert_array_equal(m, [0.5, 0.4])


@pytest.mark.parametrize(
    "scores, budget, match",
    [
        ([[1.0, -0.1]], 1, ">= 0"),
        ([[1.0, np.nan]], 1, "NaN"),
        ([[1.0, np.inf]], 1, "finite"),
        ([1.0, 2.0], 1, "2-D"),
        ([[1.0]], -1, "budget"),
        ([[1.0]], np.nan, "budget"),
        ([[1.0]], np.inf, "budget"),
        ([[1.0]], "x", "budget"),
    ],
)
def test_invalid_inputs_raise(scores, budget, match):
    with pytest.raises(ValueError, match=match):
        optimal_probabilities(np.array(scores), budget)


def test_empty_shapes():
    assert optimal_probabilities(np.zeros((0, 3)), 1).shape == (0, 3)
    assert optimal_probabilities_per_model(np.zeros((4, 0)), np.zeros(0)).shape == (4, 0)


def test_extreme_scales_do_not_overflow():
    u = U_EX * 1e300
    np.testing.assert_allclose(optimal_probabilities(u, 2), optimal_probabilities(U_EX, 2))
    np.testing.assert_allclose(optimal_probabilities(U_EX * 1e-300, 2),
                               optimal_probabilities(U_EX, 2))
    np.testing.assert_allclose(optimal_probabilities_per_model(u, [1.0, 0.6]),
                               optimal_probabilities_per_model(U_EX, [1.0, 0.6]), atol=1e-9)


def test_sampling_variance():
    p = optimal_probabilities(U_EX, 1)
    assert sampling_variance(U_EX, p) == pytest.approx(3.5**2)  # (sum_b M_b)^2 / m
    assert sampling_variance(U_EX, np.zeros_like(U_EX)) == np.inf


# --------------------------------------------------------------------------------------------
# hypothesis properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(), m=st.floats(0, 40))
def test_closed_form_properties(inst, m):
    u, elig = inst
    p, info = optimal_probabilities_info(u, m, eligible=elig)
    check_matrix(p, u, elig)
    ue = np.where(elig, u, 0)
    k = int((ue.sum(axis=1) > 0).sum())
    if k:
        assert not p[ue == 0].any()
        assert p.sum() == pytest.approx(min(m, k), abs=1e-9)
        if m < k:
            # water-filling: q_b = min(1, M_b / lambda)
            mass = ue.sum(axis=1)
            np.testing.assert_allclose(p.sum(axis=1), np.minimum(1, mass / info.water_level),
                                       rtol=1e-9, atol=1e-12)
    else:
        n_el = int(elig.any(axis=1).sum())
        assert p.sum() == pytest.approx(min(m, n_el), abs=1e-9)
    assert info.expected == pytest.approx(p.sum())


@settings(max_examples=100, deadline=None)
@given(inst=instances(), m=st.floats(0.1, 30), seed=st.integers(0, 2**32 - 1))
def test_closed_form_permutation_and_scale_invariance(inst, m, seed):
    u, elig = inst
    perm = np.random.default_rng(seed).permutation(u.shape[0])
    p = optimal_probabilities(u, m, eligible=elig)
    q = optimal_probabilities(u[perm], m, eligible=elig[perm])
    np.testing.assert_allclose(q, p[perm], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(optimal_probabilities(u * 7.5, m, eligible=elig), p,
                               rtol=1e-9, atol=1e-15)


# --------------------------------------------------------------------------------------------
# agreement with a general convex solver
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(25))
def test_closed_form_matches_convex_solver(seed):
    rng = np.random.default_rng(seed)
    u = random_instance(rng, int(rng.integers(2, 40)), int(rng.integers(1, 5)))
    k = int((u.sum(axis=1) > 0).sum())
    m = float(rng.uniform(0.05, 1.0) * k)
    p = optimal_probabilities(u, m)
    ref = reference_solution(u, budget=m)
    assert rel(sampling_variance(u, p), sampling_variance(u, ref)) <= 1e-6


