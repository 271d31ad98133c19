"""mmfl.core.probabilities: section 4 of docs/algorithms.md (closed form and per-model budgets).

Layers: the worked example of section 4 (exact numbers), edge cases and input validation,
hypothesis properties, and agreement with a general convex solver (cvxpy + Clarabel, on the
conic form t >= U^2 / p  <=>  ||(2U, p - t)|| <= p + t) within 1e-6 relative objective.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mmfl.core import per_model as per_model_mod
from mmfl.core.per_model import optimal_probabilities_per_model, optimal_probabilities_per_model_info
from mmfl.core.probabilities import (
    optimal_probabilities,
    optimal_probabilities_info,
    sampling_variance,
    uniform_probabilities,
)

# Section 4's worked example: four processors (b0 | b1 b2 | b3), two tasks.
U_EX = np.array([[0.6, 0.1], [0.3, 0.0], [0.3, 0.0], [0.4, 1.8]])


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


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


def test_worked_example_per_model_matches_closed_form():
    """Per-model budgets equal to the closed form's column sums reproduce the closed form."""
    for m in (1, 2, 3.5):
        p = optimal_probabilities(U_EX, m)
        q, info = optimal_probabilities_per_model_info(U_EX, p.sum(axis=0))
        np.testing.assert_allclose(q, p, atol=1e-9)
        assert info.gap <= 1e-9


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


def test_per_model_all_zero_scores_use_equal_scores():
    elig = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], bool)
    p, info = optimal_probabilities_per_model_info(np.zeros((4, 2)), [1.0, 0.5], eligible=elig)
    q = optimal_probabilities_per_model(elig.astype(float), [1.0, 0.5])
    np.testing.assert_allclose(p, q)
    assert info.fallback == "equal" and not np.isnan(p).any()
    assert not p[~elig].any()


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


def test_invalid_per_model_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        optimal_probabilities_per_model(U_EX, [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        optimal_probabilities_per_model(U_EX, [1.0, -1.0])
    with pytest.raises(ValueError, match=">= 0"):
        optimal_probabilities_per_model(U_EX, [1.0, np.nan])
    with pytest.raises(ValueError, match="NaN"):
        optimal_probabilities_per_model(np.array([[np.nan, 1.0]]), [1.0, 1.0])
    with pytest.raises(ValueError, match="eligible"):
        optimal_probabilities(U_EX, 1, eligible=np.ones((2, 2), bool))


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


def test_per_model_budget_beyond_capacity_is_reported():
    # model 1 only has b3; it cannot use a budget of 2
    u = U_EX.copy()
    u[0, 1] = 0.0
    p, info = optimal_probabilities_per_model_info(u, [1.0, 2.0])
    assert p[:, 1].sum() <= 1.0 + 1e-12 and "models 1" in info.note
    assert p.sum(axis=1).max() <= 1 + 1e-12 and p[:, 0].sum() <= 1.0 + 1e-12


def test_per_model_zero_budget_or_no_support_column_is_zero():
    p = optimal_probabilities_per_model(U_EX, [1.0, 0.0])
    assert not p[:, 1].any() and p[:, 0].sum() == pytest.approx(1.0)
    u = U_EX.copy()
    u[:, 1] = 0
    p, info = optimal_probabilities_per_model_info(u, [1.0, 0.5])
    assert not p[:, 1].any() and "models 1" in info.note


def test_sampling_variance():
    p = optimal_probabilities(U_EX, 1)
    assert sampling_variance(U_EX, p) == pytest.approx(3.5**2)  # (sum_b M_b)^2 / m
    assert sampling_variance(U_EX, np.zeros_like(U_EX)) == np.inf


# --------------------------------------------------------------------------------------------
# hypothesis properties
# --------------------------------------------------------------------------------------------

_score = st.one_of(st.just(0.0), st.floats(1e-6, 1e3), st.floats(1e-12, 1e-3))


@st.composite
def instances(draw, max_p=25, max_s=5):
    num_p = draw(st.integers(1, max_p))
    num_s = draw(st.integers(1, max_s))
    u = draw(arrays(np.float64, (num_p, num_s), elements=_score))
    elig = draw(arrays(np.bool_, (num_p, num_s), elements=st.booleans()))
    return u, elig


def _check_matrix(p, u, elig):
    assert p.shape == u.shape
    assert not np.isnan(p).any()
    assert (p >= 0).all() and (p <= 1).all()
    assert (p.sum(axis=1) <= 1 + 1e-9).all()
    assert not p[~elig].any()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(), m=st.floats(0, 40))
def test_closed_form_properties(inst, m):
    u, elig = inst
    p, info = optimal_probabilities_info(u, m, eligible=elig)
    _check_matrix(p, u, elig)
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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(), data=st.data())
def test_per_model_properties(inst, data):
    u, elig = inst
    num_s = u.shape[1]
    budgets = np.array(data.draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 20)),
                                          min_size=num_s, max_size=num_s)))
    p, info = optimal_probabilities_per_model_info(u, budgets, eligible=elig)
    _check_matrix(p, u, elig)
    assert (p.sum(axis=0) <= budgets * (1 + 1e-9) + 1e-15).all()
    ue = np.where(elig, u, 0)
    if ue.any():
        assert not p[ue == 0].any()
        assert info.gap <= 1e-9
        # never worse than the feasible closed-form candidate with the same total
        pos = ue > 0
        if (budgets > 0).all() and info.method:
            tot = float(p.sum())
            cand = optimal_probabilities(ue, tot)
            cand *= np.minimum(1, budgets / np.maximum(cand.sum(axis=0), 1e-300))
            if (cand[pos] > 0).all():
                assert sampling_variance(ue, p) <= sampling_variance(ue, cand) * (1 + 1e-9)


