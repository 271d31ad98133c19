"""mmfl.core.per_model: one budget per model (docs/algorithms.md section 4.5, MMFL-FairVR):
the worked example against the closed form, edge cases, hypothesis properties, and agreement
with a general convex solver within 1e-6 relative objective."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from solverkit import U_EX, check_matrix, instances, random_instance, reference_solution, rel

from mmfl.core import per_model as per_model_mod
from mmfl.core.per_model import optimal_probabilities_per_model, optimal_probabilities_per_model_info
from mmfl.core.probabilities import optimal_probabilities, sampling_variance

def test_worked_example_per_model_matches_closed_form():
    """Per-model budgets equal to the closed form's column sums reproduce the closed form."""
    for m in (1, 2, 3.5):
        p = optimal_probabilities(U_EX, m)
        q, info = optimal_probabilities_per_model_info(U_EX, p.sum(axis=0))
        np.testing.assert_allclose(q, p, atol=1e-9)
        assert info.gap <= 1e-9


def test_per_model_all_zero_scores_use_equal_scores():
    elig = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], bool)
    p, info = optimal_probabilities_per_model_info(np.zeros((4, 2)), [1.0, 0.5], eligible=elig)
    q = optimal_probabilities_per_model(elig.astype(float), [1.0, 0.5])
    np.testing.assert_allclose(p, q)
    assert info.fallback == "equal" and not np.isnan(p).any()
    assert not p[~elig].any()


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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(), data=st.data())
def test_per_model_properties(inst, data):
    u, elig = inst
    num_s = u.shape[1]
    budgets = np.array(data.draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 20)),
                                          min_size=num_s, max_size=num_s)))
    p, info = optimal_probabilities_per_model_info(u, budgets, eligible=elig)
    check_matrix(p, u, elig)
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


@pytest.mark.parametrize("seed", range(30))
def test_per_model_matches_convex_solver(seed):
    rng = np.random.default_rng(1000 + seed)
    num_p, num_s = int(rng.integers(2, 40)), int(rng.integers(2, 6))
    u = random_instance(rng, num_p, num_s)
    budgets = rng.dirichlet(np.ones(num_s)) * num_p * rng.uniform(0.1, 1.2)
    has = (u > 0).any(axis=0)
    budgets = np.where(has, budgets, 0.0)
    p, info = optimal_probabilities_per_model_info(u, budgets)
    ref = reference_solution(u[:, has], budgets=budgets[has])
    v, vr = sampling_variance(u, p), sampling_variance(u[:, has], ref)
    assert v <= vr * (1 + 1e-9)  # never worse than a feasible reference point
    assert rel(v, vr) <= 1e-6
    assert info.gap <= 1e-9


@pytest.mark.parametrize("seed", range(10))
def test_barrier_fallback_matches_main_path(seed):
    """The fallback (used only when the dual Newton method stalls) is exact on its own."""
    rng = np.random.default_rng(2000 + seed)
    num_p, num_s = int(rng.integers(2, 40)), int(rng.integers(2, 6))
    u = random_instance(rng, num_p, num_s)
    u = u[(u > 0).any(axis=1)][:, (u > 0).any(axis=0)]
    u = u / u.max()
    m = rng.dirichlet(np.ones(u.shape[1])) * u.shape[0] * rng.uniform(0.2, 1.2)
    pf, v, g, nu, mu, it, ok = per_model_mod._barrier(u, u > 0, m, 1e-11, 300)
    assert ok and (v - g) <= 1e-11 * v
    assert (pf.sum(axis=1) <= 1 + 1e-12).all() and (pf.sum(axis=0) <= m * (1 + 1e-12)).all()
    assert rel(v, sampling_variance(u, optimal_probabilities_per_model(u, m))) <= 1e-9
