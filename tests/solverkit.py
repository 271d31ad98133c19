"""Shared cases of the sampling-probability tests (tests/core/test_probabilities.py and
tests/core/test_per_model.py): section 4's worked example, hypothesis instances, the matrix
checks and a general convex solver as reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

#: section 4's worked example: four processors (b0 | b1 b2 | b3), two tasks
U_EX = np.array([[0.6, 0.1], [0.3, 0.0], [0.3, 0.0], [0.4, 1.8]])


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


SCORE = st.one_of(st.just(0.0), st.floats(1e-6, 1e3), st.floats(1e-12, 1e-3))


@st.composite
def instances(draw, max_p=25, max_s=5):
    num_p = draw(st.integers(1, max_p))
    num_s = draw(st.integers(1, max_s))
    u = draw(arrays(np.float64, (num_p, num_s), elements=SCORE))
    elig = draw(arrays(np.bool_, (num_p, num_s), elements=st.booleans()))
    return u, elig


def check_matrix(p, u, elig):
    assert p.shape == u.shape
    assert not np.isnan(p).any()
    assert (p >= 0).all() and (p <= 1).all()
    assert (p.sum(axis=1) <= 1 + 1e-9).all()
    assert not p[~elig].any()


def reference_solution(u: np.ndarray, budget=None, budgets=None) -> np.ndarray:
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


def random_instance(rng, num_p, num_s):
    u = rng.exponential(size=(num_p, num_s)) ** rng.uniform(0.5, 2.5)
    u *= rng.random((num_p, num_s)) < rng.uniform(0.4, 1.0)
    if rng.random() < 0.3:
        u[:, rng.integers(num_s)] *= rng.uniform(0.01, 50)
    u[rng.integers(num_p), rng.integers(num_s)] = 1.0  # not all zero
    return u