@settings(max_examples=100, deadline=None)
@given(inst=instances(max_s=1), m=st.floats(0.01, 30))
def test_per_model_single_model_equals_closed_form(inst, m):
    u, elig = inst
    if not np.where(elig, u, 0).any():
        return
    np.testing.assert_allclose(optimal_probabilities_per_model(u, [m], eligible=elig),
                               optimal_probabilities(u, m, eligible=elig), atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(inst=instances(), seed=st.integers(0, 2**32 - 1))
def test_per_model_large_budgets_equal_closed_form(inst, seed):
    u, elig = inst
    if not np.where(elig, u, 0).any():
        return
    budgets = np.full(u.shape[1], float(u.shape[0]) + 1.0)
    p = optimal_probabilities_per_model(u, budgets, eligible=elig)
    np.testing.assert_allclose(p, optimal_probabilities(u, budgets.sum(), eligible=elig),
                               atol=1e-12)
    perm = np.random.default_rng(seed).permutation(u.shape[0])
    np.testing.assert_allclose(
        optimal_probabilities_per_model(u[perm], budgets, eligible=elig[perm]), p[perm],
        atol=1e-12)


# --------------------------------------------------------------------------------------------
# agreement with a general convex solver
# --------------------------------------------------------------------------------------------


def _reference(u: np.ndarray, budget=None, budgets=None) -> np.ndarray:
    """min sum U^2/p by cvxpy + Clarabel (conic epigraph form), made exactly feasible."""
    cp = pytest.importorskip("cvxpy")
    sp = pytest.importorskip("scipy.sparse")
    u = u / u.max()
    num_p, num_s = u.shape
    b, s = np.nonzero(u > 0)
    n = b.size
    x = cp.Variable(n)
    t = cp.Variable(n)
    rows = sp.csr_matrix((np.ones(n), (b, np.arange(n))), shape=(num_p, n))
    cons = [rows @ x <= 1, cp.SOC(x + t, cp.vstack([2 * u[b, s], x - t]), axis=0)]
    if budgets is not None:
        cols = sp.csr_matrix((np.ones(n), (s, np.arange(n))), shape=(num_s, n))
        cons.append(cols @ x <= budgets)
    else:
        cons.append(cp.sum(x) <= budget)
    cp.Problem(cp.Minimize(cp.sum(t)), cons).solve(solver="CLARABEL")
    p = np.zeros(u.shape)
    p[b, s] = np.maximum(x.value, 1e-300)
    # shrink onto the feasible set (the solver's tolerance allows ~1e-8 violations)
    p /= np.maximum(p.sum(axis=1, keepdims=True), 1.0)
    if budgets is not None:
        p *= np.minimum(1.0, budgets / p.sum(axis=0))
    else:
        p *= min(1.0, budget / p.sum())
    return p


def _random_instance(rng, num_p, num_s):
    u = rng.exponential(size=(num_p, num_s)) ** rng.uniform(0.5, 2.5)
    u *= rng.random((num_p, num_s)) < rng.uniform(0.4, 1.0)
    if rng.random() < 0.3:
        u[:, rng.integers(num_s)] *= rng.uniform(0.01, 50)
    u[rng.integers(num_p), rng.integers(num_s)] = 1.0  # not all zero
    return u


@pytest.mark.parametrize("seed", range(25))
def test_closed_form_matches_convex_solver(seed):
    rng = np.random.default_rng(seed)
    u = _random_instance(rng, int(rng.integers(2, 40)), int(rng.integers(1, 5)))
    k = int((u.sum(axis=1) > 0).sum())
    m = float(rng.uniform(0.05, 1.0) * k)
    p = optimal_probabilities(u, m)
    ref = _reference(u, budget=m)
    assert _rel(sampling_variance(u, p), sampling_variance(u, ref)) <= 1e-6


@pytest.mark.parametrize("seed", range(30))
def test_per_model_matches_convex_solver(seed):
    rng = np.random.default_rng(1000 + seed)
    num_p, num_s = int(rng.integers(2, 40)), int(rng.integers(2, 6))
    u = _random_instance(rng, num_p, num_s)
    budgets = rng.dirichlet(np.ones(num_s)) * num_p * rng.uniform(0.1, 1.2)
    has = (u > 0).any(axis=0)
    budgets = np.where(has, budgets, 0.0)
    p, info = optimal_probabilities_per_model_info(u, budgets)
    ref = _reference(u[:, has], budgets=budgets[has])
    v, vr = sampling_variance(u, p), sampling_variance(u[:, has], ref)
    assert v <= vr * (1 + 1e-9)  # never worse than a feasible reference point
    assert _rel(v, vr) <= 1e-6
    assert info.gap <= 1e-9


@pytest.mark.parametrize("seed", range(10))
def test_barrier_fallback_matches_main_path(seed):
    """The fallback (used only when the dual Newton method stalls) is exact on its own."""
    rng = np.random.default_rng(2000 + seed)
    num_p, num_s = int(rng.integers(2, 40)), int(rng.integers(2, 6))
    u = _random_instance(rng, num_p, num_s)
    u = u[(u > 0).any(axis=1)][:, (u > 0).any(axis=0)]
    u = u / u.max()
    m = rng.dirichlet(np.ones(u.shape[1])) * u.shape[0] * rng.uniform(0.2, 1.2)
    pf, v, g, nu, mu, it, ok = per_model_mod._barrier(u, u > 0, m, 1e-11, 300)
    assert ok and (v - g) <= 1e-11 * v
    assert (pf.sum(axis=1) <= 1 + 1e-12).all() and (pf.sum(axis=0) <= m * (1 + 1e-12)).all()
    assert _rel(v, sampling_variance(u, optimal_probabilities_per_model(u, m))) <= 1e-9
